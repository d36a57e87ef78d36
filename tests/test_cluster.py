"""The job runner on real Ray processes (loopback only): end to end, fault tolerance, placement.

Every run here is a `relaygpt run` process, as a user starts it: the main job on an embedded
Ray (what `make demo` does), the others joining the session's Ray head with --address.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import relaygpt, relaygpt_on_a_terminal

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "tiny-assistant.yaml"
SHORT = [
    "data.synthetic.mentions_per_fact=6", "data.num_proc=1",
    "stages.pretrain.steps=20", "stages.pretrain.log_every=5", "stages.pretrain.eval_every=10", "stages.pretrain.checkpoint_every=10",
    "stages.pretrain.optimizer.warmup_steps=5", "stages.sft.optimizer.warmup_steps=2",
    "stages.sft.steps=6", "stages.sft.log_every=2", "stages.sft.eval_every=3", "stages.sft.checkpoint_every=3",
    "stages.eval.limit=6", "stages.eval.workers=2", "stages.eval.batch_size=4",
]


def _set(*overrides):
    return [arg for item in overrides for arg in ("--set", item)]


# What relaygpt itself prints: its stage lines, the summary (indented) and its own error lines.
OWN_LINE = re.compile(r"^(relaygpt[: ]|\[(run|data|pretrain|sft|eval)\] |done: |  \S|$)")


def assert_only_relaygpt_lines(text: str) -> None:
    """No line from Ray, DeepSpeed or a worker reaches the terminal: they are in RUN/logs/run.log."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # a terminal's colour reset (colorama's, at exit) is not a line
    foreign = [line for line in text.replace("\r", "\n").splitlines() if not OWN_LINE.match(line)]
    assert not foreign, foreign[:10]


