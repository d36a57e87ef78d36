"""Documents kept apart on CUDA: FlexAttention against plain causal attention (CUDA only).

One forward + backward of gpt2-124m's 12 transformer blocks (bf16, micro-batch 16 x 1024
tokens, training mode, no dropout) with
- plain causal SDPA (`is_causal`, no mask: the flash kernel), the peer,
- FlexAttention under the BlockMask of packed SFT-like rows (about four documents a row), the
  mask built inside the timed step as every training forward builds it, and the same for a row
  holding one document (the BlockMask's overhead alone: no tile skipped beyond causal's),
- SDPA with the dense (B, 1, T, T) mask, what CUDA ran before, for reference.
Prints the ratios to plain causal. Target: FlexAttention within 1.15x of plain causal.
It first checks that FlexAttention and the dense mask agree (fp32, forward and backward).

Skipped without CUDA. On a GPU machine without pytest: PYTHONPATH=. python3 tests/perf/bench_flex.py
"""

import time

import pytest
import torch

MICRO_BATCH, SEQ_LEN = 16, 1024


def packed_document_ids(batch: int, seq_len: int, generator: torch.Generator, min_len: int = 32,
                        max_len: int = 512) -> torch.Tensor:
    """(B, T) document ids of rows packed with documents of lengths uniform in [min_len, max_len]."""
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(int(torch.randint(min_len, max_len + 1, (1,), generator=generator)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:seq_len])
    return torch.stack(rows)


def forward_backward(blocks, x: torch.Tensor, grad: torch.Tensor, make_mask) -> None:
    """One training step's attention work: the mask built, the blocks forward, then backward."""
    mask = make_mask()
    h = x
    for block in blocks:
        h = block(h, None, mask)
    h.backward(grad)


def median_seconds(blocks, x: torch.Tensor, make_mask, steps: int = 20, warmup: int = 5) -> float:
    """Median wall time of `forward_backward` (the first calls compile FlexAttention's kernels)."""
    grad = torch.randn_like(x)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for step in range(warmup + steps):
        x.grad = None
        for p in blocks.parameters():
            p.grad = None
        sync()
        start = time.perf_counter()
        forward_backward(blocks, x, grad, make_mask)
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def check_flex_matches_dense(config, document_ids: torch.Tensor) -> dict:
    """Largest differences between FlexAttention and the dense mask in one fp32 block of `config`
    on CUDA, relative to the largest value: its output and the gradient of its input."""
    from model.gpt import Block, document_mask, documents_apart_mask

    block = Block(config).to(document_ids.device)
    x = torch.randn(*document_ids.shape, config.n_embd, device=document_ids.device)  # (B, T, C)
    results = []
    for mask in (documents_apart_mask(document_ids, 0.0), document_mask(document_ids)):
        xi = x.clone().requires_grad_()
        y = block(xi, None, mask)
        y.square().mean().backward()
        results.append((y.detach(), xi.grad))
    (flex_y, flex_grad), (dense_y, dense_grad) = results
    return {"check_output_error": float((flex_y - dense_y).abs().max() / dense_y.abs().max()),
            "check_grad_error": float((flex_grad - dense_grad).abs().max() / dense_grad.abs().max())}


def measure() -> dict:
    from torch.nn.attention.flex_attention import BlockMask

    from model.config import preset
    from model.gpt import Block, document_mask, documents_apart_mask

    torch.manual_seed(0)
    config = preset("gpt2-124m", 50257)
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    packed = packed_document_ids(MICRO_BATCH, SEQ_LEN, g).to(device)
    one_document = torch.zeros_like(packed)
    assert isinstance(documents_apart_mask(packed, 0.0), BlockMask)  # training's own choice on CUDA
    numbers = {"documents_per_row": float((packed[:, -1] + 1).float().mean())}
    # The whole micro-batch: a batch of another size would make the compiled kernel's batch dynamic.
    numbers.update(check_flex_matches_dense(config, packed))

    blocks = torch.nn.ModuleList(Block(config) for _ in range(config.n_layer)).to(device, torch.bfloat16).train()
    x = torch.randn(MICRO_BATCH, SEQ_LEN, config.n_embd, device=device, dtype=torch.bfloat16, requires_grad=True)
    numbers["causal_ms"] = 1e3 * median_seconds(blocks, x, lambda: None)
    numbers["flex_ms"] = 1e3 * median_seconds(blocks, x, lambda: documents_apart_mask(packed, 0.0))
    numbers["flex_one_document_ms"] = 1e3 * median_seconds(blocks, x, lambda: documents_apart_mask(one_document, 0.0))
    numbers["dense_ms"] = 1e3 * median_seconds(blocks, x, lambda: document_mask(packed))
    numbers["flex_vs_causal"] = numbers["flex_ms"] / numbers["causal_ms"]  # target <= 1.15
    numbers["flex_one_document_vs_causal"] = numbers["flex_one_document_ms"] / numbers["causal_ms"]
    numbers["dense_vs_causal"] = numbers["dense_ms"] / numbers["causal_ms"]
    return numbers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention document masks are the CUDA path")
def test_flex_document_masks_against_plain_causal(record):
    numbers = measure()
    record("flex_document_masks", **numbers)
    # Numerics, not time: FlexAttention and the dense mask agree in fp32 (a wrong mask is off by
    # far more than rounding).
    assert numbers["check_output_error"] < 1e-3
    assert numbers["check_grad_error"] < 1e-3


if __name__ == "__main__":
    for name, value in measure().items():
        print(f"{name}: {value:.4g}")
