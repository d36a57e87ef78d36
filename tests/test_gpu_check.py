"""The GPU check (`make bench-gpu`) runs only where a GPU is; its --smoke mode runs the same code
on the CPU with a tiny model, so the script cannot rot between GPU machines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "perf" / "gpu_check.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = json.loads(out.read_text())
    training = numbers["training"]
    assert [r["precision"] for r in training] == ["bf16", "bf16 autocast", "bf16", "bf16 autocast", "bf16", "fp32"]
    assert all(r["tokens_per_s"] > 0 for r in training)
    ours = [r for r in training if "plain" not in r["case"]]
    assert all(r["planned_gib"] > 0 and r["notes"] for r in ours)
    assert all(r["vs_plain"] > 0 for r in ours[:2])  # each model against its plain PyTorch loop, same run
    assert all(r["loss_last"] < r["loss_first"] for r in training)  # the bigram chain is learnable
    assert numbers["profile"]["wall_ms_per_step"] > 0 and numbers["profile"]["top_kernels"]
    assert numbers["bf16_vs_fp32"]["max_relative"] < 0.03
    generation = numbers["generation"]
    assert [g["tokens"] for g in generation] == [8, 32]
    # On the CPU the graph's static step runs eagerly; fp32, same weights: every path picks the same tokens.
    assert all(g["decoder"] == "static" and g["tokens_per_s"] > 0 and g["eager_tokens_per_s"] > 0 for g in generation)
    assert all(g["transformers_tokens_per_s"] > 0 and g["ratio_vs_transformers"] > 0 for g in generation)
    assert [g["target_ratio"] for g in generation] == [10.0, 3.0]
    assert all(g["tokens_agreeing_transformers"] == g["tokens_agreeing_eager"] == g["tokens"] for g in generation)
    assert "| case | params | precision |" in proc.stdout and numbers["table"] in proc.stdout


def test_without_a_gpu_the_check_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "perf" / "gpu_check.py")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr and "Traceback" not in proc.stderr