def test_the_main_job_end_to_end(ray_head, tmp_path):
    """jobs/tiny-assistant.yaml exactly as `make demo` runs it (embedded Ray): every artifact, and it learned."""
    out = tmp_path / "out"
    run = out / "tiny-assistant" / "default"
    proc = relaygpt("run", JOB, "--out", out, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert_only_relaygpt_lines(proc.stdout + proc.stderr)
    log = (run / "logs" / "run.log").read_text()  # where the third-party lines went
    # (DeepSpeed itself says nothing at its log level since CPU workers no longer build its shm comm op.)
    assert "RayTrainWorker" in log and "Started training worker group" in log, log[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    expected = [
        "job.yaml", "summary.json", "tokenizer/tokenizer.json", "tokenizer/ranks.tiktoken",
        "data/pretrain/manifest.json", "data/sft/manifest.json", "data/stage.json",
        "pretrain/stage.json", "pretrain/metrics.jsonl", "pretrain/model/config.json", "pretrain/model/model.safetensors",
        "pretrain/checkpoints/step_00001000/checkpoint.json", "pretrain/workers/rank_0.json", "pretrain/workers/rank_1.json",
        "sft/stage.json", "sft/model/model.safetensors", "sft/checkpoints/step_00000150/checkpoint.json",
        "eval/predictions.jsonl", "eval/metrics.json", "eval/report.md", "eval/stage.json",
    ]
    missing = [p for p in expected if not (run / p).exists()]
    assert not missing, missing
    assert list((run / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
    assert set(summary["eval"]) == {"base", "assistant"} and "synthetic" in summary["eval"]["assistant"]
    # The lesson: held-out facts seen only in pretraining are answered in the chat format.
    assert summary["eval"]["assistant"]["synthetic"] >= 0.8, summary["eval"]
    assert summary["eval"]["base"]["synthetic"] <= 0.2, summary["eval"]
    report = (run / "eval" / "report.md").read_text()
    assert "| synthetic |" in report and "**assistant** ✓" in report
    for stage in ("data", "pretrain", "sft", "eval"):
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "completed"
    # Cost: every stage's reserved core-hours (2 training workers x 1 CPU for the stage's wall time).
    cost = summary["cost"]
    assert cost["unit"] == "core-hours" and set(cost["stages"]) == {"data", "pretrain", "sft", "eval"} and cost["cost"] is None
    pretrain = cost["stages"]["pretrain"]
    assert pretrain["workers"] == 2 and pretrain["core_hours"] == pytest.approx(pretrain["seconds"] * 2 / 3600, rel=1e-3)
    assert cost["core_hours"] == pytest.approx(sum(s["core_hours"] for s in cost["stages"].values()), abs=1e-5)
    assert "core-hours" in proc.stdout.split("done: tiny-assistant")[-1]
    from model.export import load_model_dir

    model, tok, meta = load_model_dir(run / "sft" / "model")
    assert meta["provenance"]["stage"] == "sft" and meta["provenance"]["layout"]["data_parallel"] == 2
    assert any("[pretrain] step 1000/1000" in line for line in lines)  # the progress display followed the workers
    assert f"{run / 'sft' / 'model'}" in proc.stdout.split("done: tiny-assistant")[-1]  # the summary says where things are

    # The same run directory, driven on another cluster (the session's head), on a terminal, from
    # the SFT stage with a changed SFT setting: data and pretraining are up to date there too, SFT
    # and eval re-run (eval: the tuned model only), and generation progress is redrawn in place.
    # (Which stages a changed input re-runs without --from-stage: tests/test_inputs.py.)
    code, screen = relaygpt_on_a_terminal("run", JOB, "--out", out, "--address", ray_head.address,
                                          *_set("stages.sft.steps=8", "stages.sft.optimizer.warmup_steps=2",
                                                "stages.eval.models=[assistant]", "stages.eval.limit=12"),
                                          "--from-stage", "sft", env=ray_head.env)
    assert code == 0, screen[-3000:]
    last = screen.replace("\r\n", "\n").split("\n")
    assert [line.split("]")[0] for line in last if "up to date" in line] == ["[data", "[pretrain"]
    assert json.loads((run / "sft" / "stage.json").read_text())["result"]["step"] == 8
    assert any(line.startswith("[eval] assistant: synthetic") for line in last)
    assert re.search(r"\r\[eval\] assistant \[[#.]+\] \d+/\d+ rows  eta \d+s", screen), screen[-3000:]
    assert_only_relaygpt_lines(screen)


def test_a_failing_worker_is_one_line_naming_the_error_and_the_log(ray_head, tmp_path):
    """A stage that stops on something that is not a user error (here: a damaged token shard
    whose ids are beyond the vocabulary): one line with the rank's error and the log's path,
    exit 1, no traceback on the terminal; the log holds the workers' tracebacks."""
    out = tmp_path / "out"
    run = out / "tiny-assistant" / "default"
    settings = _set(*SHORT, "stages.sft=null", "stages.eval=null", "cluster.max_failures=0", f"cluster.address={ray_head.address}")
    prepared = relaygpt("data", "prepare", JOB, "--out", out, *settings, env=ray_head.env)
    assert prepared.returncode == 0, prepared.stdout[-3000:] + prepared.stderr[-3000:]
    for shard in (run / "data" / "pretrain").glob("train_*.bin"):
        shard.write_bytes(b"\xff" * shard.stat().st_size)
    proc = relaygpt("run", JOB, "--out", out, *settings, env=ray_head.env)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = run / "logs" / "run.log"
    line = proc.stderr.strip()
    assert "\n" not in line and line.startswith("relaygpt: pretrain failed: rank ") and line.endswith(f"(full log: {log})"), line
    assert "IndexError: index out of range in self" in line, line
    assert_only_relaygpt_lines(proc.stdout + proc.stderr)
    text = log.read_text()
    assert "Traceback" in text and "IndexError" in text and "[pretrain] failed:" in text
    assert json.loads((run / "pretrain" / "stage.json").read_text())["status"] == "failed"


def test_a_killed_worker_is_replaced_and_the_stage_resumes(ray_head, tmp_path):
    out = tmp_path / "out"
    run = out / "tiny-assistant" / "default"
    settings = SHORT + ["cluster.max_failures=1", "cluster.price_per_core_hour=0.05", "stages.pretrain.steps=48", "stages.pretrain.log_every=1",
                        "stages.pretrain.checkpoint_every=12", "stages.pretrain.eval_every=1000", "stages.pretrain.micro_batch=16",
                        "stages.sft=null", "stages.eval=null"]
    metrics = run / "pretrain" / "metrics.jsonl"
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.exists():
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
                if steps and steps[-1] >= 18:
                    info = json.loads((run / "pretrain" / "workers" / "rank_1.json").read_text())
                    os.kill(info["pid"], signal.SIGKILL)
                    first = [json.loads(line) for line in metrics.read_text().splitlines()]
                    killed.update(step=steps[-1], pid=info["pid"], losses={r["step"]: r["train/loss"] for r in first})
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer)
    thread.start()
    proc = relaygpt("run", JOB, "--out", out, "--address", ray_head.address, *_set(*settings), env=ray_head.env, timeout=900)
    thread.join()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert killed, "the worker was never killed"
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == list(range(1, 49)), "one history: each step once, the superseded attempt's later steps dropped"
    resumed = re.search(r"resumed from \S+ at step (\d+)", proc.stdout + proc.stderr)
    assert resumed, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed_at = int(resumed.group(1))
    assert resumed_at % 12 == 0, "resumed from a checkpoint boundary"
    assert killed["step"] - resumed_at <= 12 + 5, "lost at most one checkpoint interval (plus steps in flight)"
    assert summary["stages"]["pretrain"]["step"] == 48 and steps[-1] == 48
    retrained = [r for r in records if resumed_at < r["step"] <= killed["step"] and r["step"] in killed["losses"]]
    assert retrained, "no step was trained twice"
    for r in retrained:  # steps trained twice give the same loss: the resume is exact
        assert abs(r["train/loss"] - killed["losses"][r["step"]]) < 1e-5, r["step"]
    new_pid = json.loads((run / "pretrain" / "workers" / "rank_1.json").read_text())["pid"]
    assert new_pid != killed["pid"]
    result = json.loads((run / "pretrain" / "result.json").read_text())
    assert result["step"] == 48 and len(result["perf/peak_memory_gb_per_rank"]) == 2 and min(result["perf/peak_memory_gb_per_rank"]) > 0
    assert summary["cost"]["cost"] == pytest.approx(summary["cost"]["core_hours"] * 0.05, rel=1e-3)


def test_strict_spread_places_workers_on_different_nodes(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text((REPO / "jobs" / "tiny-assistant.yaml").read_text().replace("output_dir: ../runs", "output_dir: runs"))
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "two_nodes.py"), str(job), str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(result_lines[0][len("RESULT "):])
    nodes = {w["node_id"] for w in result["workers"]}
    assert len(result["workers"]) == 2 and len(nodes) == 2 and nodes <= set(result["nodes"])
    assert result["step"] == 6
