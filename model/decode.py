"""Decoding engines: left-padded prompts are prefilled into a KV cache in one forward, then
every step feeds one new token per row and returns the logits of the next.

- `DynamicDecoder`: the growing KVCache, run eagerly. The CPU's engine: a step there costs
  its arithmetic, and attending to the filled prefix only is the least arithmetic.
- `StaticDecoder`: the StaticKVCache, whose step has the same shapes every time. On a GPU a
  step of a small model is hundreds of small kernels launched one by one from Python, and the
  launches, not the arithmetic, bound it (gpt2-124m: 26 tokens/s at batch 1 on an H200). So
  the step is captured once as a CUDA graph and replayed: one launch per token. Without a
  graph (on a CPU) the same step runs eagerly, which is how the tests check it, token for
  token, against the dynamic engine. The prefill is always an eager forward.

`open_decoder` is the one place that picks: `auto` gives a model on a CUDA device the static
engine with a graph and any other the dynamic one. Static decoders are kept per model by
shape (batch size, cache length) and reused by later calls of that shape; cache lengths are
rounded up to a power of two so that nearby prompt lengths share one, and at most
MAX_IDLE_DECODERS wait unused per model (each holds a whole batch's cache).

Sampling stays outside the graph, eager, in model/generate.py for both engines: a handful of
launches next to the hundreds the graph saves, and the exact same code on every path (a
seeded generator, suppressed ids and the padded-vocabulary mask need no capture of their own).
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from model.gpt import GPT
from model.kv_cache import KVCache, StaticKVCache

DECODERS = ("auto", "dynamic", "static", "graph")
MAX_IDLE_DECODERS = 2  # per model: the batch being decoded and, say, a last partial one
WARMUP_STEPS = 2  # eager steps before a capture: lazy initialisations must not be captured


class DynamicDecoder:
    """The growing KV cache, eager: fresh for every generation."""

    def __init__(self, model: GPT, batch_size: int, max_len: int) -> None:
        weight = next(model.parameters())
        self.cache = KVCache(model.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)

    def prefill(self, model: GPT, input_ids, position_ids, padding_mask) -> torch.Tensor:
        """Logits (B, V) after the prompts input_ids (B, T); padding_mask (B, T) or None."""
        logits, _ = model(input_ids, position_ids=position_ids, attention_mask=padding_mask,
                          kv_cache=self.cache, last_only=True)
        return logits[:, -1]

    def step(self, model: GPT, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) after one more token per row; token and position_ids (B, 1)."""
        logits, _ = model(token, position_ids=position_ids, kv_cache=self.cache, last_only=True)
        return logits[:, -1]


class StaticDecoder(DynamicDecoder):
    """The fixed-shape KV cache; with `graph`, each step is a replay of one captured CUDA graph.

    A replay reads and writes the very tensors the capture saw, so the step's inputs are
    copied into `token` and `position_ids` first, and its logits are read from `logits`
    (overwritten by the next replay). The capture happens at the first step, after a prefill,
    and the graph serves every later generation of this shape. The model is an argument of
    each call rather than an attribute, so that a decoder kept for reuse does not keep its
    model alive (see _IdleDecoders).
    """

    def __init__(self, model: GPT, batch_size: int, max_len: int, *, graph: bool) -> None:
        weight = next(model.parameters())
        self.cache = StaticKVCache(model.config, batch_size, max_len, device=weight.device, dtype=weight.dtype)
        self.key = (batch_size, max_len, graph)
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)
        self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=weight.device)
        self.uses_graph = graph
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (B, 1, V), the captured step's output

    def prefill(self, model: GPT, input_ids, position_ids, padding_mask) -> torch.Tensor:
        self.cache.reset()
        return super().prefill(model, input_ids, position_ids, padding_mask)

    def step(self, model: GPT, token: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if not self.uses_graph:
            return super().step(model, token, position_ids)
        self.token.copy_(token)
        self.position_ids.copy_(position_ids)
        if self.graph is None:
            self.graph = self._capture(model)
        self.graph.replay()  # writes the cache slot, advances the position, fills self.logits
        return self.logits[:, -1]

    def _step_on_buffers(self, model: GPT) -> torch.Tensor:
        logits, _ = model(self.token, position_ids=self.position_ids, kv_cache=self.cache, last_only=True)
        return logits  # (B, 1, V)

    def _capture(self, model: GPT) -> torch.cuda.CUDAGraph:
        """Record one decode step on this cache and these buffers (it does not run it).

        The warm-up runs on a side stream, as capture requires, so that cuBLAS handles and
        kernel choices are made before capture. A warm-up step writes the slot the real step
        will write next and moves the position on; undoing the move leaves the cache as the
        prefill left it. The graph keeps its own memory pool (the default): decoders of
        several shapes replay in any order, and sharing one pool is safe only in capture order.
        Only this thread is held to capture's rules ("thread_local"): a generation worker's
        process has threads of its own (Ray's, a process group's watchdog) that may touch CUDA.
        """
        device = self.token.device
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._step_on_buffers(model)
                    self.cache.advance(-1)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.logits = self._step_on_buffers(model)
        return graph


def _weights_signature(model: GPT) -> tuple:
    """What a captured graph read its weights from: every tensor's address, dtype and shape
    (a model moved, cast or reloaded into new tensors needs new graphs)."""
    return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in itertools.chain(model.parameters(), model.buffers()))


