"""Megatron-style tensor parallelism for the GPT, applied from outside the model.

`parallelize(model, group)` takes a whole `GPT` (built and initialised exactly as a
single-device run builds it) and replaces, in place, the layers that split across the
`size` ranks of a tensor-parallel group by layers holding only this rank's slice:

    attn.c_attn   column-parallel: this rank's query heads, then its KV heads (GQA splits too)
    attn.c_proj   row-parallel: one all-reduce of the output (forward), none backward
    mlp.c_fc      column-parallel: this rank's part of the hidden width (SwiGLU: gate and up)
    mlp.c_proj    row-parallel
    wte           vocabulary-parallel embedding: this rank's rows, one all-reduce
    lm_head       column-parallel over the vocabulary (tied: the embedding's own slice);
                  its logits stay split and `VocabParallelLoss` never gathers them

A column-parallel layer's input passes `copy_to_group` (identity forward, all-reduce of the
gradient backward); a row-parallel layer's output passes `reduce_from_group` (all-reduce
forward, identity backward): one all-reduce each way per attention and per MLP. Norms,
position embeddings and row-parallel biases stay whole on every rank, and so do their
gradients (their inputs and outputs are the same on every rank).

Parameter names stay the GPT's (`transformer.h.0.attn.c_attn.weight`), so `shard_layout`
says how each named weight is cut, and `shard` / `unshard` move between whole and sliced
(initial weights, export). torch.distributed is used here only through the group passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import GPT, IGNORE_INDEX


@dataclass(frozen=True)
class TPGroup:
    """The tensor-parallel process group this rank belongs to, its rank in it and its size."""

    group: object
    rank: int
    size: int


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group backward (each rank's slice of a
    column-parallel layer contributes part of the gradient of the shared input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Sum over the group forward (the partial products of a row-parallel layer); the gradient
    passes unchanged (every rank's partial sum gets the whole output's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_group(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _CopyToGroup.apply(x, tp.group)


def reduce_from_group(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, tp.group)


def _mark_sharded(param: nn.Parameter) -> nn.Parameter:
    """DeepSpeed's gradient norm sums a parameter marked model-parallel over the group and counts
    an unmarked one on model-parallel rank 0 only (deepspeed.runtime.utils.clip_grad_norm_)."""
    param.tensor_model_parallel = True
    return param


class ColumnParallelLinear(nn.Module):
    """y_r = x W_r^T + b_r: this rank's rows of W (its slice of the output features)."""

    def __init__(self, weight: torch.Tensor | nn.Parameter, bias: torch.Tensor | None, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = weight if isinstance(weight, nn.Parameter) else _mark_sharded(nn.Parameter(weight))
        self.bias = None if bias is None else _mark_sharded(nn.Parameter(bias))

    def forward(self, x):
        return F.linear(copy_to_group(x, self.tp), self.weight, self.bias)  # (B, T, out / size)


class RowParallelLinear(nn.Module):
    """y = sum_r x_r W_r^T + b: this rank's columns of W (its slice of the input features);
    the bias is whole and added once, after the sum."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _mark_sharded(nn.Parameter(weight))
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x):
        y = reduce_from_group(F.linear(x, self.weight), self.tp)  # (B, T, out)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + V / size) of the token embedding; a token another rank holds looks
    up zeros here, and the sum over the group is the whole embedding."""

    def __init__(self, weight: torch.Tensor, tp: TPGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = _mark_sharded(nn.Parameter(weight))
        self.start = tp.rank * weight.size(0)

    def forward(self, input_ids):
        local = input_ids - self.start
        elsewhere = (local < 0) | (local >= self.weight.size(0))
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)  # (B, T, C)
        return reduce_from_group(x.masked_fill(elsewhere[..., None], 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-row cross entropy of logits split over the vocabulary, in fp32, without gathering them:
    the row maximum, the sum of exponentials and the target's logit are all-reduced (three
    vectors of one number per row). Rows whose label is IGNORE_INDEX give 0."""

    @staticmethod
    def forward(ctx, logits, labels, start, group):
        rows = torch.arange(logits.size(0), device=logits.device)
        shifted = logits.float()  # (N, V / size)
        row_max = shifted.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = shifted - row_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        local = labels - start
        here = (local >= 0) & (local < logits.size(-1))  # IGNORE_INDEX is never here
        local = local.masked_fill(~here, 0)
        target = torch.where(here, shifted[rows, local], 0.0)
        dist.all_reduce(target, group=group)
        kept = labels != IGNORE_INDEX
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), local, here, kept)
        ctx.dtype = logits.dtype
        return torch.where(kept, sum_exp.log() - target, 0.0)

    @staticmethod
    def backward(ctx, grad_rows):
        softmax, local, here, kept = ctx.saved_tensors
        rows = torch.arange(softmax.size(0), device=softmax.device)
        grad = softmax  # d loss / d logit = softmax - one-hot(target), row by row
        grad[rows, local] -= here.float()
        grad.mul_((grad_rows * kept)[:, None])
        return grad.to(ctx.dtype), None, None, None


class VocabParallelLoss:
    """`model.gpt.lm_loss` on logits split over the vocabulary: the mean cross entropy of the
    labels that are not IGNORE_INDEX (0 when there are none)."""

    def __init__(self, tp: TPGroup, vocab_per_rank: int) -> None:
        self.tp, self.start = tp, tp.rank * vocab_per_rank

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        flat = labels.reshape(-1)
        rows = _VocabParallelCrossEntropy.apply(logits.reshape(-1, logits.size(-1)), flat, self.start, self.tp.group)
        return rows.sum() / (flat != IGNORE_INDEX).sum().clamp(min=1)


def tensor_parallel_problems(config: GPTConfig, size: int) -> list[str]:
    """Why `config` cannot be split over `size` ranks (empty when it can), one reason each."""
    if size == 1:
        return []
    checks = [("n_head", config.n_head, "attention heads"), ("n_kv_head", config.kv_heads, "key/value heads"),
              ("mlp hidden width", config.mlp_hidden, "MLP hidden features"),
              ("padded_vocab_size", config.padded_vocab_size, "vocabulary rows (set model.pad_vocab_multiple to a multiple of it)")]
    return [f"{name} {value} is not divisible by tensor_parallel {size}: each rank holds an equal share of the {what}"
            for name, value, what in checks if value % size]


def shard_layout(config: GPTConfig, name: str) -> tuple[int, list[int]] | None:
    """How a GPT weight is cut: (dimension, segments), each segment split evenly over the ranks
    and this rank's parts concatenated; None for a weight every rank holds whole."""
    hs, hidden = config.head_dim, config.mlp_hidden
    if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")):
        return 0, [config.n_head * hs, config.kv_heads * hs, config.kv_heads * hs]  # q, k, v
    if name.endswith(("mlp.c_fc.weight", "mlp.c_fc.bias")):
        return 0, [hidden, hidden] if config.mlp == "swiglu" else [hidden]  # gate, up
    if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight")):
        return 1, [config.n_embd if "attn" in name else hidden]
    if name in ("transformer.wte.weight", "lm_head.weight"):
        return 0, [config.padded_vocab_size]
    return None


def shard(full: torch.Tensor, layout: tuple[int, list[int]] | None, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a whole weight (a copy)."""
    if layout is None:
        return full.clone()
    dim, segments = layout
    return torch.cat([piece.chunk(size, dim)[rank] for piece in full.split(segments, dim)], dim).clone()


def unshard(parts: list[torch.Tensor], layout: tuple[int, list[int]] | None) -> torch.Tensor:
    """The whole weight from every rank's slice, in rank order (the inverse of `shard`)."""
    if layout is None:
        return parts[0]
    dim, segments = layout
    size = len(parts)
    pieces = [part.split([s // size for s in segments], dim) for part in parts]  # [rank][segment]
    return torch.cat([torch.cat([pieces[r][j] for r in range(size)], dim) for j in range(len(segments))], dim)


def _cut(config: GPTConfig, tp: TPGroup, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else shard(tensor.detach(), shard_layout(config, name), tp.rank, tp.size)


@torch.no_grad()
def parallelize_block(block: nn.Module, config: GPTConfig, tp: TPGroup) -> None:
    """Replace a transformer block's projections by this rank's slices, in place."""
    for owner, column_name in ((block.attn, "c_attn"), (block.mlp, "c_fc")):
        prefix = f"transformer.h.0.{'attn' if owner is block.attn else 'mlp'}"  # (the layout depends on the suffix only)
        column, row = getattr(owner, column_name), owner.c_proj
        setattr(owner, column_name, ColumnParallelLinear(_cut(config, tp, f"{prefix}.{column_name}.weight", column.weight),
                                                         _cut(config, tp, f"{prefix}.{column_name}.bias", column.bias), tp))
        owner.c_proj = RowParallelLinear(_cut(config, tp, f"{prefix}.c_proj.weight", row.weight),
                                         None if row.bias is None else row.bias.detach().clone(), tp)
    block.attn.n_head //= tp.size
    block.attn.n_kv_head //= tp.size


@torch.no_grad()
def parallel_embedding(embedding: nn.Embedding, config: GPTConfig, tp: TPGroup) -> VocabParallelEmbedding:
    return VocabParallelEmbedding(_cut(config, tp, "transformer.wte.weight", embedding.weight), tp)


@torch.no_grad()
def parallel_head(head: nn.Linear, config: GPTConfig, tp: TPGroup) -> ColumnParallelLinear:
    return ColumnParallelLinear(_cut(config, tp, "lm_head.weight", head.weight), None, tp)


def parallelize(model: GPT, tp: TPGroup) -> GPT:
    """Replace `model`'s splittable layers by this rank's slices (see the module docstring)."""
    config = model.config
    problems = tensor_parallel_problems(config, tp.size)
    assert not problems, problems  # the plan refuses these before launch
    for block in model.transformer.h:
        parallelize_block(block, config, tp)
    wte = parallel_embedding(model.transformer.wte, config, tp)
    head = ColumnParallelLinear(wte.weight, None, tp) if config.tie_embeddings else parallel_head(model.lm_head, config, tp)
    model.transformer.wte, model.lm_head = wte, head
    model.loss_fn = VocabParallelLoss(tp, config.padded_vocab_size // tp.size)
    return model


def local_layer_params(config: GPTConfig, size: int, num_stages: int = 1) -> list[int]:
    """Parameters one rank of a `size`-way tensor-parallel group holds in each pipeline layer
    (the indices of model/pipe.py), from the config alone; as model/partition.py: layer_params, a
    tied head counts again on the last layer when a pipeline puts it on another stage."""
    key = (repr(config), size, num_stages)  # the planner's cut search asks again and again
    if key not in _LOCAL_PARAMS:
        _LOCAL_PARAMS[key] = _count_local_layer_params(config, size, num_stages)
    return list(_LOCAL_PARAMS[key])


_LOCAL_PARAMS: dict[tuple, list[int]] = {}


def _count_local_layer_params(config: GPTConfig, size: int, num_stages: int) -> list[int]:
    from model.partition import layer_of

    with torch.device("meta"):
        model = GPT(config, initialize=False)
    counts = [0] * (config.n_layer + 4)
    for name, param in model.named_parameters():
        split = shard_layout(config, name) is not None
        counts[layer_of(config, name)] += param.numel() // size if split else param.numel()
    if config.tie_embeddings and num_stages > 1:
        counts[-1] = config.padded_vocab_size * config.n_embd // size
    return counts
