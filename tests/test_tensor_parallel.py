"""Tensor parallelism (model/tensor_parallel.py): slices join back to the whole weights, bad
layouts are refused before launch in one line, and under gloo a tp 2 layout trains, exports and
resumes like tp 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from distributed import run_distributed
from jobs.spec import JobError, load_job
from model.config import GPTConfig
from model.errors import RelayError
from model.gpt import GPT
from model.tensor_parallel import shard, shard_layout, tensor_parallel_problems, unshard
from pipelines.train.tensor_parallel import check_checkpoint_layout
from tp_workers import tensor_parallel_layouts

# Qwen-like on purpose: GQA (2 KV heads of 4 split too), SwiGLU (gate and up split apart), biases
# on every projection (a row-parallel bias is added once), tied embeddings (the head is the
# embedding's own slice), a vocabulary padded to 256 rows.
TINY = dict(vocab_size=250, pad_vocab_multiple=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
            position="rope", mlp="swiglu", norm="rmsnorm", bias=True, tie_embeddings=True)


@pytest.mark.parametrize("size", [2, 4])
def test_every_weight_cut_into_slices_joins_back(size):
    config = GPTConfig(**{**TINY, "n_kv_head": 4})
    for name, weight in GPT(config).named_parameters():
        layout = shard_layout(config, name)
        parts = [shard(weight, layout, rank, size) for rank in range(size)]
        assert torch.equal(unshard(parts, layout), weight), name
        if layout is not None:
            assert sum(p.numel() for p in parts) == weight.numel(), name
    # the query slice of rank 1 holds heads 2..3 of 4 at tp 2 (not rows 2..3 of q, k, v together)
    c_attn = GPT(config).transformer.h[0].attn.c_attn.weight
    q_rows = config.n_head * config.head_dim
    assert torch.equal(shard(c_attn, shard_layout(config, "transformer.h.0.attn.c_attn.weight"), 1, 2)[: q_rows // 2],
                       c_attn[q_rows // 2: q_rows])


def test_models_that_do_not_split_are_named():
    problems = tensor_parallel_problems(GPTConfig(**{**TINY, "n_kv_head": 1, "vocab_size": 251, "pad_vocab_multiple": 1}), 2)
    assert any(p.startswith("n_kv_head 1 is not divisible by tensor_parallel 2") for p in problems), problems
    assert any(p.startswith("padded_vocab_size 251 is not divisible") for p in problems), problems


def _job(tmp_path, stage: dict, workers: int = 4, **model) -> str:
    data = {"name": "s", "model": {"preset": "tiny", "n_layer": 4, **model}, "tokenizer": {"encoding": "gpt2"},
            "data": {"pretrain": {"sources": [{"type": "synthetic"}]}},
            "stages": {"pretrain": {"steps": 5, **stage}}, "cluster": {"num_workers": workers}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("stage, workers, model, words", [
    ({"deepspeed": {"tensor_parallel": 3}}, 3, {}, "stages.pretrain.deepspeed.tensor_parallel: n_head 4 is not divisible by tensor_parallel 3"),
    ({"deepspeed": {"tensor_parallel": 2}}, 3, {}, "cluster.num_workers: 3 workers is not a multiple of stages.pretrain.deepspeed.pipeline_stages (1) x tensor_parallel (2)"),
    ({"deepspeed": {"tensor_parallel": 2, "zero_stage": 2}}, 4, {}, "stages.pretrain.deepspeed.zero_stage: ZeRO-2 is not supported with tensor_parallel 2"),
    ({"deepspeed": {"tensor_parallel": 2, "zero_stage": 3}}, 4, {}, "stages.pretrain.deepspeed.zero_stage: ZeRO-3 is not supported"),
    ({"deepspeed": {"tensor_parallel": 2, "pipeline_stages": 2, "zero_stage": 2}}, 4, {}, "ZeRO-2 cannot be combined with pipeline_stages 2"),
    ({"deepspeed": {"tensor_parallel": 2}, "compile": "model"}, 4, {}, "stages.pretrain.compile: 'model' is not supported with tensor_parallel 2"),
    ({"deepspeed": {"tensor_parallel": 2}, "lora": {"rank": 4}}, 4, {}, "stages.pretrain.lora: adapters are not implemented with tensor_parallel 2"),
    ({"deepspeed": {"tensor_parallel": 4}}, 4, {"n_kv_head": 2}, "n_kv_head 2 is not divisible by tensor_parallel 4"),
    ({"deepspeed": {"tensor_parallel": 2}, "compile": "blocks"}, 4, {}, "stages.pretrain.compile: 'blocks' is not supported"),
    ({"deepspeed": {"sequence_parallel": 3}}, 3, {}, "stages.pretrain.deepspeed.sequence_parallel: n_head 4 is not divisible by sequence_parallel 3"),
    ({"deepspeed": {"sequence_parallel": 2, "tensor_parallel": 2}}, 4, {}, "sequence_parallel: 2 runs with pipeline_stages 1 and tensor_parallel 1 only"),
    ({"deepspeed": {"sequence_parallel": 2, "zero_stage": 3}}, 4, {}, "stages.pretrain.deepspeed.zero_stage: ZeRO-3 is not verified with sequence_parallel 2"),
    ({"deepspeed": {"sequence_parallel": 2}}, 3, {}, "3 workers is not a multiple of stages.pretrain.deepspeed.pipeline_stages (1) x sequence_parallel (2) = 2"),
])
def test_bad_tensor_parallel_layouts_are_refused_in_one_line(tmp_path, stage, workers, model, words):
    with pytest.raises(JobError) as info:
        load_job(_job(tmp_path, stage, workers, **model))
    line = next(line for line in str(info.value).splitlines() if words in line)
    assert "job.yaml:" in line, line


def test_a_checkpoint_from_another_tensor_parallel_size_is_refused(tmp_path):
    tag = tmp_path / "step-10"
    tag.mkdir()
    for rank in range(2):
        (tag / f"mp_rank_{rank:02d}_model_states.pt").write_bytes(b"")
    check_checkpoint_layout(str(tmp_path), "step-10", 2)
    with pytest.raises(RelayError, match=r"written at tensor_parallel 2 and this run has 1; resume with deepspeed.tensor_parallel 2"):
        check_checkpoint_layout(str(tmp_path), "step-10", 1)


def test_split_layouts_train_export_and_resume_like_one_device(tmp_path):
    """One launch of 4 gloo processes, every rank reading the same rows (so any data-parallel
    size computes what one process does), rows packed with documents kept apart that cross every
    split: tp 1 x dp 4 (ZeRO-1) is the reference for
    - tp 2 x dp 2, ZeRO-1 (optimizer state sharded over the 2 data ranks only; DeepSpeed clips)
      and ZeRO-0 (the engine clips; the clip is tight, so a wrong norm shows) with every block
      recomputed in the backward pass (its all-reduces run again);
    - tp 2 x pp 2, ZeRO-1 (with DeepSpeed's activation checkpointing) and ZeRO-0 (the tied
      embedding's slices on the first and last stage);
    - sp 2 x dp 2, ZeRO-1 (each rank runs half of every row; positions and masks of whole rows).
    Same initial export bytes, same losses and gradient norms for 20 steps, the same trained
    weights, and the last layout (tp 2 x pp 2) resumed half-way in a new engine continues exactly."""
    # (sequence parallelism before the layouts that hand DeepSpeed a grid: DeepSpeed keeps the last
    # engine's grid in a global, and one process of a real run builds one engine)
    layouts = [{"zero_stage": 1}, {"zero_stage": 1, "sequence_parallel": 2}, {"zero_stage": 1, "tensor_parallel": 2},
               {"zero_stage": 0, "tensor_parallel": 2, "activation_checkpoint_interval": 1},
               {"zero_stage": 1, "tensor_parallel": 2, "pipeline_stages": 2, "activation_checkpoint_interval": 1},
               {"zero_stage": 0, "tensor_parallel": 2, "pipeline_stages": 2}]
    results = run_distributed(tensor_parallel_layouts, 4, TINY, layouts, 20, str(tmp_path / "ckpt"), True)
    runs = results[0]["runs"]
    assert [(r["tp"], r["dp"]) for r in runs] == [(1, 4), (1, 2), (2, 2), (2, 2), (2, 1), (2, 1)]
    assert [r["runs"][1]["dp_rank"] for r in results] == [0, 0, 1, 1]  # the sequence axis is innermost
    assert [r["runs"][2]["dp_rank"] for r in results] == [0, 0, 1, 1]  # so is the model axis
    reference = runs[0]
    for layout, run in zip(layouts[1:], runs[1:]):
        assert run["initial"] == reference["initial"], layout  # the gathered slices are the tp 1 weights, bit for bit
        assert np.allclose(run["losses"], reference["losses"], atol=1e-4, rtol=0), (layout, run["losses"], reference["losses"])
        assert np.allclose(run["grad_norms"], reference["grad_norms"], rtol=1e-4), (layout, run["grad_norms"], reference["grad_norms"])
        for name, weight in reference["trained"].items():
            assert np.allclose(run["trained"][name], weight, atol=1e-3, rtol=0), (layout, name)  # (Adam at lr 1e-2 magnifies rounding)
    assert reference["losses"][-1] < reference["losses"][0] - 0.5  # it learned something
    assert max(reference["grad_norms"]) > 0.3  # and the clip (0.3) was at work
    resumed, straight = results[0]["resumed"], runs[-1]["losses"][10:]
    assert np.allclose(resumed, straight, atol=1e-6, rtol=0), (resumed, straight)


def test_the_plan_counts_each_ranks_slices(tmp_path):
    """Memory per rank (ZeRO-0, so only tp divides): GPT-2 124M at tp 2 holds about half the weights,
    gradients and optimizer state (norms and position embeddings stay whole), and a 1/tp slice of the logits; a vocabulary that does not split is refused."""
    from pathlib import Path

    from model.errors import ConfigError
    from pipelines.train.memory import stage_memory
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    config = GPTConfig(vocab_size=50304, block_size=256, n_layer=12, n_head=12, n_embd=768)

    def plan(tp, model=config):
        settings = TrainStageSpec(steps=1, micro_batch=4, deepspeed={"zero_stage": 0, "tensor_parallel": tp})
        return plan_training("pretrain", settings, model, world_size=2, seq_len=256, device="cpu", data_dir=Path("."),
                             init_model=None, seed=0)

    split = plan(2)
    one, two = stage_memory(plan(1))[0], stage_memory(split)[0]
    assert split.data_parallel == 1 and split.loss_kernel == "vocab-parallel"
    for term in ("weights", "gradients", "optimizer"):
        assert 0.49 < getattr(two, term) / getattr(one, term) < 0.51, term
    assert two.logits < one.logits and two.activations < one.activations
    with pytest.raises(ConfigError, match=r"^stages.pretrain.deepspeed.tensor_parallel: padded_vocab_size 50257 is not divisible"):
        plan(2, GPTConfig(vocab_size=50257, pad_vocab_multiple=1, block_size=256, n_layer=2, n_head=4, n_embd=64))
    def sequence_plan(sp, seq_len=256):
        settings = TrainStageSpec(steps=1, micro_batch=4, deepspeed={"zero_stage": 0, "sequence_parallel": sp})
        return plan_training("pretrain", settings, config, world_size=sp, seq_len=seq_len, device="cpu", data_dir=Path("."),
                             init_model=None, seed=0)

    whole, halves = stage_memory(sequence_plan(1))[0], stage_memory(sequence_plan(2))[0]
    assert halves.activations == whole.activations / 2 and halves.logits == whole.logits / 2 and halves.weights == whole.weights
    assert halves.flops_per_step == whole.flops_per_step / 2
    settings = TrainStageSpec(steps=1, deepspeed={"sequence_parallel": 4})
    with pytest.raises(ConfigError, match=r"^stages.pretrain.deepspeed.sequence_parallel: seq_len 30 is not divisible by sequence_parallel 4"):
        plan_training("pretrain", settings, config, world_size=4, seq_len=30, device="cpu", data_dir=Path("."), init_model=None, seed=0)
