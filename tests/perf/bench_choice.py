"""Multiple-choice scoring throughput: choices scored per second by the generation worker
(batched, longest first, one forward per choice; pipelines/generation/rows.score_rows) against
a plain transformers loop scoring the same rows one choice at a time, same model weights (a
gpt2-124m shape exported to HF), same threads, one run. Target (issue 13): >= 1.5x."""

import time

import torch

from model.config import preset
from model.export import export_hf
from model.gpt import GPT
from model.tokenizer import Tokenizer

THREADS, QUESTIONS = 2, 24


def test_choice_scoring_throughput(tmp_path, record, shared_data):
    from transformers import GPT2LMHeadModel

    from pipelines.eval.task import choice_row, load_task
    from pipelines.generation.rows import choice_requests, score_rows

    torch.set_num_threads(THREADS)
    tok = Tokenizer.from_name("gpt2")
    torch.manual_seed(0)
    ours = GPT(preset("gpt2-124m", tok.n_vocab)).eval()
    export_hf(ours, tok, tmp_path / "hf")
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    task = load_task("hellaswag", data_file=str(shared_data / "eval" / "hellaswag_val.jsonl"), limit=QUESTIONS)
    rows = [choice_row(task, ex) for ex in task.examples]
    choices = sum(len(r["continuations"]) for r in rows)

    start = time.perf_counter()
    scored = score_rows(ours, tok, rows, batch_size=16)
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    plain = []
    with torch.inference_mode():
        for row in rows:
            for continuation in row["continuations"]:
                context, target = choice_requests(tok, row["context"], continuation)
                ids = torch.tensor([context + target])
                logprobs = torch.log_softmax(theirs(ids[:, :-1]).logits[0].float(), -1)
                plain.append(sum(float(logprobs[len(context) - 1 + k, t]) for k, t in enumerate(target)))
    t_plain = time.perf_counter() - start
    ours_flat = [ll for r in scored for ll in r["loglikelihoods"]]
    assert max(abs(a - b) for a, b in zip(ours_flat, plain)) < 1e-3  # the same scores
    record("choice_scoring", choices=choices, choices_per_s_ours=choices / t_ours, choices_per_s_transformers=choices / t_plain,
           speedup=t_plain / t_ours, threads=THREADS, model="gpt2-124m shape")
    print(f"multiple choice: {choices / t_ours:.1f} vs {choices / t_plain:.1f} choices/s = {t_plain / t_ours:.2f}x transformers one at a time")
