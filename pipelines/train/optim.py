"""What a training step optimises with: the loss (plain or DeepSpeed's chunked cross entropy),
the parameter groups, AdamW (fused, or DeepSpeed's CPU Adam for an offloaded optimizer) and
the learning-rate schedule. pipelines/train/engine.py puts them together."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from model.gpt import IGNORE_INDEX, lm_loss
from pipelines.train.settings import OptimizerSpec


def chunked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`model.gpt.lm_loss` through DeepSpeed's chunked cross entropy: the same fp32 arithmetic,
    but the fp32 softmax of (tokens x vocabulary) is never materialised (a Triton kernel reads
    the 16-bit logits once on CUDA; elsewhere blocks of rows at a time) and the gradient is
    written in the logits' own precision."""
    from deepspeed.runtime.chunked_cross_entropy import chunked_cross_entropy

    flat = labels.reshape(-1)
    total = chunked_cross_entropy(logits.reshape(-1, logits.size(-1)), flat, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (flat != IGNORE_INDEX).sum().clamp(min=1)


def loss_function(kernel: str):
    """The loss a plan's `loss_kernel` names (pipelines/train/plan.py: loss_kernel)."""
    return chunked_lm_loss if kernel == "chunked" else lm_loss


def param_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and norm weights do not. (A ZeRO-3 parameter built
    under zero.Init is an empty placeholder locally: its real shape is `ds_shape`.)"""
    decay, no_decay, seen = [], [], set()
    for _, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    # An empty group is left out (LoRA trains matrices only): DeepSpeed's ZeRO optimizers drop it,
    # and the scheduler would then count more groups than the optimizer has.
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(groups: list[dict], opt: OptimizerSpec, *, offload: bool, device_type: str):
    """(AdamW for these parameter groups, its name for the record).

    With the optimizer offloaded, DeepSpeed's CPU Adam (vectorised C++) steps the host copy;
    where it cannot be built (no compiler), a torch AdamW does, and the name says so."""
    if offload:
        try:
            from pipelines.train.ops import cpu_adam

            say = (lambda line: print(f"relaygpt: {line}", flush=True)) if not dist.is_initialized() or dist.get_rank() == 0 else (lambda line: None)
            return cpu_adam(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, say=say), "DeepSpeedCPUAdam"
        except Exception as exc:  # the op is JIT-compiled: a missing compiler surfaces here
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]
            return (torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps),
                    f"torch AdamW on the host (DeepSpeed's CPU Adam did not build: {reason})")
    # Fused on every device: one kernel for every parameter, and its step counts stay where the
    # parameters are (the unfused AdamW reads each parameter's step count back to the host).
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True), "AdamW (fused)"


def lr_multiplier(opt: OptimizerSpec, total_steps: int):
    """step -> lr / opt.lr: linear warmup, then cosine / linear decay to min_lr_ratio, or constant."""

    def fn(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        if opt.schedule == "constant":
            return 1.0
        span = max(1, total_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if opt.schedule == "cosine" else 1 - progress
        return opt.min_lr_ratio + (1 - opt.min_lr_ratio) * shape

    return fn
