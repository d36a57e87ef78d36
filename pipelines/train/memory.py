"""Memory per device of a training stage, estimated from first principles (for `relaygpt plan`).

  weights + gradients + AdamW states, by precision (16-bit: 2 + 2 + 12 bytes per parameter,
  the 12 being the fp32 master copy and both moments; fp32: 4 + 4 + 8) and divided by the
  data-parallel size where ZeRO shards them (1: optimizer states, 2: + gradients, 3: + weights;
  offload moves the optimizer states to the host);
  activations per micro-batch and layer ~ 34 x seq x micro x hidden bytes in 16-bit (Korthikanti
  et al. 2022, without the attention matrix that SDPA never stores), doubled in fp32; with
  activation checkpointing every k layers, only the layer inputs at checkpoints plus one
  segment; in the 1F1B schedule stage i keeps up to (pp - i) micro-batches in flight;
  the fp32 logits and their gradient on the last stage.
Estimates, not measurements: they are meant to catch a layout that cannot fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage's estimate, in bytes per device."""

    stage: int
    layers: str
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    flops_per_step: float  # training FLOPs one device of this stage does per optimizer step

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def stage_memory(plan) -> list[StageMemory]:
    """Per pipeline stage of a TrainPlan: what one device of that stage holds, for the partition
    the engine will impose (model/partition.py)."""
    from model.partition import layer_params, stage_flops

    config, ds = plan.model, plan.settings.deepspeed
    pp, dp, seq, micro = plan.pipeline_stages, plan.data_parallel, plan.seq_len, plan.micro_batch
    parts = list(plan.stage_layers)
    sizes = layer_params(config, pp)
    flops = stage_flops(config, parts, seq)
    c, v = config.n_embd, config.padded_vocab_size
    half = plan.precision in ("bf16", "fp16")
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if half else (4, 4, 8)
    act_bytes = 34 * seq * micro * c * (1 if half else 2)
    out = []
    for i in range(pp):
        start, stop = parts[i], parts[i + 1]
        blocks = sum(1 for layer in range(start, stop) if 2 <= layer < config.n_layer + 2)
        first_block = max(start, 2) - 2
        params = sum(sizes[start:stop])
        weights, grads, opt = params * w_bytes, params * g_bytes, params * o_bytes
        if plan.zero_stage >= 1:
            opt /= dp
        if plan.zero_stage >= 2:
            grads /= dp
        if plan.zero_stage >= 3:
            weights /= dp
        if ds.offload_optimizer:
            opt = 0.0
        k = ds.activation_checkpoint_interval
        per_micro = blocks * act_bytes if not k else (math.ceil(blocks / k) * seq * micro * c * w_bytes + min(k, blocks) * act_bytes)
        in_flight = min(plan.grad_accum, pp - i) if pp > 1 else 1
        logits = (micro * seq * v * 4 * 2) if stop == config.n_layer + 4 else 0.0
        layers = f"{first_block}-{first_block + blocks - 1}" if blocks else "-"
        out.append(StageMemory(i, layers, params, weights, grads, opt, per_micro * in_flight, logits, flops[i] * plan.tokens_per_step / dp))
    return out
