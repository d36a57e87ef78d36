"""GPTConfig validation, presets and the parameter / FLOP arithmetic."""

import re

import pytest

from helpers import ARCHITECTURES, tiny_config
from model.config import PRESETS, GPTConfig, preset
from model.errors import ConfigError
from model.gpt import GPT


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_embd=100, n_head=3), "model.n_embd (100) must be divisible by model.n_head (3)"),
        (dict(n_head=4, n_kv_head=3), "model.n_head (4) must be divisible by model.n_kv_head (3)"),
        (dict(n_layer=0), "model.n_layer must be a positive integer"),
        (dict(vocab_size=-5), "model.vocab_size must be a positive integer"),
        (dict(position="alibi"), "model.position must be one of learned, rope"),
        (dict(norm="batchnorm"), "model.norm must be one of layernorm, rmsnorm"),
        (dict(mlp="relu"), "model.mlp must be one of gelu, swiglu"),
        (dict(dropout=1.5), "model.dropout must be in [0, 1)"),
        (dict(n_embd=30, n_head=6, position="rope"), "needs an even head size"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    base = dict(vocab_size=100, n_layer=2, n_head=4, n_embd=64)
    with pytest.raises(ValueError, match=re.escape(field)):
        GPTConfig(**{**base, **changes})


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        GPTConfig(vocab_size=100, n_layer=2, n_head=4, n_embd=64, position="x", norm="y", mlp="z")
    assert all(name in str(info.value) for name in ("model.position", "model.norm", "model.mlp"))


def test_config_is_frozen():
    cfg = tiny_config(100)
    with pytest.raises(Exception):
        cfg.n_layer = 3  # type: ignore[misc]


def test_vocab_padded_to_multiple_of_64():
    assert tiny_config(50257).padded_vocab_size == 50304
    assert tiny_config(4096).padded_vocab_size == 4096


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_num_params_matches_the_module(arch):
    cfg = tiny_config(1000, **ARCHITECTURES[arch])
    model = GPT(cfg)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, published", [("gpt2-124m", 124e6), ("gpt2-350m", 350e6), ("gpt2-774m", 774e6), ("gpt2-1.5b", 1.5e9)])
def test_gpt2_presets_match_published_sizes(name, published):
    count = preset(name, vocab_size=50257).num_params()
    assert abs(count - published) / published < 0.05, f"{name}: {count / 1e6:.1f}M"


@pytest.mark.parametrize("name, published", [("1.3b", 1.3e9), ("2.7b", 2.7e9), ("6.7b", 6.7e9), ("13b", 13e9)])
def test_gpt3_presets_match_published_sizes(name, published):
    count = preset(name, vocab_size=50257).num_params()
    assert abs(count - published) / published < 0.05, f"{name}: {count / 1e9:.2f}B"


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        assert preset(name, vocab_size=50257).problems() == []
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        preset("gpt5", vocab_size=10)


def test_flops_per_token_counts_forward_and_backward_matmuls():
    cfg = tiny_config(1000)
    # Count the multiply-adds of one forward pass of one token by hand, then x3 (fwd + bwd).
    c, h, L, T, V = cfg.n_embd, cfg.mlp_hidden, cfg.n_layer, 16, cfg.padded_vocab_size
    matmul_weights = L * (c * 3 * c + c * c + c * h + h * c) + c * V
    attention = L * 2 * T * c  # q.k and att.v, each c per key
    expected = 3 * 2 * (matmul_weights + attention)
    bias_and_norm = cfg.num_params(include_embeddings=False) - L * (c * 3 * c + c * c + c * h + h * c)
    assert cfg.flops_per_token(T) == pytest.approx(expected + 6 * bias_and_norm)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key"):
        GPTConfig.from_dict({"vocab_size": 10, "n_layers": 2})
    cfg = tiny_config(10)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
