"""Evaluation tasks on the real GSM8K / BBH files, and generation workers on Ray."""

import json

import pytest
import torch

from helpers import assert_one_line_error, relaygpt, tiny_config
from model.export import save_model_dir
from model.gpt import GPT
from pipelines.eval.task import extract_number, load_task, normalize, render_prompt, score


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return load_task("gsm8k", data_file=str(shared_data / "eval" / "gsm8k_test.jsonl"))


def test_gsm8k_loads_with_few_shot_and_extracts_answers(gsm8k, shared_data):
    rows = [json.loads(line) for line in (shared_data / "eval" / "gsm8k_test.jsonl").read_text().splitlines()]
    assert len(gsm8k.fewshot) == 4 and len(gsm8k.examples) == len(rows) - 4
    first = gsm8k.examples[0]
    assert first["input"] == rows[4]["question"] and extract_number(first["target"]) == rows[4]["answer"].split("####")[-1].strip().replace(",", "")
    # Every reference in the file has a '####' answer that parses.
    assert all(extract_number(r["answer"]) is not None for r in rows)
    assert extract_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert extract_number("so the total is $1,234.") == "1234"
    assert extract_number("The answer is 18.0") == "18"
    prompt = render_prompt(gsm8k, first)["prompt"]
    assert prompt.count("Question:") == 5 and prompt.endswith("Answer:")


def test_gsm8k_scores_known_predictions(gsm8k):
    ex = gsm8k.examples[0]
    right = extract_number(ex["target"])
    assert score("numeric", f"Let me think. ... so it is {right}.", ex["target"])
    assert score("numeric", f"steps\n#### {right}", ex["target"])
    assert not score("numeric", f"#### {int(right) + 1}", ex["target"])
    assert not score("numeric", "I do not know", ex["target"])


@pytest.mark.parametrize("task", ["boolean_expressions", "multistep_arithmetic_two", "object_counting"])
def test_bbh_tasks_load_and_score(task, shared_data):
    loaded = load_task(f"bbh_{task}", data_file=str(shared_data / "eval" / "bbh" / f"{task}.json"))
    raw = json.loads((shared_data / "eval" / "bbh" / f"{task}.json").read_text())["examples"]
    assert len(loaded.examples) == len(raw) - 3
    for ex in loaded.examples[:20]:
        assert score("multiple_choice", ex["target"] + "\nBecause...", ex["target"])
        assert score("multiple_choice", f" {ex['target']}.", ex["target"])
    wrong = {"True": "False", "False": "True"}
    ex = loaded.examples[0]
    other = wrong.get(ex["target"], "-99999")
    assert not score("multiple_choice", other, ex["target"])


def test_exact_match_normalises():
    assert normalize("  The Brightwater!! ") == "brightwater"
    assert score("exact_match", "brightwater.", "Brightwater")
    assert not score("exact_match", "Brightwater city", "Brightwater")


def test_task_errors_are_clear(tmp_path):
    from model.errors import RelayError

    with pytest.raises(RelayError, match="neither a task file nor a shipped task"):
        load_task("nope")
    bad = tmp_path / "t.yaml"
    bad.write_text("name: t\nsource: {file: d.jsonl}\nmetric: bleu\n")
    with pytest.raises(RelayError, match="metric must be one of"):
        load_task(str(bad))
    bad.write_text("name: t\nsource: {file: d.jsonl}\n")
    with pytest.raises(RelayError, match="d.jsonl does not exist"):
        load_task(str(bad))
    (tmp_path / "d.jsonl").write_text('{"question": "x"}\n')
    bad.write_text("name: t\nsource: {file: d.jsonl}\ninput_field: question\n")
    with pytest.raises(RelayError, match="example 0 lacks 'question' or 'target'"):
        load_task(str(bad))


@pytest.mark.slow
def test_generate_with_two_workers_equals_one(ray_head, tmp_path, trained_tokenizer):
    """One worker generates in-process; two are a Ray Data actor pool on the session's cluster."""
    torch.manual_seed(0)
    model_dir = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, block_size=128)), trained_tokenizer, tmp_path / "m")
    texts = ["To be", "ROMEO: O, she doth teach the torches to burn bright!", "A", "What light through yonder window breaks?",
             "First Citizen: Before we proceed any further, hear me speak.", "Nay"] * 3
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(texts)))
    common = ["generate", model_dir, "--prompts", prompts, "--max-new-tokens", 16, "--batch-size", 4]
    one = relaygpt(*common, "--out", tmp_path / "one.jsonl")
    two = relaygpt(*common, "--out", tmp_path / "two.jsonl", "--workers", 2, "--address", ray_head.address, env=ray_head.env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    # Ray's and the pool's lines are in the log beside the output, not on the terminal.
    assert two.stderr == "" and two.stdout.splitlines() == [f"Ray and generation worker output: {tmp_path / 'two.jsonl'}.log",
                                                             f"wrote {len(texts)} completions to {tmp_path / 'two.jsonl'}"], two.stdout + two.stderr
    assert "GenerationWorker" in (tmp_path / "two.jsonl.log").read_text()
    one, two = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    assert one == two
    assert [json.loads(line)["id"] for line in two.splitlines()] == list(range(len(texts)))


def test_a_pool_the_cluster_cannot_hold_is_one_line(ray_head, tmp_path, trained_tokenizer):
    model_dir = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab)), trained_tokenizer, tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "To be"}) + "\n")
    proc = relaygpt("generate", model_dir, "--prompts", prompts, "--out", tmp_path / "o.jsonl", "--workers", 64,
                    "--address", ray_head.address, env=ray_head.env)
    assert_one_line_error(proc, "generation workers: 64 worker(s) need 64 CPUs", "the Ray cluster has 8")
    assert not (tmp_path / "o.jsonl").exists()


