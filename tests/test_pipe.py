"""The PipelineModule cut of the model computes the same loss as the plain GPT."""

import pytest
import torch

from helpers import ARCHITECTURES
from dist_workers import pipeline_layout, pipeline_losses
from distributed import run_distributed
from model.config import GPTConfig
from model.gpt import GPT
from model.partition import layer_of
from model.pipe import gpt_key


def _reference_loss(config_kwargs, batch_seed):
    config = GPTConfig(**config_kwargs)
    torch.manual_seed(0)
    model = GPT(config)
    g = torch.Generator().manual_seed(batch_seed)
    x = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    y = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    with torch.no_grad():
        return model(x, labels=y)[1].item()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_pipeline_1_and_2_stages_match_gpt_loss(arch):
    kwargs = dict(vocab_size=300, block_size=32, n_layer=4, n_head=4, n_embd=64, **ARCHITECTURES[arch])
    expected = _reference_loss(kwargs, batch_seed=7)
    results = run_distributed(pipeline_losses, 2, kwargs, [1, 2], 7)
    for rank, losses in enumerate(results):
        for stages, loss in losses.items():
            assert abs(loss - expected) < 1e-5, f"rank {rank}, {stages} stage(s): {loss} vs {expected}"


def test_pipeline_names_map_to_gpt_names():
    config = GPTConfig(vocab_size=300, block_size=32, n_layer=3, n_head=4, n_embd=64)
    assert gpt_key(config, "tied_modules.embed.wte.weight") == "transformer.wte.weight"
    assert gpt_key(config, "1.wpe.weight") == "transformer.wpe.weight"
    assert gpt_key(config, "2.attn.c_attn.weight") == "transformer.h.0.attn.c_attn.weight"
    assert gpt_key(config, "4.mlp.c_fc.bias") == "transformer.h.2.mlp.c_fc.bias"
    assert gpt_key(config, "5.ln_f.weight") == "transformer.ln_f.weight"
    assert gpt_key(config, "6.lm_head.weight") == "lm_head.weight"
    names = set(GPT(config).state_dict())
    assert {gpt_key(config, k) for k in ["0.wte.weight", "5.ln_f.bias"]} <= names


@pytest.mark.slow
def test_each_stage_builds_only_its_layers_where_the_partition_says():
    """A large vocabulary: the compute partition gives the last stage fewer blocks, DeepSpeed cuts
    exactly there, and each rank holds the parameters of its own layers and nothing else."""
    from model.partition import stage_boundaries

    kwargs = dict(vocab_size=8000, block_size=32, n_layer=4, n_head=4, n_embd=64)
    config = GPTConfig(**kwargs)
    parts = stage_boundaries(config, 2, "compute", 32)
    assert parts[1] - 2 > config.n_layer - (parts[1] - 2)  # more blocks on the first stage
    for rank, held in enumerate(run_distributed(pipeline_layout, 2, kwargs, 2, "compute")):
        assert held["parts"] == parts
        mine = range(parts[rank], parts[rank + 1])
        expected = {name for name in GPT(config).state_dict() if name != "lm_head.weight"
                    and layer_of(config, name) in mine}
        got = {gpt_key(config, name) for name in held["params"]}
        assert got - {"transformer.wte.weight"} == expected - {"transformer.wte.weight"}, rank
        assert ("transformer.wte.weight" in got) == (0 in mine or config.n_layer + 3 in mine)  # the tied embedding / head

