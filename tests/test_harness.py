"""lm-evaluation-harness as an eval task type (pipelines/eval/harness.py).

The adapter's three request types are checked against relaygpt's own scorer and generation
directly, without lm_eval installed; the harness end to end (a harness task defined locally
on the shared ARC-Easy rows gives the built-in task's accuracy) needs the `harness` extra."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from model.errors import RelayError
from pipelines.eval.harness import HarnessRequests, harness_available

CONTEXTS = [("Question: who is the king?\nAnswer:", " the king"), ("To be or not ", "to be"), ("", "Hello there"),
            ("ROMEO: I", " love her")]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, trained_tokenizer):
    """A tiny model directory (32-token context) and an in-process generation pool for it."""
    from helpers import tiny_config
    from model.export import load_model_dir, save_model_dir
    from model.gpt import GPT
    from pipelines.generation.worker import GenerationWorker

    torch.manual_seed(0)
    path = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, block_size=32)), trained_tokenizer,
                          tmp_path_factory.mktemp("harness") / "model")
    calls = []

    def generate(model_dir, rows, *, work, params=None, chat=False):  # the pool's interface (pipelines/eval/scorers.py)
        calls.append(len(rows))
        return GenerationWorker(str(model_dir), params or {}, chat, batch_size=4, device="cpu", work=work).run(rows)

    model, tokenizer, _ = load_model_dir(path)
    return path, generate, model, tokenizer, calls


def test_loglikelihood_is_relaygpts_choice_score_and_greedy_is_the_argmax(scored):
    from model.score import continuation_logprobs
    from pipelines.generation.rows import choice_requests

    path, generate, model, tokenizer, _ = scored
    answers = HarnessRequests(generate, path).loglikelihood(CONTEXTS)
    requests = [choice_requests(tokenizer, c, x) for c, x in CONTEXTS]
    assert [a for a, _ in answers] == pytest.approx(continuation_logprobs(model, requests), abs=1e-5)
    for (context, continuation), (_, greedy) in zip(requests, answers):
        ids = torch.tensor([context + continuation[:-1]])
        with torch.no_grad():
            picked = model(ids)[0][0, len(context) - 1:, : tokenizer.n_vocab].argmax(-1).tolist()
        assert greedy == (picked == continuation)
    # A continuation the model itself would write is greedy.
    context = tokenizer.encode("ROMEO: I")
    with torch.no_grad():
        best = int(model(torch.tensor([context]))[0][0, -1, : tokenizer.n_vocab].argmax())
    assert HarnessRequests(generate, path).loglikelihood([("ROMEO: I", tokenizer.decode([best]))])[0][1] is True


def test_loglikelihood_rolling_is_the_texts_log_likelihood_in_the_harness_windows(scored, shakespeare):
    """A text within the context: minus relaygpt's own nats. One of several windows: the
    harness's windows (disjoint predictions, the last filled out with earlier tokens), each
    computed by hand with a plain forward pass."""
    from pipelines.generation.rows import text_nats

    path, generate, model, tokenizer, _ = scored
    short, long = "To be, or not to be.", shakespeare[:400]
    got = HarnessRequests(generate, path).loglikelihood_rolling([short, long])
    assert got[0] == pytest.approx(-text_nats(model, tokenizer, short)[0], abs=1e-4)
    ids, window, total = [tokenizer.eot_id] + tokenizer.encode(long), model.config.block_size, 0.0
    assert len(ids) > 3 * window
    for start in range(1, len(ids), window):  # predicts ids[start:end] from the window before end
        end = min(start + window, len(ids))
        inputs, predicted = ids[max(0, end - window - 1): end - 1], end - start
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([inputs]))[0][0, :, : tokenizer.n_vocab].float(), -1)
        targets = ids[end - predicted: end]
        total += sum(float(logprobs[len(inputs) - predicted + k, t]) for k, t in enumerate(targets))
    assert got[1] == pytest.approx(total, abs=1e-3) and math.isfinite(total)


def test_generate_until_is_relaygpts_greedy_completion_cut_at_until(scored):
    from model.generate import SamplingParams, generate as relay_generate

    path, generate, model, tokenizer, calls = scored
    prompts = ["ROMEO: I", "JULIET:"]
    mine = [tokenizer.decode(c.tokens) for c in relay_generate(model, [tokenizer.encode(p) for p in prompts],
                                                                 SamplingParams(max_new_tokens=12, stop_token_ids=(tokenizer.eot_id,)))]
    cut = mine[0][len(mine[0]) // 2:][:2] or "\n"  # a string the first completion contains
    calls.clear()
    got = HarnessRequests(generate, path).generate_until([(prompts[0], {"until": [cut], "max_gen_toks": 12}),
                                                          (prompts[1], {"until": "\n\n\n", "max_gen_toks": 12, "do_sample": False})])
    assert got[0] == mine[0].split(cut)[0] and got[1] == mine[1].split("\n\n\n")[0]
    assert calls == [2]  # requests with the same settings go to the pool together
    with pytest.raises(RelayError, match="repetition_penalty are not supported"):
        HarnessRequests(generate, path).generate_until([("x", {"repetition_penalty": 1.1})])


def test_a_harness_task_without_lm_eval_is_refused_in_one_line(scored, capsys, tmp_path, monkeypatch):
    import cluster.cli as cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as where it is not installed: the import fails, find_spec says None
    assert not harness_available()

    code = cli.main(["eval", str(scored[0]), "--task", "harness:arc_easy"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "task 'harness:arc_easy': harness tasks need lm-evaluation-harness (lm_eval), which is not installed; " \
           "pip install 'relaygpt[harness]'" in err, err
    # In a job's eval stage: named by preflight with its place in the list.
    import yaml

    from cluster.preflight import _eval_inputs
    from jobs.spec import load_job
    from pipelines.rundir import RunDir

    job = yaml.safe_load((Path(cli.__file__).parents[1] / "jobs" / "tiny-assistant.yaml").read_text())
    job["stages"]["eval"]["tasks"] = ["synthetic", "harness:hellaswag"]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    problems = _eval_inputs(load_job(tmp_path / "job.yaml"), RunDir(tmp_path / "run"))
    assert problems == ["stages.eval.tasks[1]: task 'harness:hellaswag': harness tasks need lm-evaluation-harness (lm_eval), "
                        "which is not installed; pip install 'relaygpt[harness]'"]


ARC_TASK = """task: local_arc_easy
dataset_path: json
dataset_kwargs:
  data_files: {test: DATA}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices.text}}"
doc_to_target: "{{choices.label.index(answerKey)}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""


@pytest.mark.skipif(not harness_available(), reason="needs the harness extra (pip install 'relaygpt[harness]')")
def test_a_local_harness_task_gives_the_built_in_tasks_accuracy(scored, shared_data, tmp_path):
    """The harness's own ARC-Easy prompt on the shared rows, run through relaygpt's pool, scores
    what the built-in arc_easy task scores on them."""
    from pipelines.eval.run import evaluate_models
    from pipelines.eval.task import load_task

    path, generate, *_ = scored
    data = shared_data / "eval" / "arc_easy_test.jsonl"
    (tmp_path / "arc.yaml").write_text(ARC_TASK.replace("DATA", json.dumps(str(data))))
    tasks = [load_task("arc_easy", data_file=str(data), limit=16), load_task(f"harness:{tmp_path / 'arc.yaml'}", limit=16)]
    metrics = evaluate_models({"m": path}, tasks, generate)["m"]
    harness = f"harness:{tmp_path / 'arc.yaml'}"
    assert metrics[f"{harness}/acc"] == pytest.approx(metrics["arc_easy"])
    assert metrics[f"{harness}/acc_norm"] == pytest.approx(metrics["arc_easy_norm"])
