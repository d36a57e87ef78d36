"""The GPT module against Hugging Face transformers and against plain PyTorch references."""

import pytest
import torch
import torch.nn.functional as F

from helpers import ARCHITECTURES, tiny_config
from model.export import export_hf, import_hf
from model.gpt import GPT, IGNORE_INDEX


def _random_model(vocab_size, seed=0, **overrides):
    torch.manual_seed(seed)
    model = GPT(tiny_config(vocab_size, **overrides)).eval()
    # Non-trivial norms and biases, so the comparison covers them too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def test_hf_export_gives_identical_logits_in_transformers(gpt2_tokenizer, tmp_path):
    from transformers import GPT2LMHeadModel

    ours = _random_model(gpt2_tokenizer.n_vocab)
    export_hf(ours, gpt2_tokenizer, tmp_path / "hf")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        expected = theirs(ids).logits
        got, _ = ours(ids)
    assert expected.shape[-1] == gpt2_tokenizer.n_vocab  # the unpadded vocabulary
    assert (got[..., : gpt2_tokenizer.n_vocab] - expected).abs().max().item() < 1e-4


def test_transformers_gpt2_imported_gives_identical_logits(shared_data, tmp_path):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf_config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=3, n_head=4)
    theirs = GPT2LMHeadModel(hf_config).eval()
    theirs.save_pretrained(tmp_path / "gpt2")  # the layout the hub ships
    shutil.copy(shared_data / "tiktoken" / "encoder.json", tmp_path / "gpt2" / "vocab.json")
    shutil.copy(shared_data / "tiktoken" / "vocab.bpe", tmp_path / "gpt2" / "merges.txt")
    ours, tokenizer, _ = import_hf(tmp_path / "gpt2")
    ids = torch.randint(0, 50257, (2, 50))
    with torch.no_grad():
        expected = theirs(ids).logits
        got, _ = ours(ids)
    assert (got[..., :50257] - expected).abs().max().item() < 1e-4
    assert tokenizer.name == "gpt2" and tokenizer.eot_id == 50256


def test_loss_is_cross_entropy_over_supervised_positions():
    model = _random_model(500)
    ids = torch.randint(0, 500, (2, 20))
    labels = torch.randint(0, 500, (2, 20))
    labels[0, :7] = IGNORE_INDEX
    logits, loss = model(ids, labels=labels)
    keep = labels != IGNORE_INDEX
    reference = F.cross_entropy(logits[keep].float(), labels[keep])
    assert torch.allclose(loss, reference, atol=1e-6)


def test_a_batch_without_supervised_tokens_gives_zero_loss_not_nan():
    model = _random_model(500).train()
    ids = torch.randint(0, 500, (2, 20))
    _, loss = model(ids, labels=torch.full_like(ids, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_padding_mask_leaves_real_tokens_unchanged(arch):
    """Left padding + mask + shifted positions == the unpadded sequence (what batching relies on)."""
    model = _random_model(300, **ARCHITECTURES[arch])
    ids = torch.randint(0, 300, (1, 12))
    plain, _ = model(ids)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], dim=1)
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    out, _ = model(padded, attention_mask=mask, position_ids=positions)
    assert torch.isfinite(out).all()
    assert (out[:, 5:] - plain).abs().max().item() < 1e-5


def test_sequence_longer_than_block_size_is_refused():
    model = _random_model(100)
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
