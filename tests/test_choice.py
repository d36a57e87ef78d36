"""Multiple choice by log-likelihood (HellaSwag, ARC, PIQA, MMLU): prompts as the harness
writes them, per-choice scores equal to transformers', acc / acc_norm, the worker pool."""

import json

import pytest
import torch

from helpers import hub_gpt2_dir, relaygpt
from model.export import import_hf
from pipelines.eval.task import choice_row, choice_scores, load_task
from pipelines.generation.rows import choice_requests, score_rows

TASKS = {"hellaswag": "hellaswag_val.jsonl", "arc_easy": "arc_easy_test.jsonl", "arc_challenge": "arc_challenge_test.jsonl",
         "piqa": "piqa_val.jsonl", "mmlu": "mmlu_test.jsonl"}


@pytest.fixture(scope="module")
def hub_gpt2(tmp_path_factory, shared_data):
    """A hub-layout GPT-2 directory (random weights, the real GPT-2 tokenizer files)."""
    return hub_gpt2_dir(tmp_path_factory.mktemp("hub") / "gpt2", shared_data, seed=5, n_positions=256)


def test_the_shipped_tasks_build_the_harness_prompts(shared_data):
    arc = load_task("arc_easy", data_file=str(shared_data / "eval" / TASKS["arc_easy"]))
    first = json.loads((shared_data / "eval" / TASKS["arc_easy"]).read_text().splitlines()[0])
    ex = arc.examples[0]
    assert ex["context"] == f"Question: {first['question']}\nAnswer:"
    assert ex["continuations"] == [" " + t for t in first["choices"]["text"]]
    assert ex["continuations"][ex["label"]] == " " + first["choices"]["text"][first["choices"]["label"].index(first["answerKey"])]
    mmlu = load_task("mmlu", data_file=str(shared_data / "eval" / TASKS["mmlu"]))
    m = mmlu.examples[0]
    assert m["context"].startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert m["context"].endswith("\nD. " + json.loads((shared_data / "eval" / TASKS["mmlu"]).read_text().splitlines()[0])["choices"][3] + "\nAnswer:")
    assert m["continuations"] == [" A", " B", " C", " D"]
    hs = load_task("hellaswag", data_file=str(shared_data / "eval" / TASKS["hellaswag"]))
    assert all("[" not in e["context"] and len(e["continuations"]) == 4 for e in hs.examples)
    piqa = load_task("piqa", data_file=str(shared_data / "eval" / TASKS["piqa"]))
    assert all(len(e["continuations"]) == 2 and e["context"].startswith("Question: ") for e in piqa.examples)
    assert len(load_task("arc_challenge", data_file=str(shared_data / "eval" / TASKS["arc_challenge"])).examples) == 200


def test_per_choice_loglikelihoods_equal_transformers(hub_gpt2, shared_data):
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast

    theirs = GPT2LMHeadModel.from_pretrained(hub_gpt2).eval()
    hf_tok = GPT2TokenizerFast.from_pretrained(hub_gpt2)
    ours, tokenizer, _ = import_hf(hub_gpt2)
    rows = []
    for name, file in TASKS.items():
        task = load_task(name, data_file=str(shared_data / "eval" / file), limit=3)
        rows += [choice_row(task, ex) for ex in task.examples]
    scored = score_rows(ours, tokenizer, rows, batch_size=5)
    checked = 0
    for row, result in zip(rows, scored):
        for continuation, ll, count in zip(row["continuations"], result["loglikelihoods"], result["num_tokens"]):
            text = row["context"]
            if text.endswith(" "):  # the harness moves a context's trailing space to the continuation
                text, continuation = text[:-1], " " + continuation
            whole = hf_tok(text + continuation)["input_ids"]
            context = hf_tok(text)["input_ids"]
            target = whole[len(context):]
            assert len(target) == count and (context, target) == tuple(choice_requests(tokenizer, text, continuation))
            with torch.no_grad():
                logprobs = torch.log_softmax(theirs(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
            expected = sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(target))
            assert abs(ll - expected) < 1e-4, (row["context"][:60], continuation, ll, expected)
            checked += 1
    assert checked >= 3 * (4 + 3 + 3 + 2 + 4)  # every choice of 3 questions of each task


def test_acc_and_acc_norm_follow_from_the_scores():
    example = {"continuations": [" a", " much longer answer", " mid one"], "label": 1}
    picked = choice_scores(example, [-3.0, -9.5, -6.0])
    assert picked["prediction"] == 0 and picked["acc"] == 0.0  # the highest log-likelihood
    assert picked["prediction_norm"] == 1 and picked["acc_norm"] == 1.0  # -9.5/18 beats -3/1 and -6/7 (the joining space not counted)


@pytest.mark.slow
def test_the_pool_gives_the_same_scores_with_one_and_two_workers(ray_head, hub_gpt2, shared_data, tmp_path):
    data = str(shared_data / "eval" / TASKS["arc_easy"])
    common = ["eval", hub_gpt2, "--task", "arc_easy", "--data", data, "--limit", 12, "--batch-size", 4]
    one = relaygpt(*common, "--out", tmp_path / "one")
    two = relaygpt(*common, "--out", tmp_path / "two", "--workers", 2, "--address", ray_head.address, env=ray_head.env)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    assert "arc_easy acc " in one.stdout and "acc_norm" in one.stdout
    assert two.stderr == "" and all(line.startswith(("[eval] ", "wrote ")) for line in two.stdout.splitlines()), two.stdout
    assert (tmp_path / "two" / "logs" / "run.log").exists()  # where Ray's lines went
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert metrics[0] == metrics[1] and set(metrics[0]["model"]) == {"arc_easy", "arc_easy_norm"}
    predictions = [[json.loads(line) for line in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(predictions[0]) == 12
    for a, b in zip(*predictions):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)  # batches differ: fp32 rounding
        assert {"context", "continuations", "loglikelihoods", "num_tokens", "label"} <= a.keys()
    acc = sum(p["correct"] for p in predictions[0]) / 12
    assert metrics[0]["model"]["arc_easy"] == pytest.approx(acc)