class _IdleDecoders:
    """One model's static decoders waiting for their next generation, least recently used first.

    A decoder is taken out while in use, so two generations running at once (two chat
    streams, say) never share a cache: the second gets a decoder of its own.
    """

    def __init__(self) -> None:
        self.decoders: OrderedDict[tuple, StaticDecoder] = OrderedDict()
        self.weights: tuple | None = None

    def take(self, model: GPT, batch_size: int, max_len: int, graph: bool) -> StaticDecoder:
        weights = _weights_signature(model)
        if weights != self.weights:
            self.decoders.clear()  # captured against tensors that are gone
            self.weights = weights
        found = self.decoders.pop((batch_size, max_len, graph), None)
        return found or StaticDecoder(model, batch_size, max_len, graph=graph)

    def put(self, model: GPT, decoder: StaticDecoder) -> None:
        if _weights_signature(model) != self.weights:
            return
        self.decoders[decoder.key] = decoder
        while len(self.decoders) > MAX_IDLE_DECODERS:
            self.decoders.popitem(last=False)


_IDLE: weakref.WeakKeyDictionary[GPT, _IdleDecoders] = weakref.WeakKeyDictionary()


def idle_decoders(model: GPT) -> _IdleDecoders:
    """The static decoders kept for `model` (dropped with it)."""
    return _IDLE.setdefault(model, _IdleDecoders())


def decoder_kind(model: GPT, requested: str = "auto") -> str:
    """`dynamic`, `static` or `graph`: what `requested` means for this model's device."""
    if requested not in DECODERS:
        raise ValueError(f"decoder {requested!r}: expected one of {', '.join(DECODERS)}")
    cuda = next(model.parameters()).device.type == "cuda"
    if requested == "auto":
        return "graph" if cuda else "dynamic"
    if requested == "graph" and not cuda:
        raise ValueError("decoder 'graph' replays CUDA graphs: it needs a model on a CUDA device")
    return requested


def static_length(num_positions: int, block_size: int) -> int:
    """The cache length of a static decoder: the next power of two, at most the context."""
    return min(block_size, 1 << (num_positions - 1).bit_length())


@contextmanager
def open_decoder(model: GPT, batch_size: int, num_positions: int, kind: str = "auto") -> Iterator[DynamicDecoder]:
    """A decoder for `batch_size` rows of up to `num_positions` tokens (prompt + completion).

    A static one comes from the model's idle decoders and goes back to them when the
    generation ends, also when its caller stops early (a closed generator); after an error
    it is dropped, since a step that failed half-way leaves nothing worth reusing.
    """
    kind = decoder_kind(model, kind)
    if kind == "dynamic":
        yield DynamicDecoder(model, batch_size, num_positions)
        return
    idle = idle_decoders(model)
    decoder = idle.take(model, batch_size, static_length(num_positions, model.config.block_size), kind == "graph")
    try:
        yield decoder
    except GeneratorExit:
        idle.put(model, decoder)
        raise
    idle.put(model, decoder)
