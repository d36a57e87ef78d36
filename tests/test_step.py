"""The training step as a GPU sees it: a loss that needs no fp32 logits, gradients clipped on the
device, and nothing read back to the host except once per logged step (issue 19)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_workers import clipped_losses, reads_while_training
from distributed import run_distributed
from train_helpers import prepared_run

IGNORE = -100
TINY = {"vocab_size": 256, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 64}


def _logits_and_labels(dtype, vocab=1000, rows=96):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, rows // 4, vocab, generator=g) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (4, rows // 4), generator=g)
    labels[0, :5] = IGNORE  # prompt tokens outside the loss, as in SFT
    return logits, labels


def _reference(logits, labels):
    """The fp32 reference: cross entropy of the logits upcast to fp32."""
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=IGNORE, reduction="sum")
    return total / (flat != IGNORE).sum()


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-3), (torch.float32, 1e-5)])
def test_the_chunked_loss_and_its_gradient_equal_the_fp32_reference(dtype, tol):
    from pipelines.train.optim import chunked_lm_loss

    logits, labels = _logits_and_labels(dtype)
    loss = chunked_lm_loss(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    reference = _reference(logits, labels)
    (ref_grad,) = torch.autograd.grad(reference, logits)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - reference.item()) <= tol * abs(reference.item())
    assert grad.dtype == dtype  # written in the logits' own precision, never an fp32 copy
    # Per element, against the reference gradient rounded to the same precision (what the
    # eager path hands back after its fp32 softmax).
    assert torch.allclose(grad.float(), ref_grad.float(), rtol=tol, atol=tol * ref_grad.float().abs().max().item())
    assert not grad[0, :5].any()  # ignored positions get no gradient


def test_a_batch_without_supervised_tokens_gives_zero_not_nan():
    from model.gpt import lm_loss
    from pipelines.train.optim import chunked_lm_loss

    logits = torch.randn(2, 8, 50, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.full((2, 8), IGNORE)
    for loss_fn in (lm_loss, chunked_lm_loss):
        loss = loss_fn(logits, labels)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and not grad.any()


def test_the_plan_names_the_loss_kernel_and_the_compile_scope():
    from pathlib import Path

    from model.config import GPTConfig
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    def plan(device, **stage):
        settings = TrainStageSpec(steps=1, **stage)
        return plan_training("pretrain", settings, GPTConfig(**TINY), world_size=1, seq_len=32, device=device,
                             data_dir=Path("."), init_model=None, seed=0)

    gpu, cpu = plan("cuda"), plan("cpu")
    assert (gpu.compile, gpu.loss_kernel, gpu.precision) == ("model", "compiled", "bf16")
    assert (cpu.compile, cpu.loss_kernel, cpu.precision) == ("off", "fp32", "fp32")
    eager_bf16 = plan("cuda", compile="off")
    assert eager_bf16.loss_kernel == "chunked" and plan("cpu", compile=True).compile == "model"
    # ZeRO-0 in bf16 on one GPU runs DeepSpeed's ZeRO-1 optimizer, and the plan says so.
    zero0 = plan("cuda", deepspeed={"zero_stage": 0})
    assert zero0.zero_stage == 0 and zero0.deepspeed_zero_stage == 1
    assert zero0.deepspeed_config["zero_optimization"]["stage"] == 1 and zero0.clip_in_optimizer
    assert any("runs DeepSpeed's ZeRO-1 optimizer" in note for note in zero0.engine_notes)
    assert plan("cpu", deepspeed={"zero_stage": 0}).deepspeed_zero_stage == 0
    # Nothing in the rendered config makes DeepSpeed wait for the device every step.
    config = gpu.deepspeed_config
    assert config["timers"]["throughput"]["enabled"] is False and config["bf16"]["check_grad_overflow"] is False
    assert config["gradient_clipping"] == 0.0 and gpu.clip_in_optimizer  # clipped by the engine, on the device


# (layout overrides, reads DeepSpeed itself makes per step). ZeRO-3 checks the norm it clips by
# on the host every step, as does ZeRO-1/2 in fp32; the engine reads once per logged step.
LAYOUTS = {
    "zero0-fp32": ([], 0),
    "zero0-bf16": (["stages.pretrain.deepspeed.precision=bf16"], 0),
    "zero1-bf16": (["stages.pretrain.deepspeed.zero_stage=1", "stages.pretrain.deepspeed.precision=bf16"], 0),
    "zero2-bf16": (["stages.pretrain.deepspeed.zero_stage=2", "stages.pretrain.deepspeed.precision=bf16"], 0),
    "zero3-bf16": (["stages.pretrain.deepspeed.zero_stage=3", "stages.pretrain.deepspeed.precision=bf16"], 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_step_reads_the_device_once_per_logged_step(engine_job, tmp_path, layout):
    """Steps 5-14, logged every 5, through the real Trainer loop: 2 reads, both in Engine.read;
    what DeepSpeed reads itself (ZeRO-3) is exactly one per step, counted apart."""
    overrides, deepspeed_per_step = LAYOUTS[layout]
    job_path, template, _ = engine_job
    run = prepared_run(job_path, template, tmp_path / "run")
    steps = 10
    out = run_distributed(reads_while_training, 1, str(job_path),
                          [*overrides, "stages.pretrain.steps=20", "stages.pretrain.log_every=5"], str(run), 4, steps)[0]
    ours = {where: n for where, n in out["reads"].items() if "engine.py" in where or "trainer.py" in where}
    theirs = {where: n for where, n in out["reads"].items() if where not in ours}
    assert sum(ours.values()) == steps // 5, out
    assert all(where.startswith("tolist engine.py") for where in ours), out
    assert sum(theirs.values()) == deepspeed_per_step * steps, out


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_the_engine_clips_bf16_zero_gradients_as_deepspeed_would(zero_stage):
    """Under ZeRO-1/2 in bf16 the engine scales each group's gradient partition by DeepSpeed's
    global norm on the device: the same training as DeepSpeed's own clipping, over 2 ranks (so
    the norm spans both ranks' partitions), and not the same as no clipping at all."""
    stage = {"micro_batch": 2, "optimizer": {"lr": 1e-2, "grad_clip": 0.05},
             "deepspeed": {"zero_stage": zero_stage, "precision": "bf16"}}
    runs = run_distributed(clipped_losses, 2, TINY, stage, 6, ["planned", "deepspeed", "none"])[0]
    engine, deepspeed, none = runs["planned"], runs["deepspeed"], runs["none"]
    assert engine["clip_in_optimizer"] and not deepspeed["clip_in_optimizer"]
    assert engine["losses"] == pytest.approx(deepspeed["losses"], rel=2e-3)
    assert engine["grad_norms"] == pytest.approx(deepspeed["grad_norms"], rel=2e-3)
    assert min(engine["grad_norms"]) > 0.05  # clipping was active on every step
    assert abs(engine["losses"][-1] - none["losses"][-1]) > 1e-3
