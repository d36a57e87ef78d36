"""Batched generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens.

Prompts of different lengths are left-padded into one batch; padding is masked out of
attention and positions count from each prompt's first real token, so a prompt produces the
same tokens alone as inside a batch. The KV cache and the decode step are model/decode.py's
engines (on a GPU a CUDA graph); this file samples, stops and collects. `generate_naive`
recomputes the whole sequence at every step, one prompt at a time: the deliberately simple
reference the fast paths are checked against.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

import torch

from model.decode import open_decoder
from model.errors import ConfigError
from model.gpt import GPT


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k / top_p apply to sampling only."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    suppress_token_ids: tuple[int, ...] = ()  # never produced (e.g. chat role markers inside a reply)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # nan compares false with everything
            raise ConfigError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop": a stop token ended it (not included); "length": out of budget


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p  # keep the first token past p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


def _mask_vocab(logits: torch.Tensor, vocab_size: int, suppress: tuple[int, ...] = ()) -> torch.Tensor:
    """Rows of the padded vocabulary are not tokens, and suppressed ids are not wanted: never pick them."""
    if logits.size(-1) > vocab_size:
        logits[..., vocab_size:] = float("-inf")
    if suppress:
        logits[..., list(suppress)] = float("-inf")
    return logits


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, padding mask (True on real tokens) and position ids, each (B, longest):
    the prompts left-padded, positions counted from each prompt's first real token."""
    longest = max(len(p) for p in prompts)
    input_ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    padding = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        padding[row, longest - len(prompt):] = True
    position_ids = (padding.long().cumsum(dim=1) - 1).clamp(min=0)
    return input_ids.to(device), padding.to(device), position_ids.to(device)


def _decode_steps(model: GPT, prompts: list[list[int]], params: SamplingParams, decoder: str) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step, until the budget or the window ends.
    `decoder` picks the engine (model/decode.py; `auto`: by the model's device)."""
    config = model.config
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError("every prompt needs at least one token")
    longest = max(lengths)
    if longest >= config.block_size:
        raise ValueError(f"a prompt of {longest} tokens leaves no room in the {config.block_size}-token context")
    num_new = min(config.block_size - longest, params.max_new_tokens)  # prompt + completion fit the window
    input_ids, padding, position_ids = left_padded(prompts, device)
    padded = not bool(padding.all())
    generator = _generator(params, device)
    with open_decoder(model, len(prompts), longest + num_new, decoder) as engine:
        with torch.inference_mode():
            logits = engine.prefill(model, input_ids, position_ids, padding if padded else None)
        next_position = position_ids[:, -1:] + 1  # (B, 1)
        for step in range(num_new):
            with torch.inference_mode():
                token = sample_next(_mask_vocab(logits, config.vocab_size, params.suppress_token_ids), params, generator)
            yield token
            if step == num_new - 1:
                return
            with torch.inference_mode():
                logits = engine.step(model, token[:, None], next_position)
            next_position = next_position + 1


LINEAR_KERNELS = ("row-major", "column-major", "onednn")


def prepare_for_inference(model: torch.nn.Module, kernel: str = "auto") -> torch.nn.Module:
    """Make a CPU model's Linear layers use the fastest matrix kernel of this machine, measured.

    Decoding multiplies a handful of rows by every weight, so a step is bound by how fast the
    kernel streams the weights, and that depends on the processor, not only on the arithmetic:

    - `row-major`: `F.linear` as trained (PyTorch's BLAS, MKL in the x86 wheels);
    - `column-major`: the same weights re-stored input-major in place; on an Intel CPU MKL's
      kernel for such skinny products streams them 1.4-1.9x faster (docs/PERFORMANCE.md);
    - `onednn`: the weights packed once for oneDNN, which compiles its kernel for the CPU's
      instruction set whoever made it; on an AMD EPYC MKL's fp32 kernel reached 7 GB/s and
      oneDNN's 15-20 GB/s (2.3-2.9x) on the same products.

    `auto` times the three on the model's largest Linear (8 rows) and applies the fastest to
    every Linear, a kernel displacing row-major only when clearly faster (`clearly_fastest`);
    the choice is kept in `model.linear_kernel`. All compute in fp32 what the trained layers
    compute (summation order aside). `onednn` keeps the packed copy instead of
    the dense weight, except where the weight is shared (a tied embedding keeps its dense
    weight for the lookup, and the head a packed copy beside it). Meant for inference
    copies of a model; training code keeps the default layout.
    """
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if kernel == "auto":
        kernel = fastest_linear_kernel(max((m for _, m in linears), key=lambda m: m.weight.numel())) if linears else "row-major"
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected auto or one of {', '.join(LINEAR_KERNELS)}")
    shared = _shared_weights(model)
    with torch.no_grad():
        for name, module in linears:
            if kernel == "column-major" and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
            elif kernel == "onednn":
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr,
                        PackedLinear(module, keep_weight=id(module.weight) in shared))
    model.linear_kernel = kernel
    return model.eval()


