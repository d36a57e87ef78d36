"""Memory per device of a training stage, estimated from first principles (for `relaygpt plan`).

What one device of a stage holds at its peak, in the terms of `torch.cuda.max_memory_allocated`
(tensors alive, not allocator slack):
  weights and gradients in the training precision, divided by the data-parallel size where
  ZeRO shards them (3: weights; 1 and 2: gradients, because DeepSpeed reduces each bucket
  straight into the owning rank's partition, so ZeRO-1 holds no more gradients than ZeRO-2);
  the optimizer: AdamW's two fp32 moments, plus an fp32 master copy of the weights wherever
  DeepSpeed keeps one (16-bit training, and every ZeRO stage even in fp32), sharded from
  ZeRO-1 on; offload moves it to the host;
  DeepSpeed's buffers: ZeRO's gradient bucket (`reduce_bucket_size` elements, allocated whole)
  and ZeRO-3's gathered weights (up to `stage3_max_live_parameters`); without ZeRO, the flat
  copy of the gradients that the data-parallel all-reduce makes after the backward pass;
  activations per micro-batch and layer ~ 34 x seq x micro x hidden bytes in 16-bit (Korthikanti
  et al. 2022, without the attention matrix that SDPA never stores), doubled in fp32; with
  activation checkpointing every k layers, only the layer inputs at checkpoints plus one
  segment; packed rows that keep documents apart add their boolean attention mask; in the
  1F1B schedule stage i keeps up to (pp - i) micro-batches in flight;
  the logits and their gradient on the last stage (in the loss kernel's precision, `_logits_memory`).
With LoRA (`lora:`) only the adapters have gradients and optimizer state; the frozen weights count once.
ZeRO counts as the stage DeepSpeed runs (`TrainPlan.deepspeed_zero_stage`).
With tensor parallelism (tp) each rank holds its slices of the split weights (and their
gradients and optimizer state) plus the whole norms and row-parallel biases
(model/tensor_parallel.py: local_layer_params); the activations per layer fall to
(10 + 24 / tp) x seq x micro x hidden bytes in 16-bit (Korthikanti et al.: the layer inputs
and norms stay whole, including the all-reduced copies of each row-parallel output, which are
the communication buffers tp adds); the logits and the vocab-parallel loss's fp32 softmax are
a 1/tp slice of the vocabulary; the FLOPs per rank are 1/tp of the replica's.
With sequence parallelism (sp) each rank runs seq / sp tokens of every row: activations, the
document mask's rows and the logits are 1/sp (plus, per block, the all-to-all's received q, k,
v copies, which replace the local ones: the same size); ZeRO shards over dp x sp ranks (each is
a data-parallel replica to DeepSpeed) and the FLOPs per rank are 1/sp.
The buffers used during the backward pass add to the activations; the all-reduce copy and the
pipeline's bucket (allocated after the backward pass) replace them at the peak. Measured against
the profiler's allocation peak on CPU: within 21 % for ZeRO 0-3 and pp 2 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GIB = 1024**3
DEFAULT_BUCKET = 500_000_000      # DeepSpeed's reduce / all-reduce bucket, elements
DEFAULT_MAX_LIVE = 1_000_000_000  # DeepSpeed's stage3_max_live_parameters


@dataclass(frozen=True)
class StageMemory:
    """One pipeline stage's estimate, in bytes per device."""

    stage: int
    layers: str
    params: int
    weights: float
    gradients: float
    optimizer: float
    buffers: float      # DeepSpeed's gradient bucket, gathered ZeRO-3 weights, the all-reduce copy
    activations: float
    logits: float
    flops_per_step: float  # training FLOPs one device of this stage does per optimizer step
    buffers_with_activations: bool = True  # False: the buffers replace the activations at the peak

    @property
    def total(self) -> float:
        held = self.weights + self.gradients + self.optimizer
        if self.buffers_with_activations:
            return held + self.buffers + self.activations + self.logits
        return held + max(self.buffers, self.activations + self.logits)


def stage_memory(plan) -> list[StageMemory]:
    """Per pipeline stage of a TrainPlan: what one device of that stage holds, for the partition
    the engine will impose (model/partition.py) and the DeepSpeed config it will run with."""
    parts = plan.stage_layers
    return [segment_memory(plan, i, parts[i], parts[i + 1]) for i in range(plan.pipeline_stages)]


