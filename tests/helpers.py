"""Small shared helpers for tests (importable from any test module)."""

from __future__ import annotations


def tiny_config(vocab_size: int, **overrides):
    from model.config import GPTConfig

    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=64)
    return GPTConfig(**{**base, **overrides})


# Architectures every numerics test runs on: GPT-2 style and the modern variant.
ARCHITECTURES = {
    "gpt2": {},
    "modern": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
}
