"""lm-evaluation-harness tasks scored by relaygpt (the optional extra `relaygpt[harness]`).

An eval task named `harness:NAME` (a task of the harness's registry) or `harness:FILE.yaml`
(a harness task defined locally: its folder is the harness's include path, the task is the
one its `task:` names) is run by the harness's own `simple_evaluate` against an `LM` whose
three request types go to relaygpt's generation pool, as the built-in tasks' rows do:

    loglikelihood(context, continuation)  -> (log p, is_greedy)   rows {"context", "continuations"}:
        split as the harness splits them (a space ending the context moves to the
        continuation), scored from one forward pass (model/score.py)
    loglikelihood_rolling(text)           -> log p of the whole text   rows {"rolling_text"}:
        end-of-text stands for the start, disjoint windows of the context length, every token
        predicted once, the last window filled out with earlier tokens (the harness's rolling
        windows with a one-token context)
    generate_until(context, gen_kwargs)   -> text   rows {"prompt"}: greedy (or sampled at
        gen_kwargs' temperature), at most max_gen_toks tokens, cut before the first `until`

The request handling (`HarnessRequests`) is plain functions over the pool's
`generate(model_dir, rows, *, work, params=None, chat=False)` callable (pipelines/eval/scorers.py),
so it runs and is tested without the harness installed; only
`harness_lm` (the `LM` subclass) and `run_harness_task` import lm_eval. A job or a command
naming a harness task where lm_eval is not installed is refused before any work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from model.errors import RelayError

PREFIX = "harness:"
INSTALL = "pip install 'relaygpt[harness]'"


def is_harness_task(name: str) -> bool:
    return name.startswith(PREFIX)


def harness_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def check_harness(name: str) -> None:
    if not harness_available():
        raise RelayError(f"task {name!r}: harness tasks need lm-evaluation-harness (lm_eval), which is not installed; {INSTALL}")


def harness_target(name: str) -> tuple[str, str | None]:
    """(the harness's task name, its include path or None) of `harness:NAME` / `harness:FILE.yaml`."""
    rest = name[len(PREFIX):]
    if not rest:
        raise RelayError(f"task {name!r}: name the harness task after 'harness:' (harness:arc_easy, harness:my_task.yaml)")
    if not rest.endswith((".yaml", ".yml")):
        return rest, None
    from pipelines.yaml_file import read_yaml

    path = Path(rest)
    if not path.is_file():
        raise RelayError(f"task {name!r}: no harness task file at {path}")
    spec = read_yaml(path, "harness task file")[0]
    if not isinstance(spec, dict) or not isinstance(spec.get("task"), str):
        raise RelayError(f"{path}: a harness task file names its task in 'task:'")
    return spec["task"], str(path.parent)


class HarnessRequests:
    """The harness's three request types answered by relaygpt's generation pool for one model."""

    def __init__(self, generate, model_dir: str) -> None:
        self.generate, self.model_dir = generate, str(model_dir)

    def loglikelihood(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        rows = [{"context": context, "continuations": [continuation]} for context, continuation in pairs]
        results = self.generate(self.model_dir, rows, work="score_choices") if rows else []
        return [(float(r["loglikelihoods"][0]), bool(r["greedy"][0])) for r in results]

    def loglikelihood_rolling(self, texts: list[str]) -> list[float]:
        results = self.generate(self.model_dir, [{"rolling_text": text} for text in texts], work="score_rolling") if texts else []
        return [float(r["loglikelihood"]) for r in results]

    def generate_until(self, requests: list[tuple[str, dict]]) -> list[str]:
        """Each request's completion, cut before its first `until` string. Requests sharing
        generation settings go to the pool together."""
        from pipelines.eval.task_types import apply_stops

        groups: dict[tuple, list[int]] = {}
        for i, (_, kwargs) in enumerate(requests):
            groups.setdefault(self._params(kwargs), []).append(i)
        out = [""] * len(requests)
        for params, members in groups.items():
            rows = [{"prompt": requests[i][0]} for i in members]
            for i, result in zip(members, self.generate(self.model_dir, rows, work="complete", params=dict(params))):
                out[i] = apply_stops(result["completion"], _until(requests[i][1]))
        return out

    @staticmethod
    def _params(kwargs: dict) -> tuple:
        kwargs = dict(kwargs or {})
        unknown = sorted(set(kwargs) - {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"})
        if unknown:
            raise RelayError(f"harness generate_until: generation setting(s) {', '.join(unknown)} are not supported")
        sampled = kwargs.get("do_sample", False) and float(kwargs.get("temperature", 1.0)) > 0
        params = {"max_new_tokens": int(kwargs.get("max_gen_toks", 256)), "temperature": float(kwargs.get("temperature", 1.0)) if sampled else 0.0}
        if sampled and kwargs.get("top_k"):
            params["top_k"] = int(kwargs["top_k"])
        if sampled and kwargs.get("top_p") is not None:
            params["top_p"] = float(kwargs["top_p"])
        return tuple(sorted(params.items()))


def _until(kwargs: dict) -> list[str]:
    until = (kwargs or {}).get("until") or []
    return [until] if isinstance(until, str) else list(until)


def harness_lm(requests: HarnessRequests):
    """An lm_eval `LM` answering through `requests` (imports lm_eval)."""
    from lm_eval.api.model import LM

    class RelayGPTLM(LM):
        def loglikelihood(self, instances, disable_tqdm: bool = False):
            return requests.loglikelihood([tuple(instance.args[:2]) for instance in instances])

        def loglikelihood_rolling(self, instances, disable_tqdm: bool = False):
            return requests.loglikelihood_rolling([instance.args[0] for instance in instances])

        def generate_until(self, instances, disable_tqdm: bool = False):
            return requests.generate_until([(instance.args[0], instance.args[1]) for instance in instances])

    return RelayGPTLM()


def run_harness_task(name: str, model_dir, generate, *, limit: int | None = None, seed: int | None = None) -> dict[str, float]:
    """{metric: value} of the harness task `name` (harness:...) on the model: every number the
    harness reports for it (standard errors left out), keyed `<metric>` (`<metric>,<filter>`
    for a filter other than `none`)."""
    check_harness(name)
    import lm_eval
    from lm_eval.tasks import TaskManager

    task, include = harness_target(name)
    manager = TaskManager(include_path=include) if include else TaskManager()
    seeds = {} if seed is None else {"random_seed": seed, "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": seed}
    try:
        out = lm_eval.simple_evaluate(model=harness_lm(HarnessRequests(generate, model_dir)), tasks=[task], limit=limit,
                                      task_manager=manager, log_samples=False, **seeds)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise RelayError(f"task {name!r}: lm-evaluation-harness failed ({type(exc).__name__}: {exc})") from None
    scores = {}
    for key, value in (out or {}).get("results", {}).get(task, {}).items():
        metric, _, kind = key.partition(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and kind and not metric.endswith("_stderr"):
            scores[metric if kind == "none" else key] = float(value)
    if not scores:
        raise RelayError(f"task {name!r}: lm-evaluation-harness reported no scores for {task!r}")
    return scores
