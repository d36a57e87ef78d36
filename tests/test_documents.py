"""Packed rows keep their documents apart: each document trains exactly as it would alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_workers import packed_document_losses
from distributed import run_distributed
from helpers import ARCHITECTURES, tiny_config
from model.chat import render_chat
from model.gpt import GPT, IGNORE_INDEX, document_mask, document_positions
from model.pipe import BlockPipe
from pipelines.data.loader import PackedRows, TokenWindows, to_batch
from pipelines.data.sft import pack_rows


def _model(vocab_size: int, arch: str) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(vocab_size, **ARCHITECTURES[arch])).eval()


def _target_losses(model: GPT, windows) -> torch.Tensor:
    """Cross entropy of every target of the first row (T,), NaN where it is outside the loss."""
    inputs, y = to_batch(windows, [0], document_end=windows.document_end)
    x, document_ids = inputs if isinstance(inputs, tuple) else (inputs, None)
    with torch.no_grad():
        logits, _ = model(x, document_ids=document_ids)
    losses = F.cross_entropy(logits[0].float(), y[0].clamp(min=0), reduction="none")
    return torch.where(y[0] == IGNORE_INDEX, torch.nan, losses)


def _assert_same_losses(packed: torch.Tensor, alone: torch.Tensor) -> None:
    assert (~alone.isnan()).sum() > 0  # the comparison covers supervised targets
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0, equal_nan=True)


def _rendered(tokenizer, messages):
    """A conversation as SFT preparation renders it: the template, then end-of-text outside the loss."""
    ids, mask = render_chat(tokenizer, messages)
    return ids + [tokenizer.eot_id], mask + [0]


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And times three?"},
     {"role": "assistant", "content": "Twelve."}],
]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_packed_sft_row_trains_each_conversation_as_if_alone(gpt2_tokenizer, arch):
    tok = gpt2_tokenizer
    row_len = 64  # the tiny model's block_size: rows of 63 inputs
    rendered = [_rendered(tok, chat) for chat in CHATS]
    counts = {"truncated": 0, "dropped_no_supervised_tokens": 0}
    tokens, mask = pack_rows(rendered, row_len, tok.eot_id, counts)
    assert len(tokens) == 1  # both conversations share one row
    packed = PackedRows(tokens, mask, row_len, document_end=tok.eot_id)
    model = _model(tok.n_vocab, arch)
    together = _target_losses(model, packed)
    start = 0
    for ids, conversation_mask in rendered:
        alone = PackedRows(*pack_rows([(ids, conversation_mask)], row_len, tok.eot_id, counts), row_len, document_end=tok.eot_id)
        _assert_same_losses(together[start : start + len(ids)], _target_losses(model, alone)[: len(ids)])
        start += len(ids)
    # Attending across the row (the option off) gives the second conversation another loss.
    across = _target_losses(model, PackedRows(tokens, mask, row_len))
    second = slice(len(rendered[0][0]), start)
    assert (across[second] - together[second]).nan_to_num().abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_pretraining_documents_train_as_if_alone(arch):
    eot = 299
    g = np.random.default_rng(0)
    documents = [np.append(g.integers(0, eot, n), eot) for n in (20, 30)]  # as preparation writes them
    stream = np.concatenate(documents)
    packed = TokenWindows(stream, len(stream) - 1, document_end=eot)
    model = _model(300, arch)
    together = _target_losses(model, packed)
    start = 0
    for doc in documents:
        alone = _target_losses(model, TokenWindows(doc, len(doc) - 1, document_end=eot))
        _assert_same_losses(together[start : start + len(doc) - 1], alone)
        start += len(doc)
        if start < len(together):  # a document's end-of-text would predict the next one's first token
            assert together[start - 1].isnan()
    assert (~together.isnan()).sum() == sum(len(doc) - 1 for doc in documents)


def test_document_ids_positions_and_mask_of_a_row():
    class Row:
        document_end = 9

        def window(self, i, offset=0):
            return np.array([1, 2, 9, 3, 9, 9, 4, 5]), None

    (x, document_ids), y = to_batch(Row(), [0], document_end=Row.document_end)
    assert x.tolist() == [[1, 2, 9, 3, 9, 9, 4]]
    assert document_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3]]  # end-of-text closes its document
    assert y.tolist() == [[2, 9, IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX, 5]]
    assert document_positions(document_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    mask = document_mask(document_ids)[0, 0]
    expected = [[j <= i and document_ids[0, i] == document_ids[0, j] for j in range(7)] for i in range(7)]
    assert mask.tolist() == expected
    assert to_batch(Row(), [0])[0].shape == (1, 7)  # without the option: plain (x, y)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_without_document_ids_the_plain_causal_kernel_runs(monkeypatch, arch):
    """The option off is the code path it was: SDPA with is_causal and no mask, in the GPT and in
    a pipeline block; and a row holding a single document gives the same logits through the mask."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs["attn_mask"], kwargs["is_causal"]))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = _model(300, arch)
    x = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        plain, _ = model(x)
        assert calls and all(mask is None and causal for mask, causal in calls)
        BlockPipe(model.config)(torch.randn(2, 24, model.config.n_embd))
        assert calls[-1] == (None, True)
        calls.clear()
        one_document, _ = model(x, document_ids=torch.zeros_like(x))
        assert calls and all(mask is not None and not causal for mask, causal in calls)
    torch.testing.assert_close(one_document, plain, atol=1e-5, rtol=0)


