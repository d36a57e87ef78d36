"""The relaygpt command end to end: generate, export, chat; bad input gives one line and exit 2."""

import json
import shutil
import pytest
import torch

from helpers import assert_one_line_error, hub_gpt2_dir, relaygpt, tiny_config
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
    return hub_gpt2_dir(tmp_path_factory.mktemp("hub") / "gpt2", shared_data, seed=3)


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


# ---- bad inputs that once escaped as tracebacks or were taken silently (issue 14) -----------

def _run_cli(capsys, *args):
    """`relaygpt ARGS` in this process: (exit status, stdout, stderr)."""
    import cluster.cli as cli

    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_refused(result, *needles):
    code, _, err = result
    err = err.strip()
    assert code == 2 and "Traceback" not in err and "\n" not in err, (code, err)
    for needle in needles:
        assert needle in err, err


def _edited_model_dir(model_dir, tmp_path, edit):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    meta = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(edit(meta)))
    return copy


def _without(meta, *keys):
    section = meta
    for key in keys[:-1]:
        section = section[key]
    del section[keys[-1]]
    return meta


@pytest.mark.parametrize("name, edit, needles", [
    ("no model section", lambda m: _without(m, "model"), ["config.json: 'model' must be an object"]),
    ("a JSON list", lambda m: [m], ["config.json: expected a JSON object", "got a JSON list"]),
    ("tokenizer without sha256", lambda m: _without(m, "tokenizer", "sha256"), ["config.json: 'tokenizer' must be an object with", "'sha256'"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_export_of_a_broken_native_config_is_one_line(name, edit, needles, model_dir, tmp_path, capsys):
    source = _edited_model_dir(model_dir, tmp_path, edit)
    _assert_refused(_run_cli(capsys, "export", source, "--out", tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", ["vocab_size", "n_layer"])
def test_export_of_a_gpt2_config_without_its_sizes_is_one_line(missing, tmp_path, capsys):
    hf = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2}
    del hf[missing]
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(hf))
    _assert_refused(_run_cli(capsys, "export", tmp_path / "hub", "--out", tmp_path / "out"),
                    "hub/config.json: no " + missing, "vocab_size, n_layer, n_head and n_embd")


@pytest.mark.parametrize("name, row, flags, needles", [
    ("prompt as long as the context", {"prompt_tokens": [5] * 128}, [], ["p.jsonl:1: the prompt is 128 tokens", "at most 127"]),
    ("prompt longer than the context", {"prompt": "To be, or not to be " * 60}, [], ["p.jsonl:1: the prompt is", "128-token context"]),
    ("empty prompt", {"prompt": ""}, [], ["p.jsonl:1: the prompt is empty"]),
    ("empty prompt_tokens", {"prompt_tokens": []}, [], ["p.jsonl:1: the prompt is empty"]),
    ("messages not a list", {"messages": "hello"}, ["--chat"], ["p.jsonl:1: 'messages' must be a non-empty list", 'got "hello"']),
    ("messages without --chat", {"messages": "hello"}, [], ["p.jsonl:1: 'messages' needs --chat"]),
    ("prompt not text", {"prompt": 5}, [], ["p.jsonl:1: 'prompt' must be text, got 5"]),
    ("temperature nan", {"prompt": "hi"}, ["--temperature", "nan"], ["--temperature", "finite number >= 0", "got nan"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_generate_refuses_bad_rows_and_flags_in_one_line(name, row, flags, needles, model_dir, tmp_path, capsys):
    prompts = _write_jsonl(tmp_path / "p.jsonl", [row])
    _assert_refused(_run_cli(capsys, "generate", model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl", *flags), *needles)
    assert not (tmp_path / "o.jsonl").exists()


def test_generate_to_an_existing_directory_fails_before_any_work(tmp_path, capsys):
    """--out is checked first: the model directory here does not even exist, and the error is
    about --out; nothing (no .tmp file) is left beside it."""
    (tmp_path / "taken").mkdir()
    prompts = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    _assert_refused(_run_cli(capsys, "generate", tmp_path / "no-model", "--prompts", prompts, "--out", tmp_path / "taken"),
                    "--out", "taken: is a directory; give a file name")
    _assert_refused(_run_cli(capsys, "generate", tmp_path / "no-model", "--prompts", prompts, "--out", prompts / "o.jsonl"),
                    "p.jsonl is a file, not a directory")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["p.jsonl", "taken"]


def test_chat_refuses_a_temperature_that_is_not_a_number(model_dir, capsys):
    proc = relaygpt("chat", model_dir, "--max-new-tokens", 3, stdin="/temperature nan\n/temperature inf\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(temperature must be a finite number >= 0, got 'nan')") == 1, proc.stdout
    assert "got 'inf'" in proc.stdout, proc.stdout
    _assert_refused(_run_cli(capsys, "chat", model_dir, "--temperature", "nan"), "--temperature", "finite number")


def test_tokenizer_train_out_under_a_file_is_refused_before_training(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n")
    _assert_refused(_run_cli(capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", corpus / "tok"),
                    "--out", "corpus.txt is a file, not a directory")
    _assert_refused(_run_cli(capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", corpus),
                    "corpus.txt is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt"]


def test_tokenizer_train_says_when_the_corpus_allows_fewer_ids_than_asked(tmp_path, capsys):
    """Decided: a warning, not an error. BPE stops when every word is one token; the tokenizer
    is complete and the model's vocabulary is its real size, and only more text gives more ids."""
    corpus = tmp_path / "one-record.txt"
    corpus.write_text("hello world\n")
    code, out, _ = _run_cli(capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", 512, "--out", tmp_path / "tok")
    from model.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(tmp_path / "tok").n_vocab
    assert code == 0 and ids < 512
    assert f"warning: the corpus allowed only {ids} ids, not the 512 asked for" in out, out


def _task(tmp_path, shots, rows):
    data = _write_jsonl(tmp_path / "rows.jsonl", rows)
    task = tmp_path / "task.yaml"
    task.write_text(f"name: long\nsource: {{file: {data.name}}}\ninput_field: q\ntarget_field: a\nshots: {shots}\nmax_new_tokens: 4\n")
    return task


def test_eval_whose_few_shot_prompt_exceeds_the_context_is_refused_before_generating(model_dir, tmp_path, capsys):
    rows = [{"q": f"Question {i}: tell me again of the king, the queen and the castle on the hill", "a": str(i)} for i in range(12)]
    _assert_refused(_run_cli(capsys, "eval", model_dir, "--task", _task(tmp_path, 8, rows), "--out", tmp_path / "out"),
                    "task long: example 0's prompt is", "with its 8 few-shot example(s)", "128-token context", "lower the task's shots")
    assert not (tmp_path / "out").exists()


def test_eval_data_is_relative_to_the_current_folder(tmp_path, monkeypatch):
    from model.errors import RelayError
    from pipelines.eval.task import load_task

    (tmp_path / "tasks").mkdir()
    task = _task(tmp_path / "tasks", 0, [{"q": "in the task folder", "a": "1"}])
    _write_jsonl(tmp_path / "rows.jsonl", [{"q": "in the current folder", "a": "2"}])
    monkeypatch.chdir(tmp_path)
    assert load_task(str(task), data_file="rows.jsonl").examples[0]["input"] == "in the current folder"
    monkeypatch.chdir(tmp_path / "tasks")
    assert load_task(str(task)).examples[0]["input"] == "in the task folder"  # the task's own source: its folder
    with pytest.raises(RelayError, match=r"^--data: data file .*nothing.jsonl does not exist"):
        load_task(str(task), data_file="nothing.jsonl")


def test_a_task_file_with_a_repeated_key_is_refused(model_dir, tmp_path, capsys):
    task = _task(tmp_path, 0, [{"q": "x", "a": "1"}])
    task.write_text(task.read_text() + "shots: 1\n")
    _assert_refused(_run_cli(capsys, "eval", model_dir, "--task", task), "task.yaml:7: key 'shots' is repeated (first at line 5)")
