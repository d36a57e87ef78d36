"""Model directories: the native format, and Hugging Face GPT-2 export and import.

Native (`relaygpt-native`):
    config.json        model config, tokenizer identity, chat template, provenance
    model.safetensors  weights (a tied LM head is stored once, as transformer.wte.weight)
    tokenizer/         tokenizer.json + ranks.tiktoken

Hugging Face (`--format hf`): config.json (model_type gpt2, or llama for RoPE / RMSNorm /
SwiGLU models: model/hf.py), model.safetensors (Conv1D layouts for GPT-2), the unpadded
vocabulary, and tokenizer files AutoTokenizer loads with the chat template.

Reading a Hugging Face directory lives in model/hf_import.py. Loading never unpickles: weights come from safetensors only. Directories are written under a
temporary name and renamed into place, so an interrupted export never looks complete.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from pathlib import Path

import torch

from model.atomic import atomic_dir
from model.chat import chat_info
from model.config import GPTConfig
from model.errors import RelayError
from model.gpt import GPT
from model.hf_import import CONV1D_SUFFIXES, LlamaWeights, gpt2_config_from_hf, import_hf, import_llama, llama_config_and_tokenizer
from model.model_files import assign_state, load_safetensors, read_config_json
from model.tokenizer import Tokenizer
from model.weights_file import SafetensorsReader, ShardedSafetensors, StreamingSafetensors, file_order

NATIVE_FORMAT = "relaygpt-native"
LLAMA_FAMILIES = ("llama", "mistral", "qwen2")  # model/hf.py reads them


def _weights_for_saving(model: GPT) -> dict[str, torch.Tensor]:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight")  # the same tensor as transformer.wte.weight
    return state


def save_model_dir(model: GPT, tokenizer: Tokenizer, out: str | Path, provenance: dict | None = None) -> Path:
    """Write a native model directory for `model` and `tokenizer`."""
    weights = _weights_for_saving(model)
    specs = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()}
    return write_model_dir(model.config, tokenizer, out, specs, (weights[name] for name in file_order(specs)), provenance)


def write_model_dir(config: GPTConfig, tokenizer: Tokenizer, out: str | Path, specs: dict, tensors, provenance: dict | None = None) -> Path:
    """Write a native model directory whose weights arrive one at a time.

    specs: {name: (dtype, shape)} of every weight; tensors: the weights in `file_order(specs)`,
    each written to disk before the next is asked for (so a caller streaming them from shards
    or pipeline stages never holds the whole model). The bytes are those `save_model_dir`
    writes for the same weights.
    """
    meta = {
        "format": NATIVE_FORMAT,
        "version": 1,
        "model": config.to_dict(),
        "tokenizer": {**tokenizer.identity, "path": "tokenizer"},
        "chat_template": chat_info(tokenizer),
        "provenance": {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(provenance or {})},
    }
    with atomic_dir(out, durable=True, kind="model") as tmp:
        with StreamingSafetensors(tmp / "model.safetensors", specs, metadata={"format": "pt"}) as weights:
            for name, tensor in zip(weights.order, tensors):
                weights.write(name, tensor)
        tokenizer.save(tmp / "tokenizer")
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return Path(out)


def _native_meta(path: Path, meta: dict) -> dict:
    """A native config.json's sections, checked before anything reads them: `model` an object
    of GPTConfig fields, `tokenizer` an object whose `sha256` is the tokenizer files' hash."""
    where = path / "config.json"
    if not isinstance(meta.get("model"), dict):
        raise RelayError(f"{where}: 'model' must be an object of model settings (vocab_size, block_size, n_layer, ...), "
                         f"got {_kind(meta.get('model'))}")
    tokenizer = meta.get("tokenizer")
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("sha256"), str):
        raise RelayError(f"{where}: 'tokenizer' must be an object with the tokenizer's 'sha256' (and 'path'), "
                         f"got {_kind(tokenizer)}")
    return meta


def _kind(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)}"
    return f"a JSON {type(value).__name__}"


def tokenizer_dir(path: Path, meta: dict) -> Path:
    """The tokenizer directory a native config.json names (`tokenizer.path`, default
    "tokenizer"). It must lie inside the model directory: an absolute path, or one that leads
    out of it through '..' or a link, is refused, so a model directory reads only its own files."""
    name = meta["tokenizer"].get("path", "tokenizer")
    where = f"{path / 'config.json'}: tokenizer.path"
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        raise RelayError(f"{where}: {name!r} is not a relative path inside the model directory")
    resolved = (path / name).resolve()
    if not resolved.is_relative_to(path.resolve()):
        raise RelayError(f"{where}: {name!r} leads outside the model directory (to {resolved})")
    return path / name


