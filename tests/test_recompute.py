"""Activation checkpointing applied from outside the model: same numbers, activations recomputed."""

import copy

import torch

from helpers import tiny_config
from model.gpt import GPT
from pipelines.train.recompute import checkpoint_blocks


def _attn_calls(model) -> list[int]:
    counts = [0] * len(model.transformer.h)
    for i, block in enumerate(model.transformer.h):
        block.attn.register_forward_hook(lambda *args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_chunks_are_recomputed_in_backward_and_give_the_same_gradients():
    torch.manual_seed(0)
    reference = GPT(tiny_config(300, n_layer=5, dropout=0.1)).train()
    chunked = copy.deepcopy(reference)
    checkpoint_blocks(chunked, 2)  # chunks: blocks 0-1, 2-3, 4
    ref_calls, chunk_calls = _attn_calls(reference), _attn_calls(chunked)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (2, 16), generator=g), torch.randint(0, 300, (2, 16), generator=g)
    torch.manual_seed(2)
    ref_loss = reference(x, labels=y)[1]
    ref_loss.backward()
    torch.manual_seed(2)  # the same dropout masks, also when the chunks are recomputed
    chunk_loss = chunked(x, labels=y)[1]
    chunk_loss.backward()
    assert ref_calls == [1] * 5 and chunk_calls == [2] * 5  # every block ran again in the backward pass
    assert torch.equal(ref_loss, chunk_loss)
    for (name, a), (_, b) in zip(reference.named_parameters(), chunked.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name
    assert list(reference.state_dict()) == list(chunked.state_dict())  # names and tree untouched


def test_without_gradients_the_chunks_just_run():
    torch.manual_seed(0)
    reference = GPT(tiny_config(300, n_layer=3)).eval()
    chunked = copy.deepcopy(reference)
    checkpoint_blocks(chunked, 3)
    calls = _attn_calls(chunked)
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(reference(x)[0], chunked(x)[0])
    assert calls == [1, 1, 1]
