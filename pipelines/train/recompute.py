"""Activation checkpointing of a plain GPT (pipeline 1), applied from outside the model, and
compiled blocks or pipeline stages.

`activation_checkpoint_interval: k` means the same on every layout: the blocks run in chunks
of k consecutive blocks, and each chunk keeps only its input for the backward pass, which
recomputes the chunk's activations. Under a pipeline DeepSpeed's PipelineModule does this
with its own interval; here the first block of every chunk is given a forward that runs the
whole chunk under `torch.utils.checkpoint`, and the chunk's other blocks pass their input
through. Parameter names, the state dict and the module tree are untouched, so checkpoints
and exports are the same with or without it.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model, interval: int) -> None:
    """Make `model` (a GPT) recompute each chunk of `interval` blocks in the backward pass."""
    if interval < 1:
        raise ValueError(f"activation_checkpoint_interval must be at least 1 here, got {interval}")
    blocks = list(model.transformer.h)
    for start in range(0, len(blocks), interval):
        chunk = blocks[start:start + interval]
        chunk[0].forward = _chunk_forward([block.forward for block in chunk], start)
        for block in chunk[1:]:
            block.forward = _pass_through


def _chunk_forward(forwards: list, first_layer: int):
    def run(x, rope=None, attn_mask=None, kv_cache=None, layer: int = 0):
        def body(hidden):
            for offset, forward in enumerate(forwards):
                hidden = forward(hidden, rope, attn_mask, kv_cache, first_layer + offset)
            return hidden

        if kv_cache is None and torch.is_grad_enabled():
            # Non-reentrant: works with ZeRO's parameter hooks and keeps the RNG state, so
            # dropout draws the same masks when the chunk is recomputed.
            return checkpoint(body, x, use_reentrant=False)
        return body(x)

    return run


def _pass_through(x, rope=None, attn_mask=None, kv_cache=None, layer: int = 0):
    """A block whose work its chunk's first block already did."""
    return x


def compile_blocks(model) -> int:
    """torch.compile every transformer block of `model` (a GPT or a pipeline stage) in place, as
    torchtitan does per block: one small graph reused n_layer times, and parameter names, the
    state dict and the module tree unchanged. Applied after `checkpoint_blocks`, so a chunk
    recomputes compiled code. Returns the number of blocks compiled."""
    from model.gpt import Block

    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        block.compile()
    return len(blocks)


def compile_stage(stage) -> int:
    """torch.compile every layer a pipeline stage (a DeepSpeed PipelineModule) runs, in place:
    its embeddings, blocks, final norm and untied head (the pipeline calls its layers one by
    one, so each is a graph; the loss is compiled where the engine builds it). A tied head
    runs as a function of the embedding module and stays eager. Returns the blocks compiled."""
    from model.gpt import Block

    layers = [layer for layer in stage.forward_funcs if isinstance(layer, torch.nn.Module)]
    for layer in layers:
        layer.compile()
    return sum(isinstance(layer, Block) for layer in layers)
