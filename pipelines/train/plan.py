"""The resolved plan of a training stage: every number a worker needs, derived once.

The driver builds a `TrainPlan` per training stage from the job (jobs/plan.py) and ships it to
every worker (as gpt-neox ships its resolved config); the engine, the trainer, the memory
model, `relaygpt plan` and the sweep read it, and nothing downstream derives these numbers
again. The arithmetic lives in the small functions below, which the job validator uses too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.config import GPTConfig
from model.partition import layer_params, stage_boundaries
from pipelines.rundir import RunDir
from pipelines.train.settings import TrainStageSpec


def data_parallel_size(world_size: int, pipeline_stages: int, tensor_parallel: int = 1, sequence_parallel: int = 1) -> int:
    """Replicas reading different rows: world = pipeline x tensor x sequence x data-parallel.
    Callers validate divisibility first."""
    model_ranks = pipeline_stages * tensor_parallel * sequence_parallel
    assert world_size % model_ranks == 0, (world_size, pipeline_stages, tensor_parallel, sequence_parallel)
    return world_size // model_ranks


def total_steps(settings: TrainStageSpec, tokens_per_step: int) -> int:
    """The stage's budget in optimizer steps: `steps`, or `tokens` rounded up to whole steps."""
    return settings.steps or math.ceil(settings.tokens / tokens_per_step)


def resolve_precision(requested: str, device: str) -> str:
    """`auto` is bf16 on GPUs and fp32 on CPUs; anything else is taken as written."""
    if requested != "auto":
        return requested
    return "bf16" if device == "cuda" else "fp32"


def resolve_compile(requested: str, device: str) -> str:
    """`auto` compiles the whole model on GPUs (the head and the loss fuse with it, and the GPU
    waits less for the host) and nothing on CPUs, where compiling costs more start-up than it
    gains (docs/PERFORMANCE.md)."""
    if requested != "auto":
        return requested
    return "model" if device == "cuda" else "off"


def runs_zero_stage(zero_stage: int, precision: str, data_parallel: int, pipeline_stages: int) -> int:
    """The ZeRO stage DeepSpeed is configured with. As written, except ZeRO-0 in bf16 on one
    data-parallel rank without a pipeline, which runs DeepSpeed's ZeRO-1 optimizer: with one rank
    it partitions nothing, so it holds what ZeRO-0 holds, while DeepSpeed's ZeRO-0 bf16 optimizer
    copies every gradient on its own and checks each one for overflow on the host (measured on an
    H200: 121 ms per step against ZeRO-1's 102)."""
    if zero_stage == 0 and precision == "bf16" and data_parallel == 1 and pipeline_stages == 1:
        return 1
    return zero_stage


def loss_kernel(precision: str, compile_scope: str, tensor_parallel: int = 1) -> str:
    """How the cross entropy runs: `compiled` (the fp32 reference expression, fused by the
    compiler with the LM head, so fp32 logits never exist in memory), `chunked` (DeepSpeed's
    chunked cross entropy on 16-bit logits: Triton on CUDA, blocks of rows elsewhere; the fp32
    softmax is never materialised), `fp32` (logits already in fp32: the plain cross entropy) or
    `vocab-parallel` (tensor parallelism: each rank's slice of the logits, never gathered)."""
    if tensor_parallel > 1:
        return "vocab-parallel"
    if compile_scope == "model":
        return "compiled"
    return "chunked" if precision in ("bf16", "fp16") else "fp32"


def clips_in_optimizer(settings: TrainStageSpec, precision: str, zero_stage: int) -> bool:
    """Whether the engine clips the gradients itself, on the device (pipelines/train/engine.py),
    instead of DeepSpeed. `zero_stage` is the stage DeepSpeed runs (runs_zero_stage).

    Without ZeRO in fp32 DeepSpeed clips but does not report the norm. Under ZeRO-1/2 in bf16 at
    pipeline 1 DeepSpeed's clipping reads the norm on the host every step to check it is finite
    (a stall of the GPU), while its optimizer already holds the global norm, on the device, before
    its per-group steps: the engine scales each group by it there, and nothing is read back."""
    if settings.optimizer.grad_clip <= 0:
        return False
    if zero_stage == 0 and precision == "fp32":
        return True
    ds = settings.deepspeed
    return (zero_stage in (1, 2) and precision == "bf16" and ds.pipeline_stages == 1 and not ds.offload_optimizer
            and ds.tensor_parallel == 1)


DEEPSPEED_BUCKET = 500_000_000  # DeepSpeed's default reduce / all-gather bucket, in elements
DEEPSPEED_PREFETCH = 50_000_000  # and its default ZeRO-3 prefetch bucket


