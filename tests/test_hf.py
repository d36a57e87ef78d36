"""Hugging Face interop for every architecture we train: GPT-2 and the Llama family, the
unpadded vocabulary, tokenizer files AutoTokenizer loads, the chat template."""

import json

import pytest
import torch

from helpers import ARCHITECTURES, hub_gpt2_dir, relaygpt, tiny_config
from model.chat import render_chat
from model.export import export_hf, import_hf, load_model_dir, save_model_dir
from model.generate import SamplingParams, generate
from model.gpt import GPT


def _perturbed(model):
    with torch.no_grad():  # non-trivial norms, so the comparison covers them
        for name, p in model.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_a_hub_gpt2_directory_through_native_and_back_keeps_its_vocabulary_and_logits(tmp_path, shared_data):
    from transformers import GPT2LMHeadModel

    hub = hub_gpt2_dir(tmp_path / "hub", shared_data, seed=2)
    theirs = GPT2LMHeadModel.from_pretrained(hub).eval()
    assert relaygpt("export", hub, "--out", tmp_path / "native", "--format", "native").returncode == 0
    proc = relaygpt("export", tmp_path / "native", "--out", tmp_path / "hf", "--format", "hf")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 50257
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        assert (again(ids).logits - theirs(ids).logits).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def llama_export(tmp_path_factory, gpt2_tokenizer):
    torch.manual_seed(4)
    model = _perturbed(GPT(tiny_config(gpt2_tokenizer.n_vocab, block_size=128, **ARCHITECTURES["modern"])))
    out = tmp_path_factory.mktemp("hf") / "llama"
    export_hf(model, gpt2_tokenizer, out)
    return model, out


def test_a_rope_rmsnorm_swiglu_gqa_model_is_a_llama_in_transformers(llama_export, gpt2_tokenizer):
    from transformers import AutoModelForCausalLM

    ours, out = llama_export
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    assert config["vocab_size"] == gpt2_tokenizer.n_vocab
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, gpt2_tokenizer.n_vocab, (2, 48))
    with torch.no_grad():
        expected = theirs(ids).logits
        got, _ = ours(ids)
    assert (got[..., : gpt2_tokenizer.n_vocab] - expected).abs().max().item() < 1e-4
    prompt = gpt2_tokenizer.encode("The quick brown fox")
    mine = generate(ours, [prompt], SamplingParams(max_new_tokens=16))[0].tokens
    with torch.no_grad():
        greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert greedy[0, len(prompt):].tolist()[: len(mine)] == mine
    back, tokenizer, meta = load_model_dir(out)  # imported again: the same model
    assert meta["format"] == "hf-llama" and tokenizer.sha256 == gpt2_tokenizer.sha256
    with torch.no_grad():  # the padding rows come back as zeros: only real ids compare
        assert (back(ids)[0][..., : gpt2_tokenizer.n_vocab] - got[..., : gpt2_tokenizer.n_vocab]).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokenizer_name", ["gpt2_tokenizer", "trained_tokenizer"])
def test_the_exported_tokenizer_and_chat_template_give_our_ids(tokenizer_name, request, tmp_path):
    """AutoTokenizer loads the export (GPT-2's encoding and a trained BPE alike) and encodes
    text as we do; apply_chat_template gives exactly our ids, with and without a system prompt."""
    from transformers import AutoTokenizer

    tok = request.getfixturevalue(tokenizer_name)
    model = GPT(tiny_config(tok.n_vocab, block_size=64))
    export_hf(model, tok, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["Hello world, it's 123 tokens!  \n\n ok", "ROMEO: O, she doth teach the torches to burn bright!", " é ü 東京"]:
        assert theirs.encode(text, add_special_tokens=False) == tok.encode(text), text
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    for messages in (user, [{"role": "system", "content": "Be terse."}, *user],
                     [*user, {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]):
        ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == render_chat(tok, messages, add_generation_prompt=True)[0]


def test_an_untied_gpt2_shaped_model_is_exported_as_neither_and_says_why(gpt2_tokenizer, tmp_path):
    from model.errors import RelayError

    with pytest.raises(RelayError, match="tie_embeddings is False"):
        export_hf(GPT(tiny_config(gpt2_tokenizer.n_vocab, tie_embeddings=False)), gpt2_tokenizer, tmp_path / "x")
    native = save_model_dir(GPT(tiny_config(gpt2_tokenizer.n_vocab)), gpt2_tokenizer, tmp_path / "n")
    model, tokenizer, _ = import_hf(export_hf(load_model_dir(native)[0], gpt2_tokenizer, tmp_path / "hf"))
    assert model.config.vocab_size == gpt2_tokenizer.n_vocab and tokenizer.sha256 == gpt2_tokenizer.sha256
