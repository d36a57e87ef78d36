"""Kept-apart documents through FlexAttention (CUDA's path) give what the dense mask gives.

On CUDA `documents_apart_mask` builds a BlockMask and attention runs flex_attention; on CPU the
dense (B, 1, T, T) mask and SDPA stay (FlexAttention has no backward on CPU in torch 2.13).
These tests run the FlexAttention path on CPU, forward only, eagerly, against the dense one.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

import model.gpt as gpt
from distributed import run_distributed
from dist_workers import pipeline_stage_document_masks
from helpers import ARCHITECTURES, tiny_config
from model.gpt import GPT, document_block_mask, document_mask, documents_apart_mask, flex_attend, uses_flex_attention

# flex_attention called eagerly warns that it is unfused: here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def _layouts() -> dict[str, torch.Tensor]:
    """Document ids (B, T) of packed rows; T=300 spans three 128-token tiles, the last one partial."""
    g = torch.Generator().manual_seed(0)
    T = 300
    short = (torch.rand(1, T, generator=g) < 0.1).long().cumsum(dim=1)  # documents of about ten tokens
    long = (torch.rand(1, T, generator=g) < 0.01).long().cumsum(dim=1)  # a few long ones
    at_tile = (torch.arange(T) >= 128).long()[None]  # a boundary exactly on a tile edge
    return {
        "one document": torch.zeros(1, T, dtype=torch.long),
        "many short documents": short,
        "a boundary at every position": torch.arange(T)[None],
        "rows of different layouts": torch.cat([short, long, at_tile, torch.zeros(1, T, dtype=torch.long)]),
        "short row": torch.tensor([[0, 0, 0, 1, 1, 2, 3]]),
    }


LAYOUTS = _layouts()


def _tiles(num_blocks: torch.Tensor, indices: torch.Tensor, num_kv_tiles: int) -> torch.Tensor:
    """Boolean (B, H, q tiles, kv tiles): the tiles a BlockMask's (num_blocks, indices) list."""
    B, H, num_q_tiles = num_blocks.shape
    tiles = torch.zeros(B, H, num_q_tiles, num_kv_tiles, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(num_q_tiles):
                tiles[b, h, i, indices[b, h, i, : num_blocks[b, h, i]].long()] = True
    return tiles


def _as_flex_applies_it(block_mask: BlockMask, B: int, T: int) -> torch.Tensor:
    """Boolean (B, 1, T, T): what FlexAttention lets through. Skipped tiles are closed, full tiles
    open without the rule, and partial tiles apply the rule element by element."""
    size = block_mask.BLOCK_SIZE[1]
    num_kv_tiles = -(-T // size)
    partial = _tiles(block_mask.kv_num_blocks, block_mask.kv_indices, num_kv_tiles)
    full = _tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, num_kv_tiles)
    assert not (partial & full).any()

    def per_token(tiles):  # (B, 1, q tiles, kv tiles) -> (B, 1, T, T)
        return tiles.repeat_interleave(size, dim=2).repeat_interleave(size, dim=3)[:, :, :T, :T]

    rule = create_mask(block_mask.mask_mod, B, 1, T, T, device="cpu")
    return (per_token(partial) & rule) | per_token(full)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_block_mask_is_the_dense_mask(layout):
    document_ids = LAYOUTS[layout]
    B, T = document_ids.shape
    block_mask = document_block_mask(document_ids)
    dense = document_mask(document_ids)
    assert torch.equal(create_mask(block_mask.mask_mod, B, 1, T, T, device="cpu"), dense)  # the rule
    assert torch.equal(_as_flex_applies_it(block_mask, B, T), dense)  # and the tiles it keeps


def test_the_block_mask_skips_tiles_across_documents():
    """The point of it: tiles between different documents (and above the diagonal) are skipped."""
    document_ids = (torch.arange(512) // 128)[None]  # four documents of one tile each
    block_mask = document_block_mask(document_ids)
    assert block_mask.kv_num_blocks.tolist() == [[[1, 1, 1, 1]]]  # only the diagonal tile, partial
    assert block_mask.full_kv_num_blocks.sum() == 0


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_flex_attention_output_equals_sdpa_with_the_dense_mask(layout, n_kv_head):
    document_ids = LAYOUTS[layout]
    B, T = document_ids.shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 4, T, 16, generator=g)  # (B, nh, T, hs)
    k, v = (torch.randn(B, n_kv_head, T, 16, generator=g) for _ in range(2))  # (B, nkv, T, hs)
    gqa = n_kv_head != 4
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(document_ids), enable_gqa=gqa)
    block_mask = document_block_mask(document_ids)
    torch.testing.assert_close(flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex_attend(q, k, v, block_mask, enable_gqa=gqa), expected, atol=1e-5, rtol=0)