def deepspeed_config(settings: TrainStageSpec, data_parallel: int, precision: str, device: str,
                     stage_params: int | None = None, zero_stage: int | None = None) -> dict:
    """The DeepSpeed config dict of a stage (users never write DeepSpeed JSON by hand).

    `stage_params`: the most parameters one pipeline stage holds. ZeRO allocates its gradient
    bucket whole (`reduce_bucket_size` elements, 1.9 GiB in fp32 at DeepSpeed's default) the
    first time it reduces, whatever the model's size: a bucket never needs to be larger than
    every gradient it could hold, so it is capped there (measured on a 90M model in fp32: the
    peak of allocated tensors under ZeRO-1 fell from 3.05 to 1.51 GiB; `deepspeed.extra` still wins)."""
    ds = settings.deepspeed
    zero_stage = ds.zero_stage if zero_stage is None else zero_stage
    config: dict = {
        "train_micro_batch_size_per_gpu": settings.micro_batch,
        "gradient_accumulation_steps": settings.grad_accum,
        "train_batch_size": settings.micro_batch * settings.grad_accum * data_parallel,
        "gradient_clipping": 0.0 if clips_in_optimizer(settings, precision, zero_stage) else settings.optimizer.grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronises the device at the start
        # and end of every micro-step; the trainer measures its own step time.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "zero_allow_untested_optimizer": True,
    }
    if zero_stage and stage_params:
        bucket = min(DEEPSPEED_BUCKET, stage_params)
        config["zero_optimization"].update(reduce_bucket_size=bucket, allgather_bucket_size=bucket)
        if zero_stage == 3:
            config["zero_optimization"]["stage3_prefetch_bucket_size"] = min(DEEPSPEED_PREFETCH, stage_params)
    if ds.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
        # DeepSpeed's CPU Adam steps the host copy; a torch AdamW may stand in where it cannot build.
        config["zero_force_ds_cpu_optimizer"] = False
    if precision == "bf16":
        # No loss scale in bf16, so nothing to skip a step for: the overflow check would read
        # every step's gradients back to the host (DeepSpeed turned it on by default only in 0.16).
        config["bf16"] = {"enabled": True, "check_grad_overflow": False}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if ds.pipeline_stages > 1 and ds.activation_checkpoint_interval:
        config["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass(frozen=True)
class TrainPlan:
    """One training stage (pretrain or SFT), resolved.

    model: the architecture with the real vocabulary of the run's tokenizer (for SFT from an
        init model: that model's architecture, its vocabulary grown to the tokenizer's).
    settings: the stage's section of the job as written (optimizer, schedules, DeepSpeed
        knobs); the numbers below are what those settings resolve to.
    """

    stage: str
    model: GPTConfig
    settings: TrainStageSpec
    world_size: int
    pipeline_stages: int
    data_parallel: int          # world_size / (pipeline_stages x tensor_parallel)
    zero_stage: int
    micro_batch: int
    grad_accum: int
    global_batch: int           # micro_batch x grad_accum x data_parallel sequences per step
    seq_len: int                # tokens per training sequence
    tokens_per_step: int        # global_batch x seq_len (x 2 for DPO's pairs)
    total_steps: int
    device: str                 # cpu | cuda
    precision: str              # fp32 | bf16 | fp16
    clip_in_optimizer: bool     # the engine clips on the device, not DeepSpeed (clips_in_optimizer)
    stage_layers: tuple[int, ...]  # first pipeline layer of each stage, then the end (model/partition.py)
    deepspeed_config: dict[str, Any]
    data_dir: Path              # the prepared shards of this stage
    init_model: Path | None     # the model directory the stage starts from (None: fresh weights)
    seed: int
    deepspeed_zero_stage: int   # the ZeRO stage DeepSpeed runs (runs_zero_stage)
    compile: str                # model | blocks | off (resolve_compile)
    loss_kernel: str            # compiled | chunked | fp32 (loss_kernel)
    partition_note: str = ""    # why the pipeline cut is not the plain compute balance, when it is not
    separate_documents: bool = False  # packed rows keep their documents apart (data.<stage>.separate_documents)
    tensor_parallel: int = 1    # ranks each layer is split over (deepspeed.tensor_parallel)
    sequence_parallel: int = 1  # ranks each row's tokens are split over (deepspeed.sequence_parallel)

    @property
    def engine_notes(self) -> list[str]:
        """Which code paths run, in words (printed by `relaygpt plan` and at the start of a stage)."""
        notes = [f"compile {self.compile}; loss {self.loss_kernel}; gradients clipped by "
                 + ("the engine on the device" if self.clip_in_optimizer else "DeepSpeed" if self.settings.optimizer.grad_clip else "nothing (grad_clip 0)")]
        if self.tensor_parallel > 1:
            tp, dp = self.tensor_parallel, self.data_parallel
            notes.append(f"tensor parallel {tp} (model/tensor_parallel.py): each rank holds {self.model.n_head // tp} of "
                         f"{self.model.n_head} heads, 1/{tp} of the MLP width and of the vocabulary; a tensor group is {tp} consecutive "
                         f"ranks (keep it within a node); {dp} data-parallel replica(s) average gradients"
                         + (f" and shard ZeRO-1 state over {dp}" if self.deepspeed_zero_stage == 1 and dp > 1 else "")
                         + "; 2 all-reduces of (micro x seq x n_embd) per block each way; the loss never gathers the logits")
        if self.sequence_parallel > 1:
            sp = self.sequence_parallel
            notes.append(f"sequence parallel {sp} (model/sequence_parallel.py): each rank runs {self.seq_len // sp} of every row's "
                         f"{self.seq_len} tokens; per block 2 all-to-alls of q, k, v each way give attention all tokens of "
                         f"{self.model.n_head // sp} heads; the {sp} ranks of a group average gradients like data-parallel replicas")
        lora = self.settings.lora
        if lora is not None:
            from model.lora import lora_param_count

            trainable = lora_param_count(self.model, lora.rank, lora.targets)
            notes.append(f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {', '.join(lora.targets)}: {trainable:,} trainable "
                         f"parameters of {self.model.num_params() + trainable:,}; the export merges them into the weights")
        if self.deepspeed_zero_stage != self.zero_stage:
            notes.append(f"ZeRO-{self.zero_stage} in {self.precision} on one data-parallel rank runs DeepSpeed's "
                         f"ZeRO-{self.deepspeed_zero_stage} optimizer: one rank partitions nothing, and it skips the per-gradient "
                         "copies and host checks of DeepSpeed's ZeRO-0 bf16 optimizer")
        return notes

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.total_steps


def _check_split_layout(stage: str, model: GPTConfig, tp: int, sp: int, seq_len: int) -> None:
    """Refuse, in one line, a model that tensor / sequence parallelism cannot split (what needs the
    tokenizer's vocabulary or the resolved sequence length; the job checks the rest)."""
    from model.errors import ConfigError
    from model.sequence_parallel import sequence_parallel_problems
    from model.tensor_parallel import tensor_parallel_problems

    for field, problems in (("tensor_parallel", tensor_parallel_problems(model, tp)),
                            ("sequence_parallel", sequence_parallel_problems(model, sp, seq_len))):
        if problems:
            raise ConfigError(f"stages.{stage}.deepspeed.{field}: {problems[0]}")


def plan_training(stage: str, settings: TrainStageSpec, model: GPTConfig, *, world_size: int, seq_len: int, device: str,
                  data_dir: Path, init_model: Path | None, seed: int, memory_budget: float | None = None,
                  separate_documents: bool = False) -> TrainPlan:
    """Resolve one stage's settings on a layout of `world_size` processes.

    `memory_budget`: bytes one device may use (cluster.device_memory_gb on GPUs). When the
    compute-balanced pipeline cut would put a stage over it, the cut is the most balanced one
    in which every stage fits (pipelines/train/memory.py estimates each candidate); when none
    fits, the compute cut stays and the fit check reports the stage."""
    pp, tp, sp = settings.deepspeed.pipeline_stages, settings.deepspeed.tensor_parallel, settings.deepspeed.sequence_parallel
    dp = data_parallel_size(world_size, pp, tp, sp)
    global_batch = settings.micro_batch * settings.grad_accum * dp
    tokens_per_step = global_batch * settings.rows_per_example * seq_len  # DPO: a pair is two rows
    precision = resolve_precision(settings.deepspeed.precision, device)
    zero_stage = runs_zero_stage(settings.deepspeed.zero_stage, precision, dp, pp)
    compile_scope = resolve_compile(settings.compile, device) if tp == sp == 1 else "off"  # (the job refuses compile with tp, sp)
    method = settings.deepspeed.partition_method
    parts = stage_boundaries(model, pp, method, seq_len) if pp > 1 else (0, model.n_layer + 4)

    _check_split_layout(stage, model, tp, sp, seq_len)
    steps = total_steps(settings, tokens_per_step)
    if settings.optimizer.warmup_steps > steps:  # a budget in tokens: steps are known only now
        from model.errors import ConfigError

        raise ConfigError(f"stages.{stage}.optimizer.warmup_steps: {settings.optimizer.warmup_steps} is more than the stage's "
                          f"{steps} steps ({settings.tokens} tokens at {tokens_per_step} per step); at most {steps}")

    def render(cut) -> dict:
        sizes = layer_params(model, pp)
        largest = max(sum(sizes[a:b]) for a, b in zip(cut, cut[1:]))
        if settings.lora is not None and zero_stage < 3:  # only the adapters have gradients to bucket;
            # ZeRO-3 keeps the whole count: its prefetch bucket gathers the frozen weights too
            from model.lora import lora_param_count

            largest = lora_param_count(model, settings.lora.rank, settings.lora.targets)
        # DeepSpeed counts every rank of a sequence-parallel group as a data-parallel replica (they average gradients)
        return deepspeed_config(settings, dp * sp, precision, device, largest, zero_stage)

    plan = TrainPlan(
        stage=stage, model=model, settings=settings, world_size=world_size, pipeline_stages=pp, data_parallel=dp,
        zero_stage=settings.deepspeed.zero_stage, micro_batch=settings.micro_batch, grad_accum=settings.grad_accum,
        global_batch=global_batch, seq_len=seq_len, tokens_per_step=tokens_per_step,
        total_steps=steps, device=device, precision=precision,
        clip_in_optimizer=clips_in_optimizer(settings, precision, zero_stage), stage_layers=tuple(parts),
        deepspeed_config=render(parts),
        data_dir=Path(data_dir), init_model=None if init_model is None else Path(init_model), seed=seed,
        separate_documents=separate_documents, deepspeed_zero_stage=zero_stage, compile=compile_scope,
        loss_kernel=loss_kernel(precision, compile_scope, tp), tensor_parallel=tp, sequence_parallel=sp,
    )
    if memory_budget and pp > 1 and method == "compute":
        plan = _cut_to_fit(plan, memory_budget, render)
    _check_adapted_stages(plan)
    return plan


def _cut_to_fit(plan: TrainPlan, memory_budget: float, render) -> TrainPlan:
    """`plan` with the most balanced pipeline cut in which every stage fits `memory_budget`, when
    its compute-balanced cut puts a stage over it; `render(cut)` is the DeepSpeed config of a cut."""
    from pipelines.train.memory import segment_memory, stage_memory

    over = [m.stage for m in stage_memory(plan) if m.total > memory_budget]
    if not over:
        return plan
    try:
        cut = stage_boundaries(plan.model, plan.pipeline_stages, "compute", plan.seq_len,
                               fits=lambda s, a, b: segment_memory(plan, s, a, b).total <= memory_budget)
    except ValueError:
        return plan  # nothing fits: the compute cut, and the fit check names the stage
    return replace(plan, stage_layers=tuple(cut), deepspeed_config=render(cut),
                   partition_note=f"the compute-balanced cut puts stage {over[0]} over the device memory; "
                                  "this is the most balanced cut that fits")


def _check_adapted_stages(plan: TrainPlan) -> None:
    """LoRA in a pipeline: every stage must hold a block, or it would have nothing to train (and
    the first stage's output no gradient to send back)."""
    if plan.settings.lora is None or plan.pipeline_stages == 1:
        return
    n_layer, cut = plan.model.n_layer, plan.stage_layers
    for stage, (start, stop) in enumerate(zip(cut, cut[1:])):
        if not any(2 <= layer < n_layer + 2 for layer in range(start, stop)):
            from model.errors import ConfigError

            raise ConfigError(f"stages.{plan.stage}.lora: pipeline stage {stage} (layers {start}..{stop - 1}) holds no transformer "
                              f"block, so it has no adapter to train; use fewer pipeline_stages than {plan.pipeline_stages}")


@dataclass(frozen=True)
class RunPlan:
    """A whole job, resolved on the driver: what `relaygpt plan` prints and every worker reads.

    job: the resolved job (every default filled in), recorded as job.yaml and in TensorBoard.
    """

    job_name: str
    seed: int
    run_dir: RunDir
    vocab_size: int
    vocab_exact: bool           # False before a trained tokenizer exists: vocab_size is its target
    device: str
    training: dict[str, TrainPlan]
    job: dict[str, Any]
    tracking: Any = None        # pipelines/train/tracking.py TrackingPlan: MLflow / W&B beside TensorBoard, or None
    eval: Any = None            # the eval stage's EvalPlan (pipelines/eval/settings.py), None without one
    data: Any = None            # the data stage's DataPlan (pipelines/data/data_plan.py)

    def stage(self, name: str) -> TrainPlan:
        return self.training[name]
