"""Shards read in place: a split's shards are one indexed sequence, read window by window and
never concatenated or mapped, so a training rank's memory does not grow with the corpus."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines.data.shards import ShardWriter, ShardedTokens, load_split, write_manifest

REPO = Path(__file__).resolve().parents[1]


def test_sharded_tokens_index_and_slice_like_their_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (5, 1, 17, 3, 40)]
    whole = np.concatenate(arrays)
    for i, array in enumerate(arrays):
        array.tofile(tmp_path / f"s{i}.bin")
    tokens = ShardedTokens([tmp_path / f"s{i}.bin" for i in range(len(arrays))], [len(a) for a in arrays], np.uint16)
    tokens.MAX_OPEN = 2  # files are closed and reopened as the reads move around
    assert len(tokens) == len(whole) and tokens.shape == whole.shape
    for i in (0, 4, 5, 6, 22, 65, -1, -66):
        assert tokens[i] == whole[i]
    for start, stop in [(0, 66), (3, 9), (4, 6), (5, 6), (20, 26), (0, 0), (60, 100), (-10, -2)]:
        assert np.array_equal(tokens[start:stop], whole[start:stop]), (start, stop)
    assert np.array_equal(np.asarray(tokens), whole)
    with pytest.raises(IndexError):
        tokens[66]
    assert len(tokens._open) <= 2


def _corpus(directory: Path, tokens: int, shard_tokens: int) -> Path:
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, "train", np.uint16, shard_tokens)
    rng = np.random.default_rng(1)
    for _ in range(tokens // 2**20):
        writer.write(rng.integers(0, 50000, size=2**20).astype(np.uint16))
    shards = writer.close()
    write_manifest(directory, {"kind": "pretrain", "dtype": "uint16", "eot_id": 50256,
                               "splits": {"train": {"documents": 1, "tokens": tokens, "shards": shards},
                                          "val": {"documents": 0, "tokens": 0, "shards": []}}})
    return directory


LOADER = """
import json, sys
sys.path.insert(0, {repo!r})
from pipelines.data.loader import BatchLoader, open_split

def status(field):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
windows = open_split({directory!r}, "train", seq_len=1024)
loader = BatchLoader(windows, 8, seed=0)
for _ in range(50):
    next(loader)
print(json.dumps({{"growth": status("VmHWM") - before, "windows": windows.num_windows}}))
"""


def _loader_growth(directory: Path) -> dict:
    code = LOADER.format(repo=str(REPO), directory=str(directory))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_training_ranks_loader_does_not_grow_with_the_corpus(tmp_path):
    """8M and 64M tokens (16 and 128 MiB in 4 and 32 shards): opening the split (the quick
    check) and drawing 50 batches of 8 x 1024 adds the same few MiB to the process."""
    small = _loader_growth(_corpus(tmp_path / "small", 8 * 2**20, 2 * 2**20))
    large = _loader_growth(_corpus(tmp_path / "large", 64 * 2**20, 2 * 2**20))
    assert large["windows"] > 7 * small["windows"]
    assert large["growth"] <= small["growth"] + 8 * 2**20, (small, large)
    assert large["growth"] < 32 * 2**20, large  # the corpus is 128 MiB
    assert np.asarray(load_split(tmp_path / "large", json.loads((tmp_path / "large" / "manifest.json").read_text()), "train")[:5]).dtype == np.uint16


def test_a_step_log_keeps_one_history_and_a_follower_sees_only_new_lines(tmp_path):
    from pipelines.rundir import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 7):
        log.append({"step": step, "train/loss": 1.0 / step})
    follower = MetricsLog(log.path).follow_from_end()
    log.keep_through(3)  # resumed from the checkpoint at step 3
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    assert follower.new_records() == []  # the rewrite is not news
    log.append({"step": 4, "train/loss": 0.2})
    assert [r["step"] for r in follower.new_records()] == [4]
    log.keep_through(0)
    assert log.records() == []
