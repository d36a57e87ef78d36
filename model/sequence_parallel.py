"""Sequence parallelism (DeepSpeed-Ulysses style) for the GPT, applied from outside the model.

The `size` ranks of a sequence-parallel group read the same rows; each runs every layer on its
own contiguous chunk of T / size tokens. Attention is the one place where tokens meet: there
an all-to-all turns this rank's (all heads, its tokens) queries, keys and values into (its
heads, all tokens), attention runs over the whole sequence for 1/size of the heads, and the
inverse all-to-all brings the output back to (all heads, its tokens). Everything else (norms,
MLP, head, loss) is per token and needs no communication.

Positions are those of the whole row (restarting per document when documents are kept apart),
sliced to the chunk, so RoPE and learned positions are right across the split; the attention
mask is built once over the whole row from the whole row's document ids. The loss of a chunk is
scaled so that the data-parallel average DeepSpeed takes over the group's ranks is the row's
mean: every rank of the group is a data-parallel replica of the weights to DeepSpeed (ZeRO
shards over them too), as DeepSpeed-Ulysses treats its sequence-data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import GPT, IGNORE_INDEX, document_positions, rope_tables
from model.tensor_parallel import TPGroup as SPGroup  # the same triple: group, rank in it, size


class _SequenceToHeads(torch.autograd.Function):
    """(B, nh, T / size, hs) on each rank -> (B, nh / size, T, hs): its heads, every token."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _seq_to_heads(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad.contiguous(), ctx.group, ctx.size), None, None


class _HeadsToSequence(torch.autograd.Function):
    """The inverse: (B, nh / size, T, hs) -> (B, nh, T / size, hs)."""

    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _heads_to_seq(x, group, size)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad.contiguous(), ctx.group, ctx.size), None, None


def _seq_to_heads(x, group, size):
    B, nh, Tl, hs = x.shape
    send = x.reshape(B, size, nh // size, Tl, hs).permute(1, 0, 2, 3, 4).contiguous()  # (size, B, nh/size, Tl, hs): by destination
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # received[j]: rank j's tokens of my heads
    return received.permute(1, 2, 0, 3, 4).reshape(B, nh // size, size * Tl, hs)


def _heads_to_seq(x, group, size):
    B, nh_local, T, hs = x.shape
    send = x.reshape(B, nh_local, size, T // size, hs).permute(2, 0, 1, 3, 4).contiguous()  # (size, B, nh/size, Tl, hs)
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)  # received[j]: rank j's heads of my tokens
    return received.permute(1, 0, 2, 3, 4).reshape(B, size * nh_local, T // size, hs)


def sequence_parallel_problems(config: GPTConfig, size: int, seq_len: int) -> list[str]:
    """Why rows of `seq_len` tokens of `config` cannot be split over `size` ranks, one reason each."""
    if size == 1:
        return []
    checks = [("n_head", config.n_head, "attention heads"), ("n_kv_head", config.kv_heads, "key/value heads"),
              ("seq_len", seq_len, "tokens of every row")]
    return [f"{name} {value} is not divisible by sequence_parallel {size}: each rank takes an equal share of the {what}"
            for name, value, what in checks if value % size]


class SequenceParallelGPT(GPT):
    """A GPT whose forward takes whole rows and runs this rank's chunk of them (see the module
    docstring). Made by `sequence_parallelize` from a built GPT: the parameters are the GPT's."""

    sp: SPGroup

    def forward(self, input_ids, labels=None, *, document_ids=None, **unused):
        assert not unused, f"sequence parallelism takes token ids, labels and document ids only: {sorted(unused)}"
        sp, config = self.sp, self.config
        B, T = input_ids.shape
        chunk = slice(sp.rank * (T // sp.size), (sp.rank + 1) * (T // sp.size))
        if document_ids is not None:
            positions = document_positions(document_ids)  # (B, T): the whole row's
        else:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        attention_dropout = config.dropout if self.training else 0.0
        attn_mask = self.attention_mask(T, None, input_ids.device, document_ids, attention_dropout)  # over the whole row
        x = self.transformer.wte(input_ids[:, chunk])  # (B, T / size, C)
        if config.position == "learned":
            x = x + self.transformer.wpe(positions[:, chunk])
        x = self.transformer.drop(x)
        rope = rope_tables(config, positions[:, chunk]) if config.position == "rope" else None
        for block in self.transformer.h:
            x = block(x, rope, attn_mask)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T / size, V)
        if labels is None:
            return logits, None
        return logits, self._chunk_loss(logits, labels[:, chunk].reshape(-1), labels)

    def _chunk_loss(self, logits, local_labels, labels):
        """size x (this chunk's summed loss) / (the row batch's supervised tokens): its average over
        the group's ranks (DeepSpeed's data-parallel mean) is the batch's mean loss."""
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), local_labels,
                                ignore_index=IGNORE_INDEX, reduction="sum")
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)  # the whole rows': every rank of the group has them
        return total * self.sp.size / count


def sequence_parallelize(model: GPT, sp: SPGroup) -> SequenceParallelGPT:
    """Turn a built GPT into this rank's SequenceParallelGPT, in place (the same parameters)."""
    problems = sequence_parallel_problems(model.config, sp.size, sp.size)
    assert not problems, problems  # the plan refuses these before launch
    model.__class__ = SequenceParallelGPT
    model.sp = sp
    for block in model.transformer.h:
        block.attn.gather_sequence = lambda q, k, v: tuple(_SequenceToHeads.apply(t, sp.group, sp.size) for t in (q, k, v))
        block.attn.scatter_sequence = lambda y: _HeadsToSequence.apply(y, sp.group, sp.size)
    return model