def load_model_dir(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[GPT, Tokenizer, dict]:
    """Model, tokenizer and metadata from a native or a Hugging Face GPT-2 directory."""
    path = Path(path)
    if not path.is_dir():
        raise RelayError(f"{path}: model directory does not exist")
    meta = read_config_json(path / "config.json")
    if meta.get("model_type") == "gpt2":
        model, tokenizer, meta = import_hf(path)
    elif meta.get("model_type") in LLAMA_FAMILIES:
        model, tokenizer, meta = import_llama(path)
    elif meta.get("format") == NATIVE_FORMAT:
        _native_meta(path, meta)
        config = GPTConfig.from_dict(meta["model"], where=f"{path / 'config.json'}: model")
        tokenizer = Tokenizer.from_dir(tokenizer_dir(path, meta))
        if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
            raise RelayError(f"{path / 'tokenizer'}: tokenizer sha256 does not match config.json; the directory was modified")
        with torch.device("meta"):
            model = GPT(config)
        state = load_safetensors(path / "model.safetensors")
        if config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
        assign_state(model, state, path)
    else:
        raise RelayError(f"{path / 'config.json'}: neither a relaygpt model ({NATIVE_FORMAT}) nor a Hugging Face GPT-2 or Llama (model_type gpt2 / llama)")
    if dtype is not None or device != "cpu":
        model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tokenizer, meta


class LazyWeights(Mapping):
    """A native model directory's weights under GPT names, each read from the safetensors file
    only when asked for (a tied LM head is the embedding). Training from a model directory
    goes through this: a ZeRO-3 rank or a pipeline stage reads one tensor at a time and keeps
    what it owns, instead of every rank loading the whole model first."""

    def __init__(self, path: Path, config: GPTConfig) -> None:
        try:
            self._file = SafetensorsReader(path)
        except FileNotFoundError:
            raise RelayError(f"{path}: missing") from None
        except (OSError, ValueError) as exc:
            raise RelayError(f"{path}: cannot read weights ({exc})") from None
        self._stored = set(self._file.specs)
        self._tied = config.tie_embeddings
        with torch.device("meta"):
            expected = GPT(config).state_dict()
        names = set(expected) - ({"lm_head.weight"} if self._tied else set())
        if self._stored != names:
            raise RelayError(f"{path}: weights do not match the config (missing: {sorted(names - self._stored)[:3]}, "
                             f"unexpected: {sorted(self._stored - names)[:3]})")
        for name in names:
            shape = self._file.specs[name][1]
            if shape != tuple(expected[name].shape):
                raise RelayError(f"{path}: {name} has shape {shape}, the config needs {tuple(expected[name].shape)}")
        self._keys = list(expected)

    def __getitem__(self, name: str) -> torch.Tensor:
        stored = "transformer.wte.weight" if (self._tied and name == "lm_head.weight") else name
        if stored not in self._stored:
            raise KeyError(name)
        return self._file.read(stored)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def open_model_weights(path: str | Path) -> tuple[GPTConfig, Tokenizer, Mapping]:
    """(config, tokenizer, weights) of a model directory without loading it: a native
    directory's weights are `LazyWeights`; a Hugging Face one is converted whole (its layouts
    differ from ours), so its weights are already in memory."""
    path = Path(path)
    if not path.is_dir():
        raise RelayError(f"{path}: model directory does not exist")
    meta = read_config_json(path / "config.json")
    if meta.get("model_type") in LLAMA_FAMILIES:
        config, tokenizer = llama_config_and_tokenizer(path, meta)
        return config, tokenizer, LlamaWeights(path, config)
    if meta.get("format") != NATIVE_FORMAT:
        model, tokenizer, _ = load_model_dir(path)
        return model.config, tokenizer, model.state_dict()
    _native_meta(path, meta)
    config = GPTConfig.from_dict(meta["model"], where=f"{path / 'config.json'}: model")
    tokenizer = Tokenizer.from_dir(tokenizer_dir(path, meta))
    if tokenizer.sha256 != meta["tokenizer"]["sha256"]:
        raise RelayError(f"{path / 'tokenizer'}: tokenizer sha256 does not match config.json; the directory was modified")
    return config, tokenizer, LazyWeights(path / "model.safetensors", config)


def read_model_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a native or Hugging Face model directory, without its weights."""
    path = Path(path)
    meta = read_config_json(path / "config.json")
    if meta.get("format") == NATIVE_FORMAT:
        _native_meta(path, meta)
        return Tokenizer.from_dir(tokenizer_dir(path, meta))
    return Tokenizer.from_hf_dir(path, meta.get("relaygpt", {}).get("tokenizer", {}) if isinstance(meta.get("relaygpt"), dict) else {})


def read_model_config(path: str | Path) -> GPTConfig:
    """The architecture of a native or Hugging Face GPT-2 model directory, from its config.json
    alone (no weights are read): what a run plan needs of a model it will start from."""
    path = Path(path)
    meta = read_config_json(path / "config.json")
    if meta.get("model_type") == "gpt2":
        return gpt2_config_from_hf(meta, path / "config.json")
    if meta.get("model_type") in LLAMA_FAMILIES:
        from model.hf import config_from_llama

        return config_from_llama(meta, path / "config.json")
    if meta.get("format") == NATIVE_FORMAT:
        _native_meta(path, meta)
        return GPTConfig.from_dict(meta["model"], where=f"{path / 'config.json'}: model")
    raise RelayError(f"{path / 'config.json'}: neither a relaygpt model ({NATIVE_FORMAT}) nor a Hugging Face GPT-2 or Llama (model_type gpt2 / llama)")


# ---- Hugging Face GPT-2 ------------------------------------------------------------------

def hf_incompatibilities(config: GPTConfig) -> list[str]:
    """Why `config` cannot be expressed as a transformers GPT-2 (empty when it can)."""
    needs = {"position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "tie_embeddings": True}
    out = [f"model.{k} is {getattr(config, k)!r} (GPT-2 needs {v!r})" for k, v in needs.items() if getattr(config, k) != v]
    if config.kv_heads != config.n_head:
        out.append(f"model.n_kv_head is {config.kv_heads} (GPT-2 has no grouped-query attention; needs n_head = {config.n_head})")
    return out


def gpt2_hf_config(config: GPTConfig) -> dict:
    """The architecture fields of a transformers GPT2Config for a GPT-2-shaped `config`."""
    return {
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": config.mlp_hidden,
        "activation_function": "gelu_new",
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
    }


def gpt2_hf_weights(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our weights (GPT-2 names already) as GPT2LMHeadModel holds them: Conv1D layouts, the
    vocabulary unpadded, the tied head stored once (as the embedding)."""
    weights = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied: the embedding
        if name == "transformer.wte.weight":
            tensor = tensor[: config.vocab_size]
        weights[name] = tensor.t().contiguous() if name.endswith(CONV1D_SUFFIXES) else tensor.contiguous()
    return weights


HUB_SHARD_BYTES = 5 * 10**9  # what save_pretrained has written by default


def export_hf(model: GPT, tokenizer: Tokenizer, out: str | Path, max_shard_bytes: int = HUB_SHARD_BYTES) -> Path:
    """A directory `transformers` loads: GPT2LMHeadModel for GPT-2-shaped models, LlamaForCausalLM
    for RoPE / RMSNorm / SwiGLU ones (grouped-query attention and an untied head included;
    Qwen2ForCausalLM where only q/k/v have biases). The vocabulary is unpadded (config
    vocab_size = the tokenizer's ids), the weights are sharded as the hub does above
    `max_shard_bytes` (with model.safetensors.index.json), and the tokenizer files load with
    AutoTokenizer, chat template included (model/hf.py)."""
    from model.hf import llama_config, llama_incompatibilities, llama_weights, tokenizer_files

    config = model.config
    gpt2_problems, llama_problems = hf_incompatibilities(config), llama_incompatibilities(config)
    if gpt2_problems and llama_problems:
        raise RelayError("--format hf needs a GPT-2-shaped model (" + "; ".join(gpt2_problems) + ") or a Llama-shaped one ("
                         + "; ".join(llama_problems) + ")")
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if not gpt2_problems:
        hf_config = {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            **gpt2_hf_config(config),
            "bos_token_id": tokenizer.eot_id,
            "eos_token_id": tokenizer.eot_id,
            "relaygpt": {"vocab_size": config.vocab_size, "tokenizer": {**tokenizer.identity, "pat_str": tokenizer.pat_str}},
        }
        weights = gpt2_hf_weights(state, config)
    else:
        hf_config, weights = llama_config(config, tokenizer), llama_weights(state, config)
    with atomic_dir(out, durable=True, kind="model") as tmp:
        specs = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in weights.items()}
        with ShardedSafetensors(tmp, specs, max_shard_bytes, metadata={"format": "pt"}) as files:
            for name in files.order:
                files.write(name, weights[name])
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        for name, text in tokenizer_files(tokenizer, config.block_size).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out)
