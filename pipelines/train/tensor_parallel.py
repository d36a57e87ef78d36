"""Tensor parallelism in the training engine: the process grid, the build, the norm, the export.

The layers themselves live in model/tensor_parallel.py; this module gives them their process
group and teaches the engine what changes when a weight is split:

- the grid: DeepSpeed's `PipelineParallelGrid` over `PipeModelDataParallelTopology` (pipe x data
  x model, the model axis innermost so a tensor-parallel group is consecutive ranks, one node),
  passed to `deepspeed.initialize(mpu=...)`: DeepSpeed then averages gradients and partitions
  ZeRO-1 state over the data-parallel group only, and sums gradient norms over the model group;
- the build: every rank builds the whole GPT with the same initial weights a single device
  would, then keeps its slice (so tp 2 starts from tp 1's weights exactly);
- the export: each split weight is gathered to rank 0 one tensor at a time and joined.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.distributed as dist

from model.errors import RelayError


def make_grid(pipeline_stages: int, tensor_parallel: int, data_parallel: int):
    """DeepSpeed's 3-D process grid (an mpu for deepspeed.initialize)."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid, PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=pipeline_stages, num_mp=tensor_parallel, num_dp=data_parallel)
    return PipelineParallelGrid(topology=topology)


def sequence_group(size: int):
    """This rank's sequence-parallel group: `size` consecutive ranks (every rank creates every group)."""
    from model.sequence_parallel import SPGroup

    rank, world = dist.get_rank(), dist.get_world_size()
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(ranks=list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return SPGroup(mine, rank % size, size)


def split_sequences(plan, module):
    """(module, this rank's sequence-parallel group): the GPT made to run its chunk of every row
    (model/sequence_parallel.py) under sequence parallelism; unchanged, and None, without."""
    if plan.sequence_parallel == 1:
        return module, None
    from model.sequence_parallel import sequence_parallelize

    sp = sequence_group(plan.sequence_parallel)
    return sequence_parallelize(module, sp), sp


def group_mean(loss: torch.Tensor, sp, device: torch.device) -> torch.Tensor:
    """A micro-batch's loss: under sequence parallelism the mean of the group's chunk losses
    (each is its chunk's share of the rows' mean; a collective over the group), else as is."""
    if sp is None:
        return loss
    loss = loss.detach().float().to(device)
    dist.all_reduce(loss, group=sp.group)
    return loss / sp.size


def tp_group_of(grid):
    from model.tensor_parallel import TPGroup

    return TPGroup(grid.get_slice_parallel_group(), grid.get_slice_parallel_rank(), grid.get_slice_parallel_world_size())


def build_tensor_parallel(plan, init_state: dict | None, grid, loss_fn):
    """This rank's slice of the GPT: the whole model built and initialised as one device would
    (seeded like the pipeline, or from `init_state`), then cut (model/tensor_parallel.py)."""
    from model.gpt import GPT
    from model.pipe import init_like_pipeline
    from model.tensor_parallel import parallelize

    module = GPT(plan.model, loss_fn=loss_fn, initialize=False)
    if init_state is not None:
        module.load_state_dict(init_state, strict=True)
    else:
        init_like_pipeline(module, plan.seed)
    return parallelize(module, tp_group_of(grid))


def squared_norm(params, grads, tp_group) -> torch.Tensor:
    """The squared global norm of `grads` over a tensor-parallel group: split weights summed over
    the group, whole ones (the same on every rank) counted once."""
    split = [g for p, g in zip(params, grads) if getattr(p, "tensor_model_parallel", False)]
    whole = [g for p, g in zip(params, grads) if not getattr(p, "tensor_model_parallel", False)]

    def squares(gs):
        return torch.stack([g.detach().float().pow(2).sum() for g in gs]).sum() if gs else torch.zeros((), device=grads[0].device)

    shared = squares(split)
    dist.all_reduce(shared, group=tp_group)
    return shared + squares(whole)


def stream_split(mine: dict, config, order: list[str], specs: dict, topology, stage_of, wire: torch.device):
    """Each weight of `order` whole, as an fp32 CPU tensor on rank 0 (None elsewhere), one at a
    time. `mine`: this rank's weights under GPT names (empty off data-parallel replica 0);
    `stage_of(name)`: the pipeline stage that holds a weight. A split weight is sent to rank 0 by
    every rank of its stage's tensor-parallel group and joined there; a whole one by model rank 0.
    A collective: every rank iterates to the end."""
    from model.tensor_parallel import shard_layout, unshard

    rank, size = dist.get_rank(), topology.get_dim("model")
    for name in order:
        layout = shard_layout(config, name)
        stage = stage_of(name)
        sources = [topology.get_rank(pipe=stage, data=0, model=m) for m in range(size if layout else 1)]
        if rank == 0:
            shape = list(specs[name][1])
            if layout:
                shape[layout[0]] //= size
            parts = []
            for source in sources:
                if source == 0:
                    parts.append(mine[name].detach().float().cpu())
                    continue
                part = torch.empty(shape, dtype=torch.float32, device=wire)
                dist.recv(part, src=source)
                parts.append(part.cpu())
            yield unshard(parts, layout)
            continue
        if rank in sources:
            dist.send(mine[name].detach().float().to(wire).contiguous(), dst=0)
        yield None


_MP_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER_FILE = re.compile(r"^layer_\d+-model_(\d+)-model_states\.pt$")


def check_checkpoint_layout(directory: str, tag: str, tensor_parallel: int) -> None:
    """Refuse, in one line, a checkpoint written at another tensor-parallel size (relaygpt does
    not reshard checkpoints). DeepSpeed writes one model file per model-parallel rank without a
    pipeline, and per layer and tensor-parallel rank (`layer_02-model_01-model_states.pt`) with one."""
    files = [p.name for p in (Path(directory) / tag).iterdir()] if (Path(directory) / tag).is_dir() else []
    layers = [f for f in files if f.startswith("layer_")]
    if layers:
        written = len({match.group(1) for f in layers if (match := _LAYER_FILE.match(f))}) or 1
    else:
        written = len([f for f in files if _MP_FILE.match(f)])
    if written and written != tensor_parallel:
        raise RelayError(f"checkpoint {Path(directory) / tag} was written at tensor_parallel {written} and this run has "
                         f"{tensor_parallel}; resume with deepspeed.tensor_parallel {written} (checkpoints are not resharded), "
                         "or start the stage afresh from its export (init)")
