"""GPTConfig: the shape of a decoder-only transformer, its presets, and its arithmetic.

A config is frozen and validated on construction; every mistake is a `ConfigError` (a
`ValueError`) naming the field and saying what would be valid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from model.errors import ConfigError

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


def _round_up(value: int, multiple: int) -> int:
    return ((value + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of one GPT model.

    vocab_size: ids the tokenizer can produce (base vocabulary + special tokens).
    block_size: the context window in tokens.
    n_kv_head: key/value heads for grouped-query attention; None means n_head (plain MHA).
    n_inner: hidden width of the MLP; None means 4 * n_embd for gelu and the SwiGLU
        convention round_up(8/3 * n_embd, 64) for swiglu.
    pad_vocab_multiple: the embedding and LM head have `padded_vocab_size` rows, the
        vocabulary rounded up to this multiple (64 keeps matmuls aligned); rows past
        vocab_size are never produced by generation.
    qkv_bias: biases on the query/key/value projection alone (Qwen2's layout) where `bias`
        is false; None follows `bias`.
    rope_scaling: the rotary frequencies rescaled for a longer context, as published
        checkpoints record it: {"rope_type": "linear", "factor": f} or {"rope_type":
        "llama3", "factor", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings"} (Llama 3.1-3.3); None for plain RoPE.
    """

    vocab_size: int
    block_size: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int | None = None
    n_inner: int | None = None
    position: str = "learned"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    mlp: str = "gelu"
    bias: bool = True
    dropout: float = 0.0
    tie_embeddings: bool = True
    pad_vocab_multiple: int = 64
    qkv_bias: bool | None = None
    rope_scaling: dict | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with this config, each naming its field (empty when valid)."""
        out = architecture_problems({k: v for k, v in self.to_dict().items() if k != "vocab_size"})
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) or self.vocab_size <= 0:
            out.insert(0, f"model.vocab_size must be a positive integer, got {self.vocab_size!r}")
        return out

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def attn_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def padded_vocab_size(self) -> int:
        return _round_up(self.vocab_size, self.pad_vocab_multiple)

    @property
    def mlp_hidden(self) -> int:
        if self.n_inner is not None:
            return self.n_inner
        if self.mlp == "swiglu":
            return _round_up(int(8 * self.n_embd / 3), 64)
        return 4 * self.n_embd

    def num_params(self, include_embeddings: bool = True) -> int:
        """Trainable parameters, each tied tensor counted once."""
        c, v = self.n_embd, self.padded_vocab_size
        qkv_out = (self.n_head + 2 * self.kv_heads) * self.head_dim
        norm = c * (2 if self.norm == "layernorm" and self.bias else 1)
        attn = c * qkv_out + c * c + (qkv_out if self.attn_qkv_bias else 0) + (c if self.bias else 0)
        mlp_in = self.mlp_hidden * (2 if self.mlp == "swiglu" else 1)
        mlp = c * mlp_in + self.mlp_hidden * c + ((mlp_in + c) if self.bias else 0)
        blocks = self.n_layer * (2 * norm + attn + mlp) + norm  # + final norm
        if not include_embeddings:
            return blocks
        embeddings = v * c + (self.block_size * c if self.position == "learned" else 0)
        head = 0 if self.tie_embeddings else v * c
        return blocks + embeddings + head

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 * matmul params + attention.

        The matmul parameters are the blocks plus the LM head (the embedding lookup is not a
        matmul); attention adds 12 * n_layer * n_embd * seq_len (PaLM appendix B), which is
        what MFU is measured against.
        """
        seq_len = seq_len or self.block_size
        matmul_params = self.num_params(include_embeddings=False) + self.padded_vocab_size * self.n_embd
        return 6.0 * matmul_params + 12.0 * self.n_layer * self.n_embd * seq_len

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> GPTConfig:
        return dataclasses.replace(self, **changes)



