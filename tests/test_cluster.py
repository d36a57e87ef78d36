"""The job runner on real Ray processes (loopback only): end to end, fault tolerance, placement."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.driver import run_job
from jobs.spec import load_job

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SHORT = [
    "data.synthetic.mentions_per_fact=6", "data.num_proc=1",
    "stages.pretrain.steps=20", "stages.pretrain.log_every=5", "stages.pretrain.eval_every=10", "stages.pretrain.checkpoint_every=10",
    "stages.sft.steps=6", "stages.sft.log_every=2", "stages.sft.eval_every=3", "stages.sft.checkpoint_every=3",
    "stages.eval.limit=6", "stages.eval.workers=2", "stages.eval.batch_size=4",
]


def short_job(*extra):
    return load_job(REPO / "jobs" / "tiny-assistant.yaml", SHORT + list(extra))


def test_the_main_job_end_to_end(ray_cluster, tmp_path):
    """jobs/tiny-assistant.yaml exactly as `make demo` runs it: every artifact, and it learned."""
    run = tmp_path / "run"
    lines = []
    job = load_job(REPO / "jobs" / "tiny-assistant.yaml")
    summary = run_job(job, run, show=lines.append)
    expected = [
        "job.yaml", "summary.json", "tokenizer/tokenizer.json", "tokenizer/ranks.tiktoken",
        "data/pretrain/manifest.json", "data/sft/manifest.json", "data/stage.json",
        "pretrain/stage.json", "pretrain/metrics.jsonl", "pretrain/model/config.json", "pretrain/model/model.safetensors",
        "pretrain/checkpoints/step_00002000/checkpoint.json", "pretrain/workers/rank_0.json", "pretrain/workers/rank_1.json",
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
    assert json.loads((run / "summary.json").read_text())["eval"] == summary["eval"]
    for stage in ("data", "pretrain", "sft", "eval"):
        assert json.loads((run / stage / "stage.json").read_text())["status"] == "completed"
    from model.export import load_model_dir

    model, tok, meta = load_model_dir(run / "sft" / "model")
    assert meta["provenance"]["stage"] == "sft" and meta["provenance"]["layout"]["data_parallel"] == 2
    assert any("[pretrain] step 2000/2000" in line for line in lines)  # the progress display followed the workers
    # Running again does nothing: every stage is up to date.
    again = []
    run_job(job, run, show=again.append)
    assert sum("up to date" in line for line in again) == 4
    # A changed SFT setting re-runs SFT and eval only; --from-stage eval re-runs eval only.
    changed_job = load_job(REPO / "jobs" / "tiny-assistant.yaml", ["stages.sft.steps=20"])
    changed = []
    run_job(changed_job, run, show=changed.append)
    assert [line.split("]")[0] for line in changed if "up to date" in line] == ["[data", "[pretrain"]
    assert json.loads((run / "sft" / "stage.json").read_text())["result"]["step"] == 20
    last = []
    run_job(changed_job, run, from_stage="eval", show=last.append)
    assert sum("up to date" in line for line in last) == 3 and any(line.startswith("[eval] assistant") for line in last)


def test_a_killed_worker_is_replaced_and_the_stage_resumes(ray_cluster, tmp_path):
    run = tmp_path / "run"
    job = short_job("cluster.max_failures=1", "stages.pretrain.steps=160", "stages.pretrain.log_every=1",
                    "stages.pretrain.checkpoint_every=20", "stages.pretrain.eval_every=1000", "stages.pretrain.micro_batch=16",
                    "stages.sft=null", "stages.eval=null")
    metrics = run / "pretrain" / "metrics.jsonl"
    killed = {}

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline:
            if metrics.exists():
                steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
                if steps and steps[-1] >= 50:
                    info = json.loads((run / "pretrain" / "workers" / "rank_1.json").read_text())
                    os.kill(info["pid"], signal.SIGKILL)
                    killed.update(step=steps[-1], pid=info["pid"])
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer)
    thread.start()
    summary = run_job(job, run, show=lambda line: None)
    thread.join()
    assert killed, "the worker was never killed"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    resumed_at = steps[restart]
    assert resumed_at - 1 == 20 * ((resumed_at - 1) // 20), "resumed from a checkpoint boundary"
    assert killed["step"] - (resumed_at - 1) <= 20 + 5, "lost at most one checkpoint interval (plus steps in flight)"
    assert summary["stages"]["pretrain"]["step"] == 160 and steps[-1] == 160
    first = {r["step"]: r["train/loss"] for r in records[:restart]}
    for r in records[restart:]:
        if r["step"] in first:  # steps trained twice give the same loss: the resume is exact
            assert abs(r["train/loss"] - first[r["step"]]) < 1e-5, r["step"]
    new_pid = json.loads((run / "pretrain" / "workers" / "rank_1.json").read_text())["pid"]
    assert new_pid != killed["pid"]


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
