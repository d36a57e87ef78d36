"""The relaygpt command end to end: generate, export, chat; bad input gives one line and exit 2."""

import json
import shutil
import pytest
import torch

from helpers import assert_one_line_error, relaygpt, tiny_config
from model.export import load_model_dir, save_model_dir
from model.gpt import GPT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_tokenizer):
    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab, block_size=128))
    return save_model_dir(model, trained_tokenizer, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory, shared_data):
    """A GPT-2 directory as the Hugging Face hub ships one (random weights, real tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("hub") / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4)).save_pretrained(path)
    shutil.copy(shared_data / "tiktoken" / "encoder.json", path / "vocab.json")
    shutil.copy(shared_data / "tiktoken" / "vocab.bpe", path / "merges.txt")
    return path


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_generate_writes_the_documented_format_in_input_order(model_dir, tmp_path):
    rows = [{"prompt": "ROMEO:", "id": 1}, {"prompt": "To be, or not to be, that is the question", "id": 2},
            {"prompt_tokens": [5, 6, 7], "id": 3}, {"prompt": "A", "id": 4}]
    prompts = _write_jsonl(tmp_path / "p.jsonl", rows)
    proc = relaygpt("generate", model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--max-new-tokens", 12, "--batch-size", 3)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == [1, 2, 3, 4]
    model, tok, _ = load_model_dir(model_dir)
    from model.generate import SamplingParams, generate

    for row in out:
        assert set(row) >= {"completion", "prompt_tokens", "completion_tokens", "finish_reason"}
        assert row["finish_reason"] in ("stop", "length")
        assert row["completion"] == tok.decode(row["completion_tokens"])
        alone = generate(model, [row["prompt_tokens"]], SamplingParams(max_new_tokens=12, stop_token_ids=(tok.eot_id,)))[0]
        assert alone.tokens == row["completion_tokens"]
    assert out[2]["prompt_tokens"] == [5, 6, 7]


def test_generate_chat_renders_messages_and_stops_at_end_of_turn(model_dir, tmp_path):
    from model.chat import render_chat

    _, tok, _ = load_model_dir(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"}]
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"messages": messages}, {"prompt": "Hello"}])
    proc = relaygpt("generate", model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--chat", "--max-new-tokens", 8)
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert out[0]["prompt_tokens"] == render_chat(tok, messages, add_generation_prompt=True)[0]
    assert out[1]["prompt_tokens"][-1] == tok.assistant_id
    assert all(tok.end_of_turn_id not in r["completion_tokens"] for r in out)


def test_generate_bad_input_is_one_line_exit_2(model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": oops}\n')
    assert_one_line_error(relaygpt("generate", model_dir, "--prompts", bad, "--out", tmp_path / "o.jsonl"), "bad.jsonl:2", "invalid JSON")
    _write_jsonl(bad, [{"text": "no prompt field"}])
    assert_one_line_error(relaygpt("generate", model_dir, "--prompts", bad, "--out", tmp_path / "o.jsonl"), "bad.jsonl:1", "'prompt'")
    _write_jsonl(bad, [{"messages": [{"role": "wizard", "content": "hi"}]}])
    assert_one_line_error(relaygpt("generate", model_dir, "--prompts", bad, "--out", tmp_path / "o.jsonl", "--chat"), "bad.jsonl:1", "unknown role 'wizard'")
    assert_one_line_error(relaygpt("generate", tmp_path / "nomodel", "--prompts", bad, "--out", tmp_path / "o.jsonl"), "nomodel", "does not exist")
    assert_one_line_error(relaygpt("generate", model_dir, "--prompts", tmp_path / "none.jsonl", "--out", tmp_path / "o.jsonl"), "none.jsonl", "does not exist")
    _write_jsonl(bad, [{"prompt": "x"}])
    assert_one_line_error(relaygpt("generate", model_dir, "--prompts", bad, "--out", tmp_path / "o.jsonl", "--top-p", "2"), "top_p")
    assert not (tmp_path / "o.jsonl").exists()


def test_hf_hub_directory_works_with_export_generate_and_chat(hf_gpt2_dir, tmp_path, shakespeare):
    import tiktoken

    model, tok, _ = load_model_dir(hf_gpt2_dir)
    assert tok.encode(shakespeare[:20000]) == tiktoken.get_encoding("gpt2").encode_ordinary(shakespeare[:20000])
    proc = relaygpt("export", hf_gpt2_dir, "--out", tmp_path / "native", "--format", "native")
    assert proc.returncode == 0, proc.stderr
    native, _, meta = load_model_dir(tmp_path / "native")
    ids = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        assert torch.equal(native(ids)[0], model(ids)[0])
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hello there"}, {"prompt": "Once upon a time, in a land"}])
    for source in (hf_gpt2_dir, tmp_path / "native"):
        proc = relaygpt("generate", source, "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--max-new-tokens", 6)
        assert proc.returncode == 0, proc.stderr
    proc = relaygpt("chat", hf_gpt2_dir, "--max-new-tokens", 5, stdin="hello\n/exit\n")
    assert proc.returncode == 0 and "assistant> " in proc.stdout, proc.stderr


def test_export_to_hf_and_back_round_trips(model_dir, tmp_path):
    assert relaygpt("export", model_dir, "--out", tmp_path / "hf", "--format", "hf").returncode == 0
    assert relaygpt("export", tmp_path / "hf", "--out", tmp_path / "back").returncode == 0
    a, tok_a, _ = load_model_dir(model_dir)
    b, tok_b, _ = load_model_dir(tmp_path / "back")
    assert tok_a.identity == tok_b.identity and a.config.vocab_size == b.config.vocab_size
    ids = torch.randint(0, tok_a.n_vocab, (2, 20))
    with torch.no_grad():
        assert torch.allclose(a(ids)[0], b(ids)[0], atol=1e-6)


def test_chat_script_honours_commands_and_the_context_window(model_dir):
    script = "\n".join(["hello", "/system You are a poet.", "how are you?", "/temperature 0", "/reset", "again", "/bogus", "/exit", "never read"]) + "\n"
    proc = relaygpt("chat", model_dir, "--max-new-tokens", 6, "--system", "Be brief.", stdin=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("assistant> ") == 3
    assert "(system prompt set; conversation cleared)" in out and "(conversation cleared)" in out
    assert "(temperature 0.0)" in out and "unknown command /bogus" in out


def test_chat_drops_oldest_turns_but_keeps_the_system_prompt(model_dir):
    from model.generate import SamplingParams
    from pipelines.generation.chat import ChatSession

    model, tok, _ = load_model_dir(model_dir)
    session = ChatSession(model, tok, system="Always answer in verse.", params=SamplingParams(max_new_tokens=8))
    for i in range(12):
        reply = "".join(session.reply(f"Tell me about the castle number {i}, its towers and its long history."))
        assert session.turns[-1] == {"role": "assistant", "content": reply.strip()}  # what streamed is what the history keeps
        assert "<|" not in reply  # this untrained model's favourite token is <|assistant|>: suppressed inside a reply
        prompt = session.prompt()
        assert len(prompt) + session.min_reply_tokens <= model.config.block_size
        assert prompt[0] == tok.system_id  # the system prompt survives every trim
    assert session.dropped_turns > 0
    assert session.turns[-2]["content"].endswith("number 11, its towers and its long history.")