def test_bits_per_byte_task_matches_a_direct_computation(tmp_path, trained_tokenizer, shakespeare):
    import math

    from pipelines.generation.worker import GenerationWorker
    from pipelines.train.metrics import bits_per_byte

    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab, block_size=64)).eval()
    model_dir = save_model_dir(model, trained_tokenizer, tmp_path / "m")
    texts = [shakespeare[500_000:500_300], shakespeare[600_000:600_050]]
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    task = load_task("text_bpb", data_file=str(tmp_path / "held.jsonl"))
    assert task.metric == "bpb" and [e["target"] for e in task.examples] == texts
    scored = GenerationWorker(str(model_dir), {}, False, work="score_texts").run([{"score_text": t} for t in texts])  # what the pool runs
    got = bits_per_byte(sum(r["nats"] for r in scored), sum(r["bytes"] for r in scored))
    # Reference: token by token with the full preceding context of each 64-token window.
    nats, nbytes = 0.0, 0
    for text in texts:
        ids = [trained_tokenizer.eot_id] + trained_tokenizer.encode(text)
        nbytes += len(text.encode())
        for start in range(0, len(ids) - 1, 64):
            chunk = ids[start:start + 65]
            with torch.no_grad():
                logits, _ = model(torch.tensor([chunk[:-1]]))
            logp = torch.log_softmax(logits[0].float(), -1)
            nats -= sum(float(logp[i, chunk[i + 1]]) for i in range(len(chunk) - 1))
    assert abs(got - nats / (math.log(2) * nbytes)) < 1e-4
    assert 2 < got < 8  # an untrained model: ~log2(900) bits per token over ~2.4 bytes per token
    from cluster.cli import main

    assert main(["eval", str(model_dir), "--task", "text_bpb", "--data", str(tmp_path / "held.jsonl"), "--out", str(tmp_path / "e")]) == 0
    assert abs(json.loads((tmp_path / "e" / "metrics.json").read_text())["model"]["text_bpb"] - got) < 1e-9


def test_assistants_are_prompted_through_their_chat_template(tmp_path, trained_tokenizer, shared_data):
    """An SFT export is evaluated through the chat template (system prompt first, few-shot
    examples as earlier turns), a base model with few-shot text; report.md says which."""
    from pipelines.eval.run import model_style
    from pipelines.eval.task import render_prompt

    gsm8k = load_task("gsm8k", data_file=str(shared_data / "eval" / "gsm8k_test.jsonl"), limit=2)
    chat = render_prompt(gsm8k, gsm8k.examples[0], style="chat", system="Be brief.")["messages"]
    assert chat[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in chat[1:]] == ["user", "assistant"] * gsm8k.shots + ["user"]
    assert chat[2]["content"] == gsm8k.fewshot[0]["target"] and chat[-1]["content"].startswith("Question: ")
    assert "prompt" in render_prompt(gsm8k, gsm8k.examples[0])

    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab, block_size=2048))  # four worked examples of GSM8K fit
    base = save_model_dir(model, trained_tokenizer, tmp_path / "base", provenance={"stage": "pretrain"})
    assistant = save_model_dir(model, trained_tokenizer, tmp_path / "assistant", provenance={"stage": "sft"})
    assert (model_style(base), model_style(assistant)) == ("completion", "chat")
    from cluster.cli import main

    data = str(shared_data / "eval" / "gsm8k_test.jsonl")
    for model_dir, flags, style in ((assistant, [], "chat"), (assistant, ["--style", "completion"], "completion"), (base, [], "completion")):
        out = tmp_path / f"e-{model_dir.name}-{style}"
        assert main(["eval", str(model_dir), "--task", "gsm8k", "--data", data, "--limit", "2", "--out", str(out),
                     "--system", "Be brief.", *flags]) == 0
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        assert [r["style"] for r in rows] == [style, style]
        assert f"({style})" in (out / "report.md").read_text()