def test_on_by_default_for_sft_off_for_pretraining_and_only_a_boolean(tmp_path):
    import yaml

    from jobs.spec import JobError, load_job

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"name": "j", "tokenizer": {"encoding": "gpt2"}, "data": {
        "pretrain": {"sources": [{"type": "synthetic"}]}, "sft": {"sources": [{"type": "synthetic"}]}}}))
    job = load_job(path, [])
    assert not job.data.pretrain.separate_documents and job.data.sft.separate_documents
    assert load_job(path, ["data.pretrain.separate_documents=true"]).data.pretrain.separate_documents
    with pytest.raises(JobError, match="data.sft.separate_documents: Input should be a valid boolean"):
        load_job(path, ["data.sft.separate_documents=maybe"])


def test_document_ids_refuse_a_kv_cache_and_padding():
    from model.kv_cache import KVCache

    model = _model(300, "gpt2")
    x = torch.randint(0, 300, (1, 8))
    with pytest.raises(ValueError, match="no KV cache"):
        model(x, document_ids=torch.zeros_like(x), kv_cache=KVCache(model.config, 1, 16, device="cpu", dtype=torch.float32))
    with pytest.raises(ValueError, match="no padding mask"):
        model(x, document_ids=torch.zeros_like(x), attention_mask=torch.ones_like(x))


def test_recomputed_blocks_keep_documents_apart():
    from pipelines.train.recompute import checkpoint_blocks

    x = torch.randint(0, 300, (2, 24))
    document_ids = torch.randint(0, 2, (2, 24)).cumsum(dim=1)
    results = []
    for interval in (0, 2):
        model = _model(300, "modern").train()
        if interval:
            checkpoint_blocks(model, interval)
        _, loss = model(x, labels=torch.roll(x, -1, dims=1), document_ids=document_ids)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (plain_loss, plain_grads), (loss, grads) = results
    assert torch.equal(loss, plain_loss)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(grads, plain_grads))


@pytest.mark.slow
def test_kept_apart_rows_train_the_same_on_every_layout():
    """Document ids reach a ZeRO-3 model, travel between pipeline stages (also through
    recomputed chunks) and back through the backward pass: the losses of one plain stage, for
    each architecture (both in one launch per kind of engine, for the suite's time)."""
    configs = [dict(vocab_size=300, block_size=32, n_layer=4, n_head=4, n_embd=64, **ARCHITECTURES[arch]) for arch in ARCHITECTURES]
    layouts = [{"pipeline_stages": 1}, {"pipeline_stages": 2}, {"pipeline_stages": 2, "activation_checkpoint_interval": 1},
               {"zero_stage": 3}]
    # ZeRO-3 in processes of its own: DeepSpeed's global state does not take both kinds of engine.
    results = run_distributed(packed_document_losses, 2, configs, layouts[:3], 3, 299)
    sharded = run_distributed(packed_document_losses, 2, configs, layouts[3:], 3, 299)
    for rank, (plain, zero3) in enumerate(zip(results, sharded)):
        for arch, one_arch, zero3_arch in zip(ARCHITECTURES, plain, zero3):
            one, *others = one_arch + zero3_arch
            for layout, other in zip(layouts[1:], others):
                assert np.allclose(other["train"], one["train"], atol=1e-5, rtol=0), (arch, rank, layout, one, other)
                assert abs(other["eval"] - one["eval"]) < 1e-5, (arch, rank, layout, one, other)
