"""KV caches: the keys and values of the tokens seen so far, for every layer, and their books.

Both kinds answer the four calls GPT.forward makes, in this order: `positions` (where new
tokens sit when the caller gives none), `attention_mask` (record which new tokens are real,
return the keys they may see), `update` (per layer: store the new keys and values, return
every key and value to attend to) and `advance` (the new tokens are in). The model never
edits a cache's fields.

- `KVCache` grows: attention reads the filled prefix only, so shapes change every step.
  On a CPU, where a step costs its arithmetic, reading no more than that is fastest.
- `StaticKVCache` never changes shape: the write position is a tensor on the device, keys
  and values are written in place at it, and attention reads the whole preallocated length
  through a mask of the valid keys built on the device. Every decode step is then the same
  kernels on the same tensors, which is what lets a CUDA graph replay it (model/decode.py).

Rows are left-padded to one length, so one position serves every row.
"""

from __future__ import annotations

import torch

from model.config import GPTConfig
from model.masks import allowed_keys


def _cache_shape(config: GPTConfig, batch_size: int, max_len: int) -> tuple[int, ...]:
    if max_len > config.block_size:
        raise ValueError(f"a KV cache of {max_len} positions exceeds block_size {config.block_size}")
    return (config.n_layer, batch_size, config.kv_heads, max_len, config.head_dim)


class KVCache:
    """Keys and values growing token by token; attention reads only the filled prefix.

    k, v: (n_layer, B, n_kv_head, max_len, head_dim). `length` is how many positions are
    filled. `key_mask` (B, max_len) marks the positions that hold real tokens; None means all do.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device, dtype) -> None:
        shape = _cache_shape(config, batch_size, max_len)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.key_mask: torch.Tensor | None = None

    def positions(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """Positions (B, T) of `seq_len` new tokens: right after the cached ones."""
        return torch.arange(self.length, self.length + seq_len, device=self.k.device).expand(batch_size, seq_len)

    def attention_mask(self, seq_len: int, padding_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Remember which of the new tokens are real (padding_mask (B, T); None: all), and
        return the (B, 1, T, Tk) mask of the keys they may see: None when one new token may
        see the whole cache."""
        end = self.length + seq_len
        if padding_mask is not None:
            if self.key_mask is None:
                self.key_mask = torch.ones(padding_mask.size(0), self.max_len, dtype=torch.bool, device=self.k.device)
            self.key_mask[:, self.length : end] = padding_mask.bool()
        if self.key_mask is None and seq_len == 1:
            return None
        key_mask = self.key_mask[:, :end] if self.key_mask is not None else None
        return allowed_keys(torch.arange(self.length, end, device=self.k.device), end, key_mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) after the cached positions; return all keys and values."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class StaticKVCache:
    """Keys and values in fixed-shape tensors, written in place at a position held on the device.

    k, v: (n_layer, B, n_kv_head, max_len, head_dim); key_mask (B, max_len) marks real tokens;
    `position` (a 0-d long tensor) is the slot the next token goes to. Nothing here reads a
    value back to the host, so a captured step replays with its effects: it writes its slot
    and moves `position` on. Writing past max_len is the caller's to prevent (decode.py sizes
    the cache for the whole generation): an index past the end is an error on a CPU and a
    device-side assert on a GPU.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, *, device, dtype) -> None:
        shape = _cache_shape(config, batch_size, max_len)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len

    def reset(self) -> None:
        """Empty, for the next batch. Keys and values stay as they are: attention gives every
        slot past a query's own a weight of exactly zero, and a slot is written before any
        query sits at or past it."""
        self.position.zero_()
        self.key_mask.fill_(True)

    def _slots(self, seq_len: int) -> torch.Tensor:
        """The cache slots (T,) of `seq_len` new tokens."""
        return self.position + torch.arange(seq_len, device=self.position.device)

    def positions(self, batch_size: int, seq_len: int) -> torch.Tensor:
        return self._slots(seq_len).expand(batch_size, seq_len)  # (B, T)

    def attention_mask(self, seq_len: int, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Remember which new tokens are real (padding_mask (B, T); None: all, as reset left
        them) and return the (B, 1, T, max_len) mask of the keys they may see."""
        slots = self._slots(seq_len)
        if padding_mask is not None:
            self.key_mask.index_copy_(1, slots, padding_mask.bool())
        return allowed_keys(slots, self.max_len, self.key_mask)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the position; return the whole (B, nkv, max_len, hs)."""
        slots = self._slots(k.size(2))
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, num_tokens: int) -> None:
        self.position.add_(num_tokens)