def architecture_problems(fields: dict[str, Any]) -> list[str]:
    """Every problem with an architecture: any GPTConfig fields but vocab_size (which comes
    from the tokenizer), the rest taking their defaults. Empty when valid."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"}
    unknown = sorted(set(fields) - set(defaults))
    if unknown:
        return [f"model.{name}: unknown field" for name in unknown]
    f = {**defaults, **fields}
    out: list[str] = []
    for name in ("block_size", "n_layer", "n_head", "n_embd", "pad_vocab_multiple"):
        value = f[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            out.append(f"model.{name} must be a positive integer, got {value!r}")
    for name in ("n_kv_head", "n_inner"):
        value = f[name]
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            out.append(f"model.{name} must be a positive integer or null, got {value!r}")
    if out:
        return out  # the divisibility checks below need valid integers
    kv_heads = f["n_kv_head"] or f["n_head"]
    if f["n_embd"] % f["n_head"]:
        out.append(f"model.n_embd ({f['n_embd']}) must be divisible by model.n_head ({f['n_head']})")
    elif f["position"] == "rope" and (f["n_embd"] // f["n_head"]) % 2:
        out.append(f"model.position 'rope' needs an even head size, got n_embd/n_head = {f['n_embd'] // f['n_head']}")
    if f["n_head"] % kv_heads:
        out.append(f"model.n_head ({f['n_head']}) must be divisible by model.n_kv_head ({kv_heads})")
    if f["position"] not in POSITIONS:
        out.append(f"model.position must be one of {', '.join(POSITIONS)}, got {f['position']!r}")
    if f["norm"] not in NORMS:
        out.append(f"model.norm must be one of {', '.join(NORMS)}, got {f['norm']!r}")
    if f["mlp"] not in MLPS:
        out.append(f"model.mlp must be one of {', '.join(MLPS)}, got {f['mlp']!r}")
    if not 0.0 <= f["dropout"] < 1.0:
        out.append(f"model.dropout must be in [0, 1), got {f['dropout']!r}")
    if f["norm_eps"] <= 0:
        out.append(f"model.norm_eps must be positive, got {f['norm_eps']!r}")
    if f["rope_theta"] <= 0:
        out.append(f"model.rope_theta must be positive, got {f['rope_theta']!r}")
    if f["qkv_bias"] is not None and not isinstance(f["qkv_bias"], bool):
        out.append(f"model.qkv_bias must be true, false or null, got {f['qkv_bias']!r}")
    out.extend(rope_scaling_problems(f["rope_scaling"], f["position"]))
    return out


ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def rope_scaling_problems(scaling: Any, position: str) -> list[str]:
    """What is wrong with a `rope_scaling` setting (empty when it is None or valid)."""
    if scaling is None:
        return []
    where = "model.rope_scaling"
    if position != "rope":
        return [f"{where} needs model.position 'rope', got {position!r}"]
    if not isinstance(scaling, dict):
        return [f"{where} must be a mapping such as {{rope_type: llama3, factor: 8.0, ...}}, got {scaling!r:.60}"]
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        return [f"{where}.rope_type must be one of {', '.join(ROPE_SCALING_KEYS)}, got {kind!r}"]
    needed = ROPE_SCALING_KEYS[kind]
    extra = sorted(set(scaling) - {"rope_type", *needed})
    if extra:
        return [f"{where}: unknown key(s) {', '.join(extra)} for rope_type {kind}; valid: {', '.join(needed)}"]
    out = []
    for key in needed:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            out.append(f"{where}.{key} must be a positive number, got {value!r}")
    if kind == "llama3" and not out and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        out.append(f"{where}.high_freq_factor ({scaling['high_freq_factor']}) must exceed low_freq_factor ({scaling['low_freq_factor']})")
    return out


# Architectures by name; vocab_size comes from the tokenizer. GPT-2 sizes follow the
# released checkpoints; the larger ones follow Table 2.1 of the GPT-3 paper (where the
# table's head count and head size disagree with d_model we keep d_model and head size 128).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
    "1.3b": dict(n_layer=24, n_head=16, n_embd=2048, block_size=2048),
    "2.7b": dict(n_layer=32, n_head=32, n_embd=2560, block_size=2048),
    "6.7b": dict(n_layer=32, n_head=32, n_embd=4096, block_size=2048),
    "13b": dict(n_layer=40, n_head=40, n_embd=5120, block_size=2048),
}


def preset(name: str, vocab_size: int, **overrides: Any) -> GPTConfig:
    """The preset `name` for a tokenizer of `vocab_size` ids, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return GPTConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