def _shared_weights(model: torch.nn.Module) -> set[int]:
    """ids of the parameters that more than one module holds (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(torch.nn.Module):
    """A Linear whose weight is packed for oneDNN's fp32 kernel (inference only)."""

    def __init__(self, linear: torch.nn.Linear, *, keep_weight: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8)  # hint: a decode batch
        self.bias = linear.bias
        if keep_weight:
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            raise RuntimeError("PackedLinear is for inference: run it under torch.inference_mode() or torch.no_grad()")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


CLEARLY_FASTER = 1.25  # what a kernel must beat the one chosen so far by


def fastest_linear_kernel(linear: torch.nn.Linear, rows: int = 8, repeats: int = 3) -> str:
    """The kernel (of LINEAR_KERNELS) that multiplies `rows` rows by this layer fastest here,
    by a clear margin (CLEARLY_FASTER); row-major where none is."""
    import time

    weight = linear.weight.detach()
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return "row-major"
    x = torch.randn(rows, linear.in_features)
    candidates = {"row-major": lambda: torch.nn.functional.linear(x, weight)}
    column = weight.t().contiguous().t()
    candidates["column-major"] = lambda: torch.nn.functional.linear(x, column)
    if _onednn_available():
        try:
            packed = PackedLinear(linear, keep_weight=False)
            packed(x)
            candidates["onednn"] = lambda: packed(x)
        except RuntimeError:  # a build whose oneDNN cannot take this weight: not a candidate
            pass
    best: dict[str, float] = {}
    with torch.inference_mode():
        for name, run in candidates.items():
            run()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            best[name] = min(times)
    return clearly_fastest(best)


def clearly_fastest(seconds: dict[str, float]) -> str:
    """In the fixed order of LINEAR_KERNELS, a kernel replaces the one chosen so far only when
    it is CLEARLY_FASTER: generation workers measure for themselves, and a near tie decided
    by timing noise would let two workers of one pool add in different orders."""
    chosen = "row-major"
    for name in LINEAR_KERNELS:
        if name in seconds and seconds[name] * CLEARLY_FASTER < seconds[chosen]:
            chosen = name
    return chosen


class _EvalMode:
    """Run inference in eval mode (no dropout), restoring the caller's mode after."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], params: SamplingParams, *, decoder: str = "auto") -> list[Completion]:
    """Complete every prompt (lists of token ids); results in input order. `decoder` is one
    of model/decode.py's DECODERS: `auto` (the default) is a CUDA graph on a GPU, the
    growing cache elsewhere."""
    completions = [Completion() for _ in prompts]
    stops = set(params.stop_token_ids)
    active = [True] * len(prompts)
    with _EvalMode(model), closing(_decode_steps(model, prompts, params, decoder)) as steps:
        for tokens in steps:
            for row, token in enumerate(tokens.tolist()):
                if not active[row]:
                    continue
                if token in stops:
                    completions[row].finish_reason, active[row] = "stop", False
                else:
                    completions[row].tokens.append(token)
            if not any(active):
                break
    return completions


def stream(model: GPT, prompt: list[int], params: SamplingParams, *, decoder: str = "auto") -> Iterator[int]:
    """Yield one prompt's new tokens as they are produced, ending before a stop token."""
    stops = set(params.stop_token_ids)
    with _EvalMode(model), closing(_decode_steps(model, [prompt], params, decoder)) as steps:
        for tokens in steps:
            token = int(tokens[0])
            if token in stops:
                return
            yield token


@torch.inference_mode()
def generate_naive(model: GPT, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
    """Reference: each prompt alone, the full sequence recomputed for every new token."""
    device = next(model.parameters()).device
    stops = set(params.stop_token_ids)
    out = []
    with _EvalMode(model):
        for prompt in prompts:
            generator = _generator(params, device)
            seq, completion = list(prompt), Completion()
            for _ in range(params.max_new_tokens):
                logits, _ = model(torch.tensor([seq], device=device), last_only=True)
                token = int(sample_next(_mask_vocab(logits[:, -1], model.config.vocab_size, params.suppress_token_ids), params, generator)[0])
                if token in stops:
                    completion.finish_reason = "stop"
                    break
                completion.tokens.append(token)
                seq.append(token)
                if len(seq) >= model.config.block_size:
                    break
            out.append(completion)
    return out
