"""The GPT model: a plain decoder-only transformer with GPT-2 parameter names.

No distributed code lives here: data, tensor and pipeline parallelism are applied from the
outside (DeepSpeed wraps this module; `model/pipe.py` re-cuts the same blocks into pipeline
layers). Inference state (the KV cache, `model/kv_cache.py`) is passed in by the caller and
keeps its own books; decoding lives in `model/decode.py` and `model/generate.py`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model.config import GPTConfig
from model.masks import allowed_keys

if TYPE_CHECKING:
    from model.kv_cache import KVCache, StaticKVCache

IGNORE_INDEX = -100  # a label with this value contributes nothing to the loss


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: GPTConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for `position_ids` (B, T), each (B, 1, T, head_dim/2).

    Computed per forward in fp32: the cost is T * head_dim/2 multiplications, nothing next
    to the matmuls, and it keeps pipeline stages free of shared buffers.
    """
    inv_freq = rope_frequencies(config, position_ids.device)
    angles = position_ids.float()[:, None, :, None] * inv_freq  # (B, 1, T, hs/2)
    return angles.cos(), angles.sin()


def rope_frequencies(config: GPTConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """The rotary inverse frequencies theta^(-2i/d), i < d/2, rescaled as `rope_scaling` says.

    linear: every frequency divided by the factor. llama3: wavelengths shorter than the original
    context / high_freq_factor are kept, those longer than original context / low_freq_factor are
    divided by the factor, and in between the two are blended linearly in original context /
    wavelength (Llama 3.1's long-context recipe)."""
    half = config.head_dim // 2
    inv_freq = config.rope_theta ** (-torch.arange(0, half, device=device, dtype=torch.float32) / half)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    scaled = (1 - blend) * inv_freq / factor + blend * inv_freq
    return torch.where(wavelength > context / low, inv_freq / factor, torch.where(wavelength < context / high, inv_freq, scaled))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of every head of x (B, nh, T, hs) by the given angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that restart at 0 where each packed document begins.

    document_ids (B, T) number the documents of a packed row in order (a new id starts a new
    document): a token's position is its distance from the first token of its document.
    """
    B, T = document_ids.shape
    index = torch.arange(T, device=document_ids.device).expand(B, T)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) where each token's document starts
    return index - first


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask: a query sees earlier keys of its own document only.

    Block-diagonal causal attention keeps packed documents apart (every query sees at least
    itself, so no row is empty). SDPA takes this mask on every device, but a dense mask takes
    it off its flash kernels: on CUDA `document_block_mask` replaces it (see `uses_flex_attention`).
    """
    T = document_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()  # (T, T)
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """The same rule as `document_mask` (causal AND same document) as a FlexAttention BlockMask.

    create_block_mask evaluates the rule once per forward to sort the 128 x 128 tiles of
    (query, key) into empty (skipped), full (no mask read) and partial (the rule applied per
    element); every layer then reuses the result, so build it once, not per layer.
    """
    def same_document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    B, T = document_ids.shape
    # H=None: one mask broadcast over the heads, since documents do not depend on the head.
    return create_block_mask(same_document_causal, B, None, T, T, device=document_ids.device)


def uses_flex_attention(device: torch.device, attention_dropout: float) -> bool:
    """Whether kept-apart documents attend through FlexAttention (else SDPA with the dense mask).

    The one place that decides, from the device the document ids live on. On CUDA a dense
    (B, 1, T, T) mask sends SDPA to its slower kernels and costs B*T*T bytes, while
    FlexAttention keeps a fused kernel and skips the empty tiles. Elsewhere the dense mask
    stays: in torch 2.13 FlexAttention has no backward on CPU. flex_attention has no dropout
    either, so attention dropout in training keeps the dense path: slower, but what the
    config asks for.
    """
    return device.type == "cuda" and attention_dropout == 0.0


def documents_apart_mask(document_ids: torch.Tensor, attention_dropout: float) -> torch.Tensor | BlockMask:
    """The attention mask that keeps the documents of packed rows apart, in the form the
    attention on their device runs fastest with; CausalSelfAttention follows its type."""
    if uses_flex_attention(document_ids.device, attention_dropout):
        return document_block_mask(document_ids)
    return document_mask(document_ids)


@functools.cache
def compiled_flex_attention():
    """flex_attention through torch.compile, made once and shared by every layer (a new shape
    recompiles, a new BlockMask does not). Called eagerly it materialises the (B, nh, T, T)
    scores; compiled it is one fused kernel that skips the empty tiles."""
    return torch.compile(flex_attention)


def flex_attend(q, k, v, block_mask: BlockMask, enable_gqa: bool) -> torch.Tensor:
    """flex_attention of q (B, nh, T, hs) and k, v (B, nkv, T, hs) under `block_mask`."""
    if torch.compiler.is_compiling() or q.device.type != "cuda":
        # Inside a compiled block flex_attention becomes part of the block's graph. Off CUDA
        # (only tests come here: uses_flex_attention picks CUDA) the eager reference runs,
        # forward only on CPU, and no C++ compile is needed.
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    return compiled_flex_attention()(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_out, bias=config.attn_qkv_bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, attn_mask=None, kv_cache: KVCache | StaticKVCache | None = None, layer: int = 0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(
            [self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim], dim=2
        )
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, nkv, Tk, hs)
        q, k, v = self.gather_sequence(q, k, v)  # (sequence parallelism: this rank's heads, every token)
        if isinstance(attn_mask, BlockMask):
            # Kept-apart documents on CUDA (see uses_flex_attention, which never picks
            # FlexAttention while attention dropout is active: it has none).
            assert not (self.training and self.dropout > 0), "flex_attention has no dropout"
            y = flex_attend(q, k, v, attn_mask, enable_gqa=self.n_kv_head != self.n_head)  # (B, nh, T, hs)
        else:
            # Without a cache or a mask the plain causal kernel applies; a cache or padding
            # brings its own mask (built once per forward, by the cache or GPT.attention_mask).
            is_causal = attn_mask is None and kv_cache is None and q.size(2) > 1
            y = F.scaled_dot_product_attention(
                q, k, v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                enable_gqa=self.n_kv_head != self.n_head,
            )  # (B, nh, T, hs)
        y = self.scatter_sequence(y)  # (sequence parallelism: every head, this rank's tokens)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, nh * hs): C, or its slice under tensor parallelism
        return self.resid_dropout(self.c_proj(y))


    @staticmethod
    def gather_sequence(q, k, v):
        """Identity; model/sequence_parallel.py replaces it on a layer by an all-to-all that gives
        this rank every token of its share of the heads."""
        return q, k, v

    @staticmethod
    def scatter_sequence(y):
        """Identity; under sequence parallelism the inverse all-to-all of `gather_sequence`."""
        return y


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU fuses gate and up projections into one matmul (gate first).
        fc_out = config.mlp_hidden * (2 if self.swiglu else 1)
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=config.bias)
        self.c_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's "gelu_new"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, attn_mask=None, kv_cache=None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), rope, attn_mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over labels that are not IGNORE_INDEX, in fp32.

    A batch with no supervised token gives 0 (with a gradient of zeros) instead of NaN.
    """
    flat = labels.reshape(-1)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = (flat != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, *, initialize: bool = True, loss_fn=lm_loss) -> None:
        """`initialize=False` skips the GPT-2 initialisation, for a caller that writes every
        weight itself right after (a sharded build: initialising would gather each weight).
        `loss_fn(logits, labels)` is the mean loss: `lm_loss` by default; a trainer may pass a
        kernel that computes the same number without fp32 logits in memory."""
        super().__init__()
        self.config = config
        self.loss_fn = loss_fn
        modules = dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        )
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(modules)
        if config.tie_embeddings:
            # The head is the embedding matrix: built without a weight of its own (on the meta
            # device, so no vocabulary-sized tensor is allocated only to be dropped), then shared.
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False, device="meta")
            self.lm_head.weight = self.transformer.wte.weight
        else:
            self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if initialize:
            self.apply(lambda m: init_weights(m, config))

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        kv_cache: KVCache | StaticKVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, V) — (B, 1, V) with `last_only` — and the loss when labels are given.

        labels (B, T) are already aligned with the inputs (labels[t] is the token after
        input t); IGNORE_INDEX marks positions outside the loss.
        attention_mask (B, T) marks real tokens (0 on left padding); with a KV cache it
        covers the new tokens only and the cache remembers it for later steps.
        document_ids (B, T) keep the documents of a packed training row apart: attention
        stays within a document and positions restart at each one (see `document_mask`).
        kv_cache (model/kv_cache.py) holds the earlier tokens' keys and values and keeps its
        own books: where the new tokens go, which keys they may see.
        """
        B, T = input_ids.shape
        if document_ids is not None and (kv_cache is not None or attention_mask is not None):
            raise ValueError("document_ids keep the documents of packed training rows apart; "
                             "they take no KV cache and no padding mask")
        if position_ids is None and document_ids is not None:
            position_ids = document_positions(document_ids)  # (B, T), restarting per document
        elif position_ids is None and kv_cache is not None:
            position_ids = kv_cache.positions(B, T)  # (B, T), after the cached tokens
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        # A cache holds at most block_size positions (checked when it is made).
        if kv_cache is None and T > self.config.block_size and self.config.position == "learned":
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(input_ids)  # (B, T, C)
        if self.config.position == "learned":
            x = x + self.transformer.wpe(position_ids)
        x = self.transformer.drop(x)
        rope = rope_tables(self.config, position_ids) if self.config.position == "rope" else None
        if kv_cache is not None:
            attn_mask = kv_cache.attention_mask(T, attention_mask)
        else:
            attention_dropout = self.config.dropout if self.training else 0.0
            attn_mask = self.attention_mask(T, attention_mask, input_ids.device, document_ids, attention_dropout)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rope, attn_mask, kv_cache, i)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, V)
        loss = self.loss_fn(logits, labels) if labels is not None else None
        return logits, loss

    @staticmethod
    def attention_mask(T, padding_mask, device, document_ids=None,
                       attention_dropout: float = 0.0) -> torch.Tensor | BlockMask | None:
        """Boolean (B, 1, T, T) mask of allowed keys without a KV cache, or None when plain
        causal attention suffices; kept-apart documents on CUDA get a BlockMask instead (see
        `documents_apart_mask`)."""
        if document_ids is not None:  # (forward refuses them with padding or a cache)
            return documents_apart_mask(document_ids, attention_dropout)
        if padding_mask is None:
            return None
        return allowed_keys(torch.arange(T, device=device), T, padding_mask.bool())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def init_weights(module: nn.Module, config: GPTConfig) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, (CausalSelfAttention, MLP)):
        nn.init.normal_(module.c_proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
