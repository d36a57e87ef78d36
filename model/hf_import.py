"""Hugging Face model directories read as our GPT: GPT-2 (`import_hf`) and the Llama family
(Llama, Mistral, Qwen2: `import_llama`, weights assembled a tensor at a time by `LlamaWeights`).
The conversions themselves (configs, tensor recipes) live in model/hf.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from model.config import GPTConfig
from model.errors import ConfigError, RelayError
from model.gpt import GPT
from model.model_files import assign_state, load_safetensors, read_config_json
from model.tokenizer import Tokenizer
from model.weights_file import CheckpointFiles

CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def llama_config_and_tokenizer(path: Path, hf: dict) -> tuple[GPTConfig, Tokenizer]:
    from model.hf import config_from_llama

    config = config_from_llama(hf, path / "config.json")
    recorded = hf.get("relaygpt", {}).get("tokenizer", {})
    tokenizer = Tokenizer.from_hf_dir(path, recorded)
    if recorded and recorded.get("sha256") != tokenizer.sha256:
        raise RelayError(f"{path}: the tokenizer files do not match the tokenizer recorded in config.json")
    return config, tokenizer


def _checkpoint_files(path: Path) -> CheckpointFiles:
    try:
        return CheckpointFiles(path)
    except FileNotFoundError:
        raise RelayError(f"{path}: no model.safetensors or {CheckpointFiles.INDEX} "
                         "(only safetensors weights are loaded; pickled .bin files are refused)") from None
    except ValueError as exc:
        raise RelayError(f"cannot read weights: {exc}") from None


class LlamaWeights(Mapping):
    """A Llama-family directory's weights (one safetensors file or shards through their index)
    under our GPT names, each assembled from its Llama tensors only when asked for: a ZeRO-3 rank
    or a pipeline stage holds one tensor at a time, never the whole model. Every shape is
    checked against the config from the headers before any tensor is read."""

    def __init__(self, path: Path, config: GPTConfig) -> None:
        from model.hf import llama_recipe

        self._path, self._config = path, config
        self._files = _checkpoint_files(path)
        self._recipe = llama_recipe(config)
        with torch.device("meta"):
            expected = GPT(config).state_dict()
        for name, (sources, vocabulary) in self._recipe.items():
            absent = [s for s in sources if s not in self._files]
            if absent:
                raise RelayError(f"{path}: no tensor {absent[0]!r}; not a checkpoint of this config")
            shapes = [self._files.spec(s)[1] for s in sources]
            rows = sum(shape[0] for shape in shapes)
            if vocabulary:
                rows = max(rows, config.padded_vocab_size)
            shape = (rows, *shapes[0][1:])
            if any(tuple(s[1:]) != tuple(shapes[0][1:]) for s in shapes) or shape != tuple(expected[name].shape):
                raise RelayError(f"{path}: {' + '.join(sources)} has shape {[list(s) for s in shapes]}, "
                                 f"the config needs {list(expected[name].shape)} for {name}")
        self._keys = list(expected)

    def __getitem__(self, name: str) -> torch.Tensor:
        from model.hf import llama_tensor

        stored = "transformer.wte.weight" if (self._config.tie_embeddings and name == "lm_head.weight") else name
        if stored not in self._recipe:
            raise KeyError(name)
        return llama_tensor(self._files, *self._recipe[stored], self._config, self._path)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def import_llama(path: Path) -> tuple[GPT, Tokenizer, dict]:
    """A Llama, Mistral or Qwen2 directory (config.json; model.safetensors or shards with their
    index; a byte-level BPE tokenizer)."""
    hf = read_config_json(path / "config.json")
    config, tokenizer = llama_config_and_tokenizer(path, hf)
    weights = LlamaWeights(path, config)
    with torch.device("meta"):
        model = GPT(config)
    tied = config.tie_embeddings
    state = {name: weights[name] for name in weights if not (tied and name == "lm_head.weight")}
    if tied:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    assign_state(model, state, path)
    meta = {"format": f"hf-{hf.get('model_type', 'llama')}", "model": config.to_dict(), "tokenizer": tokenizer.identity,
            "provenance": {"imported_from": str(path.resolve())}}
    return model, tokenizer, meta


def gpt2_config_from_hf(hf: dict, where: Path) -> GPTConfig:
    """Our config for a transformers GPT-2 config.json (`where`): the sizes it must state."""
    missing = [key for key in ("vocab_size", "n_layer", "n_head", "n_embd") if key not in hf]
    if missing:
        raise RelayError(f"{where}: no {', '.join(missing)}; a GPT-2 config.json states vocab_size, n_layer, n_head "
                         "and n_embd (positive integers)")
    recorded = hf.get("relaygpt")
    try:
        return GPTConfig(
            vocab_size=recorded.get("vocab_size", hf["vocab_size"]) if isinstance(recorded, dict) else hf["vocab_size"],
            block_size=hf.get("n_positions", 1024),
            n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
            n_inner=hf.get("n_inner") or None,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            dropout=0.0,
            pad_vocab_multiple=64,
        )
    except ConfigError as exc:
        raise RelayError(f"{where}: {exc}") from None


def import_hf(path: str | Path) -> tuple[GPT, Tokenizer, dict]:
    """A transformers GPT-2 directory (config.json, model.safetensors, vocab.json, merges.txt)."""
    path = Path(path)
    hf = read_config_json(path / "config.json")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        raise RelayError(f"{path / 'config.json'}: activation_function {activation!r} is not supported (gelu_new only)")
    config = gpt2_config_from_hf(hf, path / "config.json")
    recorded = hf.get("relaygpt", {}).get("tokenizer", {})
    tokenizer = Tokenizer.from_gpt2_files(path, recorded.get("name"), recorded.get("pat_str"))
    if recorded and recorded.get("sha256") != tokenizer.sha256:
        raise RelayError(f"{path}: vocab.json / merges.txt do not match the tokenizer recorded in config.json")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise RelayError(f"{path}: no model.safetensors (only safetensors weights are loaded; pickled .bin files are refused)")
    raw = load_safetensors(weights)
    state = {}
    for name, tensor in raw.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old checkpoints
        state[key] = tensor.t().contiguous() if key.endswith(CONV1D_SUFFIXES) else tensor
    state.pop("lm_head.weight", None)
    wte = state["transformer.wte.weight"]
    if wte.size(0) < config.padded_vocab_size:  # pad the vocabulary with zero rows
        state["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(config.padded_vocab_size - wte.size(0), wte.size(1))])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    with torch.device("meta"):
        model = GPT(config)
    assign_state(model, {k: v.float() for k, v in state.items()}, weights)
    meta = {"format": "hf-gpt2", "model": config.to_dict(), "tokenizer": tokenizer.identity, "provenance": {"imported_from": str(path.resolve())}}
    return model, tokenizer, meta