def segment_memory(plan, stage: int, start: int, stop: int) -> StageMemory:
    """What one device of pipeline stage `stage` would hold with pipeline layers start..stop-1
    (any cut: the partition search asks about cuts the plan does not have yet)."""
    from model.partition import layer_flops, layer_params

    config, ds = plan.model, plan.settings.deepspeed
    zero = plan.deepspeed_config.get("zero_optimization", {})
    sp = getattr(plan, "sequence_parallel", 1)
    pp, dp, seq = plan.pipeline_stages, plan.data_parallel * sp, plan.seq_len // sp
    micro = plan.micro_batch * plan.settings.rows_per_example  # rows in one forward (DPO: chosen and rejected of each pair)
    c, v = config.n_embd, config.padded_vocab_size
    half = plan.precision in ("bf16", "fp16")
    w_bytes = g_bytes = 2 if half else 4
    zero_stage = plan.deepspeed_zero_stage
    master = 4 if (half or zero_stage >= 1) else 0
    tp = getattr(plan, "tensor_parallel", 1)
    act_bytes = (10 + 24 / tp) * seq * micro * c * (1 if half else 2)
    blocks = sum(1 for layer in range(start, stop) if 2 <= layer < config.n_layer + 2)
    first_block = max(start, 2) - 2
    if tp > 1:
        from model.tensor_parallel import local_layer_params

        params = sum(local_layer_params(config, tp, pp)[start:stop])
    else:
        params = sum(layer_params(config, pp)[start:stop])
    trainable = params
    if plan.settings.lora is not None:  # frozen base weights: gradients and optimizer state for the adapters only
        from model.lora import lora_param_count

        lora = plan.settings.lora
        trainable = blocks * lora_param_count(config, lora.rank, lora.targets) // config.n_layer
        params += trainable
    weights, grads, opt = params * w_bytes, trainable * g_bytes, trainable * (master + 8)
    if zero_stage >= 1:
        opt /= dp
        grads /= dp
    if zero_stage >= 3:
        weights /= dp
    if ds.offload_optimizer:
        opt = 0.0
    if zero_stage >= 1:
        buffers = min(zero.get("reduce_bucket_size", DEFAULT_BUCKET), trainable) * g_bytes
        if zero_stage >= 3:
            buffers += min(zero.get("stage3_max_live_parameters", DEFAULT_MAX_LIVE), params) * w_bytes
    else:
        buffers = min(DEFAULT_BUCKET, trainable) * g_bytes if dp > 1 else 0.0
    k = ds.activation_checkpoint_interval
    per_micro = blocks * act_bytes if not k else (math.ceil(blocks / k) * seq * micro * c * w_bytes + min(k, blocks) * act_bytes)
    if plan.separate_documents and blocks:  # the (micro, 1, seq, seq) boolean document mask: one per
        per_micro += micro * seq * seq * sp * (blocks if pp > 1 else 1)  # forward, or per block in a stage
    in_flight = min(plan.grad_accum, pp - stage) if pp > 1 else 1
    logits = _logits_memory(plan, micro * seq, v // tp) if stop == config.n_layer + 4 else 0.0
    layers = f"{first_block}-{first_block + blocks - 1}" if blocks else "-"
    flops = sum(layer_flops(config, seq * sp)[start:stop])  # per token of whole rows; / dp below counts the sp ranks too
    return StageMemory(stage, layers, params, weights, grads, opt, buffers, per_micro * in_flight, logits,
                       flops * plan.tokens_per_step / dp / tp, buffers_with_activations=zero_stage >= 1 and pp == 1)


CHUNK_ELEMENTS = 1 << 26  # DeepSpeed's chunked cross entropy works on blocks of about this many fp32 values


def _logits_memory(plan, rows: int, vocab: int) -> float:
    """The LM head's output and its gradient on the last stage. In fp32 the cross entropy keeps
    the logits and its log-softmax; in 16-bit the loss (compiled with the model, or DeepSpeed's
    chunked kernel) keeps only the 16-bit logits and writes a 16-bit gradient, the chunked
    kernel with one block of fp32 temporaries on CPUs (none with Triton on GPUs)."""
    if plan.loss_kernel == "vocab-parallel":  # logits (training precision) and their gradient, the fp32 softmax kept for backward
        return rows * vocab * (2 * (2 if plan.precision in ("bf16", "fp16") else 4) + 4)
    if plan.loss_kernel == "fp32":
        return rows * vocab * 4 * 2
    held = rows * vocab * 2 * 2
    if plan.loss_kernel == "chunked" and plan.device != "cuda":
        held += min(rows * vocab, CHUNK_ELEMENTS) * 4 * 2
    return held
