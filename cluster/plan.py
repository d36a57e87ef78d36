"""`relaygpt plan`: topology, batch arithmetic and memory per pipeline stage, before any run.

Memory per device is estimated from first principles:
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
import os
from dataclasses import dataclass, field

# Ids of the standard encodings (base ranks + their own special tokens) plus relaygpt's chat tokens.
STANDARD_VOCAB = {"gpt2": 50257 + 4, "r50k_base": 50257 + 4, "p50k_base": 50281 + 4, "cl100k_base": 100277 + 4, "o200k_base": 200019 + 4}
GIB = 1024**3


@dataclass
class StageMemory:
    stage: int
    layers: str
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


@dataclass
class StagePlan:
    name: str
    pp: int
    dp: int
    micro_batch: int
    grad_accum: int
    seq_len: int
    total_steps: int | None
    precision: str
    zero_stage: int
    memory: list[StageMemory] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.dp

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def vocab_size_of(job) -> int:
    spec = job.tokenizer
    if spec.train is not None:
        return spec.train.vocab_size
    if spec.encoding:
        return STANDARD_VOCAB[spec.encoding]
    try:
        from model.tokenizer import Tokenizer

        return Tokenizer.load(job.path(spec.file or spec.dir)).n_vocab
    except Exception:
        return 50261


def _split_blocks(n_layer: int, pp: int) -> list[int]:
    base, extra = divmod(n_layer, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def stage_memory(config, spec, dp: int, precision: str) -> list[StageMemory]:
    ds = spec.deepspeed
    pp = ds.pipeline_stages
    c, v = config.n_embd, config.padded_vocab_size
    block = (config.num_params(include_embeddings=False) - (2 * c if config.norm == "layernorm" and config.bias else c)) // config.n_layer
    embed = v * c + (config.block_size * c if config.position == "learned" else 0)
    head = v * c
    half = precision in ("bf16", "fp16")
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if half else (4, 4, 8)
    act_bytes = 34 * (spec.seq_len or config.block_size) * spec.micro_batch * c * (1 if half else 2)
    seq = spec.seq_len or config.block_size
    out, first = [], 0
    for i, blocks in enumerate(_split_blocks(config.n_layer, pp)):
        params = blocks * block
        if i == 0:
            params += embed
        if i == pp - 1:
            params += 2 * c + (head if (not config.tie_embeddings or pp > 1) else 0)
        weights, grads, opt = params * w_bytes, params * g_bytes, params * o_bytes
        if ds.zero_stage >= 1:
            opt /= dp
        if ds.zero_stage >= 2:
            grads /= dp
        if ds.zero_stage >= 3:
            weights /= dp
        if ds.offload_optimizer:
            opt = 0.0
        k = ds.activation_checkpoint_interval
        per_micro = blocks * act_bytes if not k else (math.ceil(blocks / k) * seq * spec.micro_batch * c * w_bytes + min(k, blocks) * act_bytes)
        in_flight = min(spec.grad_accum, pp - i) if pp > 1 else 1
        logits = (spec.micro_batch * seq * v * 4 * 2) if i == pp - 1 else 0.0
        out.append(StageMemory(i, f"{first}-{first + blocks - 1}" if blocks else "-", params, weights, grads, opt, per_micro * in_flight, logits))
        first += blocks
    return out


def plan_job(job) -> tuple[list[StagePlan], list[str]]:
    """A plan per training stage and the problems found (empty when it can run)."""
    from pipelines.engine import resolve_precision

    config = job.model.config(vocab_size_of(job))
    workers = job.cluster.num_workers
    device = "cuda" if job.cluster.gpus_per_worker > 0 else "cpu"
    plans, problems = [], []
    for name in ("pretrain", "sft"):
        spec = getattr(job.stages, name)
        if spec is None:
            continue
        pp = spec.deepspeed.pipeline_stages
        dp = max(1, workers // pp)
        precision = spec.deepspeed.precision if spec.deepspeed.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
        seq = spec.seq_len or (job.data.sft.seq_len if name == "sft" and job.data.sft and job.data.sft.seq_len else config.block_size)
        steps = spec.steps or math.ceil(spec.tokens / (spec.micro_batch * spec.grad_accum * dp * seq))
        plan = StagePlan(name, pp, dp, spec.micro_batch, spec.grad_accum, seq, steps, precision, spec.deepspeed.zero_stage)
        plan.memory = stage_memory(config, spec.model_copy(update={"seq_len": seq}), dp, precision)
        budget = device_memory(job)
        if budget is not None:
            for mem in plan.memory:
                if mem.total > budget:
                    problems.append(f"stages.{name}: pipeline stage {mem.stage} needs ~{mem.total / GIB:.1f} GiB per device, more than the "
                                    f"{budget / GIB:.0f} GiB available; raise pipeline_stages or zero_stage, enable activation "
                                    "checkpointing or offload, or lower micro_batch")
        plans.append(plan)
    return plans, problems


def device_memory(job) -> float | None:
    cluster = job.cluster
    if cluster.gpus_per_worker > 0:
        return cluster.device_memory_gb * GIB if cluster.device_memory_gb else None
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None
    return host / max(1, cluster.num_workers) if not cluster.address else None


def format_plan(job, plans: list[StagePlan], problems: list[str]) -> str:
    config = job.model.config(vocab_size_of(job))
    c = job.cluster
    lines = [f"job {job.name}: {job.model.preset} ({config.num_params() / 1e6:.1f}M parameters, {config.n_layer} layers), "
             f"{c.num_workers} worker(s) x {c.cpus_per_worker:g} CPU" + (f" + {c.gpus_per_worker:g} GPU" if c.gpus_per_worker else "")
             + f", placement {c.placement}, {'Ray at ' + c.address if c.address else 'embedded Ray'}"]
    for p in plans:
        lines.append(f"\n[{p.name}] data {p.dp} x pipe {p.pp}  (ZeRO-{p.zero_stage}, {p.precision})")
        lines.append(f"  global batch {p.global_batch} = micro {p.micro_batch} x accum {p.grad_accum} x data-parallel {p.dp}"
                     f"; {p.tokens_per_step:,} tokens/step x {p.total_steps} steps = {p.tokens_per_step * (p.total_steps or 0):,} tokens")
        if p.pp > 1:
            lines.append(f"  1F1B with {p.grad_accum} micro-batches: ideal bubble (m + p - 1)/m = {(p.grad_accum + p.pp - 1) / p.grad_accum:.2f}x")
        lines.append("  stage  layers   params     weights   grads   optimizer  activations  logits   total")
        for m in p.memory:
            lines.append(f"  {m.stage:>5}  {m.layers:>7}  {m.params / 1e6:>7.1f}M  {m.weights / GIB:>7.2f}  {m.gradients / GIB:>6.2f}  "
                         f"{m.optimizer / GIB:>9.2f}  {m.activations / GIB:>11.2f}  {m.logits / GIB:>6.2f}  {m.total / GIB:>6.2f} GiB")
    budget = device_memory(job)
    lines.append(f"\ndevice memory: {budget / GIB:.1f} GiB per worker" if budget else
                 "\ndevice memory: unknown (set cluster.device_memory_gb to check GPU fit)")
    lines.append("problems:\n  " + "\n  ".join(problems) if problems else "no problems found")
    return "\n".join(lines)
