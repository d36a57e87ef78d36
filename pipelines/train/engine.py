"""One facade in front of DeepSpeed: the plain GPT (pp = 1, any ZeRO stage) or the
PipelineModule (pp > 1, ZeRO <= 1), trained, evaluated, checkpointed and exported the same way.

This module and `model/pipe.py` are the only places that import deepspeed. Everything here
receives rank and world size from torch.distributed, which the launcher (Ray Train or
torchrun) has set up through the usual environment variables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from model.errors import RelayError
from model.gpt import GPT
from pipelines.train.settings import OptimizerSpec


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    pp: int
    dp: int
    dp_rank: int
    stage_id: int

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


def param_groups(named_parameters, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and norm weights do not."""
    decay, no_decay, seen = [], [], set()
    for _, param in named_parameters:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


class Engine:
    """A DeepSpeed engine over a GPT, with one `train_step` whatever the parallel layout."""

    def __init__(self, plan, *, init_state: dict | None) -> None:
        """`plan`: the stage's TrainPlan (layout, batch, precision, DeepSpeed config), resolved on the driver."""
        import deepspeed

        from model.pipe import build_pipeline, init_like_pipeline, load_gpt_state

        self.plan, config = plan, plan.model
        world, rank, pp, dp = plan.world_size, dist.get_rank(), plan.pipeline_stages, plan.data_parallel
        self.device_type = "cuda" if torch.cuda.is_available() else "cpu"
        if plan.device != self.device_type:
            raise RelayError(f"the run was planned for {plan.device} workers but this worker has {self.device_type}: "
                             "set cluster.gpus_per_worker to match the machines")
        if plan.precision == "bf16" and self.device_type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RelayError(f"stages.{plan.stage}.deepspeed.precision: this GPU has no bf16; set precision to fp16 or fp32")
        if pp > 1:
            from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

            module = build_pipeline(config, pp, topology=PipeDataParallelTopology(num_pp=pp, num_dp=dp),
                                    partition_method=plan.settings.deepspeed.partition_method,
                                    activation_checkpoint_interval=plan.settings.deepspeed.activation_checkpoint_interval, seed=plan.seed)
            if init_state is not None:
                load_gpt_state(module, config, init_state)
            # DeepSpeed sums gradient norms over the model-parallel group but counts only the
            # parameters marked model-parallel (or on model-parallel rank 0), which would leave
            # every later stage out of the global norm used for clipping. Mark each stage's own
            # parameters; the replicated copy of a tied embedding stays unmarked, so it counts once.
            for param in module.parameters():
                if not getattr(param, "ds_pipe_replicated", False):
                    param.model_parallel = True
        else:
            module = GPT(config)
            if init_state is not None:
                module.load_state_dict(init_state, strict=True)
            else:
                init_like_pipeline(module, plan.seed)
        opt = plan.settings.optimizer
        optimizer = torch.optim.AdamW(param_groups(module.named_parameters(), opt.weight_decay), lr=opt.lr, betas=opt.betas, eps=opt.eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(opt, plan.total_steps))
        self.last_grad_norm = float("nan")
        if plan.clip_in_optimizer:
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._clip(opt))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=dict(plan.deepspeed_config))
        if pp > 1:
            grid = self.engine.grid
            self.topology = Topology(world, rank, pp, dp, grid.get_data_parallel_id(), grid.get_stage_id())
        else:
            self.topology = Topology(world, rank, 1, world, rank, 0)

    @torch.no_grad()
    def _clip(self, optimizer) -> None:
        """Clip to the global norm: this rank's parameters, summed over pipeline stages."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None and not getattr(p, "ds_pipe_replicated", False)]
        squares = torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
        if self.pipelined:
            squares = squares.to(self.reduce_device)
            dist.all_reduce(squares, group=self.engine.grid.get_pipe_parallel_group())
        norm = float(squares.sqrt())
        self.last_grad_norm = norm
        coef = self.plan.settings.optimizer.grad_clip / (norm + 1e-6)
        if coef < 1:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)

    @property
    def pipelined(self) -> bool:
        return self.topology.pp > 1

    def current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def train_step(self, batches: Iterator | None) -> dict:
        """One optimizer step over grad_accum micro-batches; returns loss, lr and grad norm."""
        lr = self.current_lr()
        if self.pipelined:
            loss = float(self.engine.train_batch(data_iter=batches if self.topology.needs_data else None))
        else:
            self.engine.train()
            total = torch.zeros((), dtype=torch.float64)
            for _ in range(self.plan.grad_accum):
                x, y = next(batches)
                _, micro_loss = self.engine(x.to(self.engine.device), labels=y.to(self.engine.device))
                self.engine.backward(micro_loss)
                self.engine.step()
                total += micro_loss.detach().double().cpu()
            loss_t = (total / self.plan.grad_accum).to(self.reduce_device)
            dist.all_reduce(loss_t)
            loss = float(loss_t) / self.topology.world_size
        norm = self.last_grad_norm if self.plan.clip_in_optimizer else self.engine.get_global_grad_norm()
        return {"loss": loss, "lr": lr, "grad_norm": float(norm) if norm is not None else float("nan")}

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
        _, loss = self.engine(x.to(self.engine.device), labels=y.to(self.engine.device))
        return float(loss)

    def save(self, directory: str, tag: str, client_state: dict) -> None:
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict:
        path, client_state = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {directory}")
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model under GPT names on rank 0 (None elsewhere); a collective call."""
        if self.pipelined:
            from model.pipe import gpt_state_of_stage

            mine = {k: v.detach().float().cpu() for k, v in gpt_state_of_stage(self.engine.module, self.plan.model).items()} \
                if self.topology.dp_rank == 0 else {}
            gathered = [None] * self.topology.world_size
            dist.all_gather_object(gathered, mine)
            if self.topology.rank != 0:
                return None
            state = {}
            for part in gathered:
                state.update(part)
            if self.plan.model.tie_embeddings:
                state["lm_head.weight"] = state["transformer.wte.weight"]
            return state
        module = self.engine.module
        if self.plan.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if self.topology.rank == 0 else None
            return state
        if self.topology.rank != 0:
            return None
        return {k: v.detach().float().cpu() for k, v in module.state_dict().items()}
