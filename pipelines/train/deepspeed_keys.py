"""`deepspeed.extra` checked against DeepSpeed's own config vocabulary, before any worker starts.

DeepSpeed reads its top-level keys one by one from the config dict (runtime/config.py), so a
misspelled key (`gradient_clippin`) is silently ignored; its sections that are pydantic models
(`zero_optimization`, `bf16`, the monitors, ...) refuse an unknown key, but only on rank 0
after the cluster started. Here both are found at preflight: the top-level vocabulary is every
key name DeepSpeed's config modules define (their upper-case string constants, and the fields
and aliases of every `DeepSpeedConfigModel`), each section with a model is validated by that
model, and a problem names the key and its nearest valid spelling.

Importing DeepSpeed's config costs about a second, so this runs only for a non-empty `extra`.
"""

from __future__ import annotations

import difflib
import functools
import re
import sys

_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@functools.cache
def _vocabulary() -> tuple[frozenset[str], dict]:
    """(every top-level key DeepSpeed knows, {section key: its pydantic model})."""
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # importing DeepSpeed logs its accelerator choice: not a line for `plan`'s reader
    try:
        import deepspeed.runtime.config  # noqa: F401  (imports every config module it reads)
    finally:
        logging.disable(previous)
    from deepspeed.comm.config import CommsLoggerConfig
    from deepspeed.compile.config import CompileConfig
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    keys: set[str] = set()
    for name, module in list(sys.modules.items()):
        if name.startswith("deepspeed.") and module is not None and ("config" in name or "constants" in name):
            keys.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and _KEY.match(v))
    for model in _subclasses(DeepSpeedConfigModel):
        for field_name, field in model.model_fields.items():
            keys.add(field_name)
            if isinstance(field.alias, str):
                keys.add(field.alias)
    sections = {"zero_optimization": DeepSpeedZeroConfig, "bf16": DeepSpeedBF16Config, "fp16": DeepSpeedFP16Config,
                "tensorboard": TensorBoardConfig, "wandb": WandbConfig, "csv_monitor": CSVConfig, "comet": CometConfig,
                "compile": CompileConfig, "comms_logger": CommsLoggerConfig}
    return frozenset(keys | set(sections)), sections


def _subclasses(cls) -> list:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _nearest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def extra_problems(where: str, extra: dict) -> list[str]:
    """One line per key of `extra` (at `where`, e.g. stages.pretrain.deepspeed.extra) that
    DeepSpeed does not know or its section's model refuses."""
    if not extra:
        return []
    from pydantic import ValidationError

    keys, sections = _vocabulary()
    problems = []
    for key, value in extra.items():
        if key not in keys:
            problems.append(f"{where}.{key}: not a DeepSpeed config key{_nearest(str(key), keys)}")
            continue
        model = sections.get(key)
        if model is None or isinstance(value, bool) and key == "zero_optimization":
            continue
        if not isinstance(value, dict):
            problems.append(f"{where}.{key}: a DeepSpeed section, expected a mapping of its settings, got {value!r}"[:200])
            continue
        try:
            model(**value)
        except ValidationError as exc:
            problems += [_section_problem(f"{where}.{key}", model, err) for err in exc.errors()[:3]]
        except Exception as exc:  # a model's own validator raising something else (assert, ValueError)
            problems.append(f"{where}.{key}: DeepSpeed refuses the section ({type(exc).__name__}: {str(exc)[:120]})")
    return problems


def _section_problem(where: str, model, err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        names = set(model.model_fields) | {f.alias for f in model.model_fields.values() if isinstance(f.alias, str)}
        return f"{where}.{loc}: not a key of DeepSpeed's {where.rsplit('.', 1)[-1]} section{_nearest(str(err['loc'][-1]), names)}"
    return f"{where}.{loc}: {err['msg']} (got {err.get('input')!r})"[:240]