def test_flex_attention_has_no_backward_on_cpu():
    """Why the dense mask stays on CPU: torch refuses FlexAttention's backward there."""
    document_ids = LAYOUTS["short row"]
    q, k, v = (torch.randn(1, 4, 7, 16, requires_grad=True) for _ in range(3))
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, k, v, block_mask=document_block_mask(document_ids))


def test_the_device_and_attention_dropout_choose_the_mask():
    assert uses_flex_attention(torch.device("cuda", 0), 0.0)
    assert not uses_flex_attention(torch.device("cuda", 0), 0.1)  # flex_attention has no dropout
    assert not uses_flex_attention(torch.device("cpu"), 0.0)  # nor a backward on CPU
    mask = documents_apart_mask(LAYOUTS["short row"], 0.0)
    assert isinstance(mask, torch.Tensor) and torch.equal(mask, document_mask(LAYOUTS["short row"]))


def _flex_everywhere(monkeypatch):
    """Make the decision pick FlexAttention on CPU, as it does on CUDA; count the masks built."""
    built = []
    block_mask = gpt.document_block_mask

    def counted(document_ids):
        built.append(document_ids.shape)
        return block_mask(document_ids)

    monkeypatch.setattr(gpt, "uses_flex_attention", lambda device, attention_dropout: attention_dropout == 0.0)
    monkeypatch.setattr(gpt, "document_block_mask", counted)
    return built


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_the_whole_model_gives_the_same_loss_through_flex_attention(monkeypatch, arch):
    torch.manual_seed(0)
    model = GPT(tiny_config(300, block_size=256, **ARCHITECTURES[arch])).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 300, (3, 200), generator=g)
    y = torch.randint(0, 300, (3, 200), generator=g)
    document_ids = (torch.rand(3, 200, generator=g) < 0.05).long().cumsum(dim=1)
    document_ids[2] = 0  # one row holding one document
    with torch.no_grad():
        dense_logits, dense_loss = model(x, labels=y, document_ids=document_ids)
        built = _flex_everywhere(monkeypatch)
        sdpa_calls = []
        monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1))
        flex_logits, flex_loss = model(x, labels=y, document_ids=document_ids)
    assert built == [(3, 200)] and not sdpa_calls  # one BlockMask for all layers, no SDPA
    torch.testing.assert_close(flex_loss, dense_loss, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex_logits, dense_logits, atol=1e-5, rtol=0)


def test_attention_dropout_in_training_keeps_the_dense_mask(monkeypatch):
    """flex_attention has no dropout: a model training with attention dropout gets SDPA and the
    dense mask even where FlexAttention would be chosen; the same model evaluating gets flex."""
    torch.manual_seed(0)
    model = GPT(tiny_config(300, dropout=0.1)).train()
    x = torch.randint(0, 300, (2, 24))
    document_ids = torch.randint(0, 2, (2, 24)).cumsum(dim=1)
    built = _flex_everywhere(monkeypatch)
    model(x, document_ids=document_ids)
    assert built == []
    with torch.no_grad():
        model.eval()(x, document_ids=document_ids)
    assert built == [(2, 24)]


def test_compiled_blocks_trace_flex_attention_whole_and_once(monkeypatch):
    """Blocks compiled as `compile: true` compiles them (here with a counting backend that runs
    the graph eagerly): flex_attention and its BlockMask trace without a graph break, and a new
    BlockMask every step (new document ids) reuses the graph instead of recompiling."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    model = GPT(tiny_config(300, block_size=256, **ARCHITECTURES["modern"])).eval()
    x = torch.randint(0, 300, (2, 200))
    rows = [(torch.rand(2, 200, generator=torch.Generator().manual_seed(seed)) < 0.05).long().cumsum(dim=1)
            for seed in range(3)]
    _flex_everywhere(monkeypatch)
    with torch.no_grad():
        eager = [model(x, document_ids=document_ids)[0] for document_ids in rows]
        counter = CompileCounter()
        for block in model.transformer.h:
            block.compile(backend=counter, fullgraph=True)
        compiled = [model(x, document_ids=document_ids)[0] for document_ids in rows]
    assert counter.frame_count == 1
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_a_pipeline_stage_builds_the_document_mask_once():
    """A one-stage DeepSpeed PipelineModule: one mask per forward for all its blocks, also when
    DeepSpeed recomputes them in the backward pass (a BlockMask rides through its checkpointing
    as a non-tensor argument, the dense mask as a tensor); the GPT's logits through FlexAttention
    and its gradients through the recomputed chunks. See dist_workers.pipeline_stage_document_masks."""
    kwargs = dict(vocab_size=300, block_size=64, n_layer=3, n_head=4, n_embd=64, **ARCHITECTURES["modern"])
    result = run_distributed(pipeline_stage_document_masks, 1, kwargs)[0]
    assert all(r["masks_built"] == 1 for r in result.values()), result
    assert result["flex"]["logits_error"] < 1e-5
    assert result["flex_recomputed"]["grad_error"] < 1e-6
    assert result["dense_recomputed"]["grad_error"] < 1e-6
