"""Which keys a query may attend to: causal, and only real (not padding) tokens. One rule for
a padded batch without a cache (model/gpt.py) and for both KV caches (model/kv_cache.py)."""

from __future__ import annotations

import torch


def allowed_keys(query_slots: torch.Tensor, num_keys: int, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean (B, 1, T, Tk) mask — (1, 1, T, Tk) without key_mask — of the keys each query sees.

    Query t sits at key slot query_slots[t] (T,) and sees the keys up to its own slot (causal)
    that key_mask (B, Tk) marks as real tokens (None: all are).
    """
    keys = torch.arange(num_keys, device=query_slots.device)
    allowed = keys[None, :] <= query_slots[:, None]  # (T, Tk)
    if key_mask is None:
        return allowed[None, None]
    # A padding query would see no key at all and produce NaN, which then leaks through
    # zero attention weights; letting it see itself keeps every row finite.
    itself = keys[None, :] == query_slots[:, None]  # (T, Tk)
    return ((allowed[None] & key_mask[:, None, :]) | itself[None])[:, None]  # (B, 1, T, Tk)
