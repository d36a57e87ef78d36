"""One facade in front of DeepSpeed: the plain GPT (pp = 1, any ZeRO stage) or the
PipelineModule (pp > 1, ZeRO <= 1), trained, evaluated, checkpointed and exported the same way.

This module and `model/pipe.py` are the only places that import deepspeed (besides the names of
the classes a checkpoint may hold, `pipelines/train/checkpoint.py`). Everything here
receives rank and world size from torch.distributed, which the launcher (Ray Train or
torchrun) has set up through the usual environment variables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from model.errors import RelayError
from model.gpt import GPT
from pipelines.train import tensor_parallel as split  # (imports deepspeed only inside its functions)
from pipelines.train.checkpoint import WeightsOnlyLoading
from pipelines.train.export_weights import WeightExport
from pipelines.train.optim import build_optimizer, loss_function, lr_multiplier, param_groups


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    pp: int
    dp: int
    dp_rank: int
    stage_id: int
    tp: int = 1       # tensor-parallel ranks per model replica (pipelines/train/tensor_parallel.py)

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.pp - 1

    @property
    def needs_data(self) -> bool:
        """Pipeline engines read batches on the first stage (inputs) and last stage (labels)."""
        return self.is_first_stage or self.is_last_stage


@dataclass
class StepOutput:
    """What one optimizer step leaves, on the device: nothing is read back to the host until
    a logged step asks for it (`Engine.read`), so the host never waits for the GPU mid-run.

    loss: this rank's mean loss over its micro-batches (a pipeline: the data-parallel mean);
    grad_norm: the global gradient norm before clipping, or None where DeepSpeed keeps it.
    """

    loss: torch.Tensor
    grad_norm: torch.Tensor | float | None
    lr: float
    extras: torch.Tensor | None = None  # an objective's statistics (DPO's rewards), the mean over micro-batches


def build_sharded(plan, init_state: dict | None):
    """The GPT for ZeRO-3, built under `deepspeed.zero.Init`: each module's parameters are
    partitioned as soon as the module exists, so no rank ever holds the whole model. The
    initial weights (the pipeline's seeded ones, or `init_state`) are then written into the
    shards: every rank makes each weight in turn (the same on every rank: seeded, or read) and
    keeps only its own slice, so nothing is gathered or sent."""
    import deepspeed

    from model.pipe import pipeline_initial_weights
    from pipelines.train.distributed import map_large_allocations

    map_large_allocations()  # what each rank frees (whole weights, once sliced) leaves its memory
    # The parameter dtype comes from the config (bf16 / fp16 sections, else fp32). Passing
    # `dtype` is worse than useless: DeepSpeed 0.19 reads it as `(dtype or fp16) if the
    # accelerator has fp16 else bf16`, so on a CPU it gave bf16 weights for an fp32 run.
    with deepspeed.zero.Init(config_dict_or_path=dict(plan.deepspeed_config)):
        module = GPT(plan.model, initialize=False, loss_fn=loss_function(plan.loss_kernel))  # every weight is written below
    params = dict(module.named_parameters())  # a tied head is the embedding: one entry
    source = init_state.items() if init_state is not None else pipeline_initial_weights(plan.model, plan.seed)
    with torch.no_grad():
        for name, value in source:
            if name in params:  # not the tied head (already the embedding)
                _write_own_slice(params[name], value)
    if plan.settings.lora is not None:
        # The adapters are partitioned as they are made (each is small: A is initialised whole, the
        # same on every rank, then sliced); the base weights they take over are shards already.
        with deepspeed.zero.Init(config_dict_or_path=dict(plan.deepspeed_config)):
            _apply_lora(module, plan)
    return module


def _apply_lora(module, plan) -> None:
    from model.lora import apply_lora

    lora = plan.settings.lora
    apply_lora(module, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets, seed=plan.seed)


def _write_own_slice(param, full: torch.Tensor) -> None:
    """Copy this rank's part of `full` into a ZeRO-3 parameter's shard (the flattened tensor,
    padded to a multiple of the group size, split evenly in rank order, as DeepSpeed partitions it)."""
    shard = param.ds_tensor
    size = shard.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    stop = min(start + size, param.ds_numel)
    if stop > start:
        shard.data[: stop - start].copy_(full.reshape(-1)[start:stop])


def without_frozen_aliases(engine):
    """The engine's `module_state_dict`, leaving every name of a frozen parameter out of an
    adapter-only checkpoint. DeepSpeed's own exclusion walks `named_parameters()`, which names a
    tied head once (as the embedding), so `lm_head.weight` stayed: the whole embedding matrix in
    a checkpoint meant to hold the adapters (and, resumed, merely loaded over itself)."""
    original = engine.module_state_dict
    frozen = [name for name, param in engine.module.named_parameters(remove_duplicate=False) if not param.requires_grad]

    def module_state_dict(*args, exclude_frozen_parameters: bool = False, **kwargs):
        state = original(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        if exclude_frozen_parameters and state is not None:
            for name in frozen:
                state.pop(name, None)
        return state

    return module_state_dict


class Engine(WeightExport):
    """A DeepSpeed engine over a GPT, with one `train_step` whatever the parallel layout."""

    def __init__(self, plan, *, init_state: dict | None) -> None:
        """`plan`: the stage's TrainPlan (layout, batch, precision, DeepSpeed config), resolved on the driver."""
        import deepspeed

        self.plan = plan
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if plan.device != self.device_type:
            raise RelayError(f"the run was planned for {plan.device} workers but this worker has {self.device_type}: "
                             "set cluster.gpus_per_worker to match the machines")
        if plan.precision == "bf16" and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RelayError(f"stages.{plan.stage}.deepspeed.precision: this GPU has no bf16; set precision to fp16 or fp32")
        self.grid = None  # DeepSpeed's process grid when tensor parallelism needs one
        if plan.tensor_parallel > 1 and plan.pipeline_stages == 1:
            self.grid = split.make_grid(plan.pipeline_stages, plan.tensor_parallel, plan.data_parallel)
        self.sp = None  # this rank's sequence-parallel group, when rows are split
        module = self._build_module(init_state)
        self.compiled_blocks = self._compile(module)
        opt = plan.settings.optimizer
        if self.device_type == "cuda" and plan.deepspeed_zero_stage < 3:
            module.to(torch.device("cuda", torch.cuda.current_device()))  # a fused AdamW wants its parameters on the GPU
        groups = param_groups(module.named_parameters(), opt.weight_decay)  # trainable parameters only (LoRA: the adapters)
        # Counted now: a ZeRO optimizer puts its flat partitions in these groups' place.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for group in groups for p in group["params"]
                        if not getattr(p, "ds_pipe_replicated", False))
        optimizer, self.optimizer_name = build_optimizer(groups, opt,
                                                         offload=plan.settings.deepspeed.offload_optimizer, device_type=self.device_type)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(opt, plan.total_steps))
        self.last_grad_norm: torch.Tensor | None = None
        if plan.clip_in_optimizer:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._clip(opt))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=dict(plan.deepspeed_config),
            mpu=self.grid if not self.pipelined_plan else None)  # a PipelineModule brings its own grid
        # DeepSpeed's loader unpickles with weights_only=False; checkpoints are read without running code.
        self.engine.checkpoint_engine = WeightsOnlyLoading(self.engine.checkpoint_engine)
        if self.frozen_base and plan.pipeline_stages == 1:  # a pipeline saves by layer, the tied head with none
            self.engine.module_state_dict = without_frozen_aliases(self.engine)
        world, rank = plan.world_size, dist.get_rank()
        if plan.pipeline_stages > 1:
            grid = self.engine.grid
            self.topology = Topology(world, rank, plan.pipeline_stages, plan.data_parallel, grid.get_data_parallel_id(), grid.get_stage_id(),
                                     plan.tensor_parallel)
        elif self.grid is not None:
            self.topology = Topology(world, rank, 1, plan.data_parallel, self.grid.get_data_parallel_id(), 0, plan.tensor_parallel)
        elif self.sp is not None:  # the ranks of a group read the same rows
            self.topology = Topology(world, rank, 1, plan.data_parallel, rank // plan.sequence_parallel, 0)
        else:
            self.topology = Topology(world, rank, 1, world, rank, 0)
        self.trainable_params = self._count_trainable(trainable)

    def _count_trainable(self, own: int) -> int:
        """Parameters the optimizer steps in the whole model, from this rank's `own` count (a tied
        embedding's replicated copy left out): a pipeline sums its stages (a collective there)."""
        if not self.pipelined:
            return own
        total = torch.tensor(own, dtype=torch.int64, device=self.reduce_device)
        dist.all_reduce(total, group=self.engine.grid.get_pipe_parallel_group())
        return int(total.item())

    def _build_module(self, init_state: dict | None) -> torch.nn.Module:
        """This rank's part of the model: a pipeline stage's layers, ZeRO-3 shards, or the whole GPT
        (with activation checkpointing applied from outside where the plan asks for it)."""
        from model.pipe import build_pipeline, init_like_pipeline, load_gpt_state

        plan, config = self.plan, self.plan.model
        interval = plan.settings.deepspeed.activation_checkpoint_interval
        loss_fn = loss_function(plan.loss_kernel)
        if plan.pipeline_stages > 1:
            from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

            if plan.compile == "model":
                loss_fn = torch.compile(loss_fn)  # the stage's layers are compiled one by one (_compile)
            module = build_pipeline(config, plan.pipeline_stages, parts=plan.stage_layers, loss_fn=loss_fn,
                                    topology=PipeModelDataParallelTopology(num_pp=plan.pipeline_stages, num_mp=plan.tensor_parallel,
                                                                           num_dp=plan.data_parallel),
                                    activation_checkpoint_interval=interval, seed=plan.seed)
            if init_state is not None:
                load_gpt_state(module, config, init_state)
            if plan.tensor_parallel > 1:
                from model.pipe import parallelize_stage
                self.grid = module._grid
                parallelize_stage(module, config, split.tp_group_of(self.grid))
            if plan.settings.lora is not None:  # after the base weights are in place, before compile
                from model.pipe import adapt_stage

                lora = plan.settings.lora
                adapt_stage(module, config, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets, seed=plan.seed)
            # DeepSpeed sums gradient norms over the model-parallel group (pipe x tensor) but counts
            # only the parameters marked model-parallel (or on model-parallel rank 0), which would
            # leave every later stage out of the global norm used for clipping. Mark each stage's
            # own parameters (a weight every tensor-parallel rank holds whole: on tensor rank 0
            # only); the replicated copy of a tied embedding stays unmarked, so it counts once.
            whole_counts = self.grid is None or self.grid.get_slice_parallel_rank() == 0
            for param in module.parameters():
                if not getattr(param, "ds_pipe_replicated", False):
                    param.model_parallel = getattr(param, "tensor_model_parallel", False) or whole_counts
            return module
        if self.grid is not None:
            module = split.build_tensor_parallel(plan, init_state, self.grid, loss_fn)
        elif plan.deepspeed_zero_stage == 3:
            module = build_sharded(plan, init_state)
        else:
            module = GPT(config, loss_fn=loss_fn)
            if init_state is not None:
                module.load_state_dict(init_state, strict=True)
            else:
                init_like_pipeline(module, plan.seed)
            if plan.settings.lora is not None:  # after the base weights are in place; before recompute and compile wrap the blocks
                _apply_lora(module, plan)
        module, self.sp = split.split_sequences(plan, module)
        if interval:
            from pipelines.train.recompute import checkpoint_blocks

            checkpoint_blocks(module, interval)
        return module

    def _compile(self, module: torch.nn.Module) -> int:
        """torch.compile what the plan says (`compile`: model | blocks | off); returns the
        number of transformer blocks that run compiled."""
        from pipelines.train.recompute import compile_blocks, compile_stage

        if self.plan.compile == "blocks":
            return compile_blocks(module)
        if self.plan.compile != "model":
            return 0
        if self.plan.pipeline_stages > 1:
            return compile_stage(module)
        module.compile()  # one graph: embeddings, blocks, head and loss
        return self.plan.model.n_layer

    @torch.no_grad()
    def _clip(self, optimizer) -> None:
        """Clip to the global gradient norm on the device: the coefficient min(1, clip / norm) is a
        tensor, so nothing is read back to the host. Called before the optimizer updates.

        Without ZeRO (fp32) the norm is this rank's parameters (the same on every data-parallel
        rank), summed over pipeline stages. Under ZeRO-1/2 DeepSpeed steps each parameter group on
        its own, with only that group's gradient partition in place, after computing the global
        norm of every group (`_global_grad_norm`, which DeepSpeed's own engine reads too): each
        group is scaled by that norm when its turn comes."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        if self.plan.deepspeed_zero_stage == 0:
            # A tied embedding's copy on the last pipeline stage counts once (on the first), and is scaled like it.
            own = [(p, g) for p, g in zip(params, grads) if not getattr(p, "ds_pipe_replicated", False)]
            squares = torch.stack([g.detach().float().pow(2).sum() for _, g in own]).sum() if own else torch.zeros(())
            if self.grid is not None:
                squares = split.squared_norm([p for p, _ in own], [g for _, g in own], self.grid.get_slice_parallel_group())
            if self.pipelined:
                squares = squares.to(self.reduce_device)
                dist.all_reduce(squares, group=self.engine.grid.get_pipe_parallel_group())
            norm = squares.sqrt()
        else:
            norm = self.engine.optimizer._global_grad_norm
        self.last_grad_norm = norm
        coef = (self.plan.settings.optimizer.grad_clip / (norm + 1e-6)).clamp(max=1.0)
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))

    @property
    def pipelined(self) -> bool:
        return self.topology.pp > 1

    @property
    def pipelined_plan(self) -> bool:
        """`pipelined`, before the topology is known."""
        return self.plan.pipeline_stages > 1

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train_step(self, batches: Iterator | None, loss_of=None) -> StepOutput:
        """One optimizer step over grad_accum micro-batches. Its loss and gradient norm stay on the
        device (`read` brings them to the host, at the steps that are logged).

        `loss_of(batch) -> (loss, statistics or None)`: the objective of a micro-batch (unpipelined
        only); by default the language-model loss of an (inputs, labels) batch."""
        lr = self.current_lr()
        extras = None
        if self.pipelined:
            assert loss_of is None, "the pipeline engine computes its own loss"
            loss = self.engine.train_batch(data_iter=batches if self.topology.needs_data else None)
        else:
            self.engine.train()
            loss_of = loss_of or self._lm_loss
            loss = None
            for _ in range(self.plan.grad_accum):
                micro_loss, stats = loss_of(next(batches))
                self.engine.backward(micro_loss)
                self.engine.step()
                loss = micro_loss.detach() if loss is None else loss + micro_loss.detach()
                if stats is not None:
                    extras = stats.detach() if extras is None else extras + stats.detach()
            loss = loss / self.plan.grad_accum
            extras = extras / self.plan.grad_accum if extras is not None else None
        norm = self.last_grad_norm if self.plan.clip_in_optimizer else self.engine.get_global_grad_norm()
        return StepOutput(loss=loss, grad_norm=norm, lr=lr, extras=extras)

    def _lm_loss(self, batch) -> tuple[torch.Tensor, None]:
        inputs, y = batch
        return self._forward(inputs, y)[1], None


    def read(self, out: StepOutput) -> dict:
        """A step's loss (the mean over data-parallel ranks), gradient norm and learning rate as
        numbers: the one read from the device a logged step makes. A collective: every rank calls
        it at the same steps."""
        loss = out.loss.detach().float().reshape(()).to(self.reduce_device)
        if not self.pipelined:  # each rank holds its own micro-batches' loss; a pipeline's is already the mean
            dist.all_reduce(loss)
            loss = loss / self.topology.world_size
        norm = out.grad_norm
        norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32).to(loss.device).reshape(())
        extras = []
        if out.extras is not None:  # each rank's own micro-batches' statistics: the data-parallel mean
            mean = out.extras.detach().float().to(self.reduce_device)
            dist.all_reduce(mean)
            extras = (mean / self.topology.world_size).tolist()
        loss_value, norm_value = torch.stack([loss, norm.float()]).tolist()
        return {"loss": loss_value, "lr": out.lr, "grad_norm": norm_value, "extras": extras}

    @property
    def reduce_device(self) -> torch.device:
        """Where collectives of this process's tensors run: its GPU under NCCL, else the CPU."""
        return torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda" else torch.device("cpu")

    @torch.no_grad()
    def micro_batch_loss(self, x: torch.Tensor | None, y: torch.Tensor | None) -> float:
        """Mean loss of one micro-batch (every rank calls; data is read where the layout needs it)."""
        if self.pipelined:
            batch = iter([(x, y)]) if self.topology.needs_data else None
            return float(self.engine.eval_batch(batch, num_micro_batches=1))
        self.engine.eval()
        _, loss = self._forward(x, y)
        return float(split.group_mean(loss, self.sp, self.reduce_device))  # under sp each rank holds its chunk's share

    def _forward(self, inputs, labels: torch.Tensor):
        """The unpipelined model on one micro-batch: `inputs` are token ids, or (token ids,
        document ids) when packed documents are kept apart (pipelines/data/loader.py)."""
        device = self.engine.device
        if isinstance(inputs, tuple):
            x, document_ids = inputs
            return self.engine(x.to(device), labels=labels.to(device), document_ids=document_ids.to(device))
        return self.engine(inputs.to(device), labels=labels.to(device))

    @property
    def frozen_base(self) -> bool:
        """LoRA: the base weights never change, so checkpoints hold the adapters (and their
        optimizer state) only; a resume rebuilds the base from the init model, as the start did."""
        return self.plan.settings.lora is not None

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False,
                                    exclude_frozen_parameters=self.frozen_base)

    def load(self, directory: str, tag: str) -> dict:
        split.check_checkpoint_layout(directory, tag, self.plan.tensor_parallel)
        # Without the frozen weights in the checkpoint, its module state is the adapters alone: not strict.
        path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True,
                                                         load_module_strict=not self.frozen_base)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {directory}")
        return client_state or {}