def test_an_interrupted_evaluation_leaves_no_metrics_json(tmp_path, trained_tokenizer, shared_data):
    """metrics.json is written last, and an older one is removed when an evaluation starts: an
    evaluation that fails part-way (here: its second model is missing) leaves none behind."""
    from model.errors import RelayError
    from pipelines.eval.run import evaluate_models
    from pipelines.generation.worker import GenerationWorker
    from pipelines.rundir import EvalDir

    torch.manual_seed(0)
    model_dir = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, block_size=2048)), trained_tokenizer, tmp_path / "m")
    task = load_task("gsm8k", data_file=str(shared_data / "eval" / "gsm8k_test.jsonl"), limit=1)
    task.max_new_tokens = 4
    out = EvalDir(tmp_path / "e")
    out.root.mkdir()
    out.metrics.write_text('{"model": {"gsm8k": 1.0}}\n')  # an earlier run's result

    def generate(model_dir, rows, *, work, params=None, chat=False):
        return GenerationWorker(model_dir, params or {}, chat, 4, work=work).run(rows)

    with pytest.raises(RelayError, match="no model directory"):
        evaluate_models({"first": model_dir, "second": tmp_path / "missing"}, [task], generate, out=out)
    assert not out.metrics.exists()
    evaluate_models({"first": model_dir}, [task], generate, out=out)
    assert json.loads(out.metrics.read_text())["first"].keys() == {"gsm8k"}
    assert out.predictions.exists() and out.report.exists()


# ---- preference tasks (pipelines/eval/preference.py) ----------------------------------------

PAIRS = [
    {"prompt": "Who wrote Hamlet?", "chosen": "William Shakespeare.", "rejected": "Christopher Marlowe."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The capital of France?"}],
     "chosen": "Paris", "rejected": "Lyon, I think"},
    {"prompt": [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And three plus three?"}], "chosen": "Six.", "rejected": "Seven."},
    {"prompt": "Say yes.", "chosen": "yes", "rejected": "no"},
]


def _preference_task_file(directory, rows) -> str:
    (directory / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "prefs.yaml").write_text("name: prefs\nsource: {file: pairs.jsonl}\nmetric: preference_accuracy\n")
    return str(directory / "prefs.yaml")


def test_preference_accuracy_equals_a_direct_computation_with_the_model(tmp_path, trained_tokenizer):
    """Each side's summed log-probability of its answer (content and <|end|>, after the rendered
    prompt and the open assistant header), by one forward of the whole rendered conversation,
    against the scores the worker gives through the actor pool's own entry point (JSON batches)."""
    from model.chat import render_chat
    from pipelines.eval.run import evaluate_models
    from pipelines.generation.worker import GenerationWorker
    from pipelines.rundir import EvalDir

    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab, block_size=64)).eval()
    model_dir = save_model_dir(model, trained_tokenizer, tmp_path / "m")
    task = load_task(_preference_task_file(tmp_path, PAIRS))
    worker = GenerationWorker(str(model_dir), {}, False, batch_size=3, work="score_choices")

    def generate(model_dir, rows, *, work, params=None, chat=False):  # what the Ray Data pool does: JSON rows in batches of 3
        assert work == "score_choices"
        out = []
        for start in range(0, len(rows), 3):
            batch = {"_index": list(range(start, start + 3))[: len(rows) - start], "_row": [json.dumps(r) for r in rows[start:start + 3]]}
            out += [json.loads(r) for r in worker(batch)["_result"]]
        return out

    out = EvalDir(tmp_path / "e")
    out.root.mkdir()
    metrics = evaluate_models({"m": model_dir}, [task], generate, out=out)
    expected = []
    for row in PAIRS:
        messages = [{"role": "user", "content": row["prompt"]}] if isinstance(row["prompt"], str) else row["prompt"]
        context = len(render_chat(trained_tokenizer, messages, add_generation_prompt=True)[0])
        sums = []
        for side in ("chosen", "rejected"):
            ids = render_chat(trained_tokenizer, messages + [{"role": "assistant", "content": row[side]}])[0]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0][0, :, :trained_tokenizer.n_vocab].float(), -1)
            sums.append(sum(float(logp[i - 1, ids[i]]) for i in range(context, len(ids))))
        expected.append(sums)
    predictions = [json.loads(line) for line in out.predictions.read_text().splitlines()]
    for (chosen, rejected), p in zip(expected, predictions):
        assert p["chosen_logprob"] == pytest.approx(chosen, abs=1e-4) and p["rejected_logprob"] == pytest.approx(rejected, abs=1e-4)
    assert metrics["m"]["prefs"] == sum(c > r for c, r in expected) / len(PAIRS)
    assert json.loads(out.metrics.read_text()) == metrics
    assert "| prefs | " in out.report.read_text() and "(likelihood)" in out.report.read_text()


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "pairs.jsonl: row 2: no 'rejected' (fields: chosen, prompt)"),
    ({"chosen": "a", "rejected": "b"}, "pairs.jsonl: row 2: no 'prompt'"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": " Hello "}, "pairs.jsonl: row 2: chosen and rejected are identical"),
    ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "pairs.jsonl: row 2: prompt message 0 must be"),
])
def test_bad_preference_rows_are_one_line_naming_the_file_and_row(tmp_path, row, message):
    from model.errors import RelayError

    with pytest.raises(RelayError) as error:
        load_task(_preference_task_file(tmp_path, [PAIRS[0], row]))
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
