"""The training engine: parallel layouts agree, resume is exact, checkpoints are safe, SFT masks.

Real DeepSpeed engines under gloo on 1 or 2 local processes, a tiny model, a few steps each.
"""

import numpy as np
import pytest
import torch

from train_helpers import assert_losses_close, prepared_run, train, weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(engine_job):
    """The job file and one prepared run directory to copy the data from (shared with test_layouts)."""
    return engine_job


def fresh(base, name):
    job_path, template, root = base
    return prepared_run(job_path, template, root / name)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_pipeline_2_matches_pipeline_1(base, zero_stage):
    """Tied embeddings across the first and last stage; gradient clipping active (norm > 1)."""
    job_path = base[0]
    common = ["stages.pretrain.grad_accum=2", f"stages.pretrain.deepspeed.zero_stage={zero_stage}"]
    pp1 = train(1, job_path, fresh(base, f"pp1-z{zero_stage}"), common)
    pp2 = train(2, job_path, fresh(base, f"pp2-z{zero_stage}"), common + ["stages.pretrain.deepspeed.pipeline_stages=2", "cluster.num_workers=2"])
    assert_losses_close(pp1["losses"], pp2["losses"], 1e-4)


@pytest.fixture(scope="module")
def zero_0_on_2(base):
    """The reference every ZeRO stage is compared with: ZeRO-0, data parallel 2 (trained once)."""
    return train(2, base[0], fresh(base, "z0"), ["cluster.num_workers=2"])


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_zero_stages_match_zero_0(base, zero_0_on_2, zero_stage):
    other = train(2, base[0], fresh(base, f"z{zero_stage}"), ["cluster.num_workers=2", f"stages.pretrain.deepspeed.zero_stage={zero_stage}"])
    assert_losses_close(zero_0_on_2["losses"], other["losses"], 1e-4)


def test_data_parallel_2_equals_accumulation_2(base):
    job_path = base[0]
    dp2 = train(2, job_path, fresh(base, "dp2"), ["cluster.num_workers=2"])
    acc2 = train(1, job_path, fresh(base, "acc2"), ["stages.pretrain.grad_accum=2"])
    assert_losses_close(dp2["losses"], acc2["losses"], 1e-5)


@pytest.mark.parametrize("layout", ["pp1", "pp2"])
def test_resume_continues_exactly(base, layout):
    job_path = base[0]
    extra = ["cluster.num_workers=2", "stages.pretrain.deepspeed.pipeline_stages=2"] if layout == "pp2" else []
    world = 2 if layout == "pp2" else 1
    straight = train(world, job_path, fresh(base, f"straight-{layout}"), extra)
    run = fresh(base, f"resumed-{layout}")
    first = train(world, job_path, run, extra, until_step=3)  # interrupted at step 3 (checkpointed)
    second = train(world, job_path, run, extra)  # finds step 3 and continues to 6
    combined = {**first["losses"], **second["losses"]}
    assert sorted(second["losses"]) == [4, 5, 6]
    for step, loss in straight["losses"].items():
        assert abs(combined[step] - loss) < 1e-6, f"step {step}: {combined[step]} vs {loss}"
    a, b = weights(base[2] / f"straight-{layout}"), weights(run)
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_zero_optimizer_state_resumes_through_the_weights_only_loader(base, capfd, zero_stage):
    """ZeRO optimizer files hold DeepSpeed objects besides tensors (the loss scaler, the stage
    enum, ZeRO-1/2's slice map): exactly the classes the weights-only loader allows, so a resume
    loads them as data. A DeepSpeed that saved another class would fail here, naming it."""
    from pipelines.train.checkpoint import deepspeed_types

    job_path, layout = base[0], [f"stages.pretrain.deepspeed.zero_stage={zero_stage}"]
    run = fresh(base, f"zero{zero_stage}-resumed")
    train(1, job_path, run, layout, until_step=3)
    files = list((run / "pretrain" / "checkpoints").rglob("*.pt"))
    named = {name for f in files for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(f))}
    assert named and named <= {f"{kind.__module__}.{kind.__qualname__}" for kind in deepspeed_types()}, named
    capfd.readouterr()
    second = train(1, job_path, run, layout)
    assert "resumed from" in capfd.readouterr().out and sorted(second["losses"]) == [4, 5, 6]


def _alter_one_byte(path):
    """Same size, one byte different: what corruption or a planted payload looks like to a size check."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_damaged_checkpoint_is_skipped_and_the_previous_used(base, capfd, damage):
    job_path = base[0]
    run = fresh(base, damage)
    train(1, job_path, run, ["stages.pretrain.steps=6"])
    newest = run / "pretrain" / "checkpoints" / "step_00000006"
    victim = max((p for p in newest.iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    if damage == "truncated":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
        expected = f"{victim.name} is {victim.stat().st_size} bytes"
    else:
        _alter_one_byte(victim)
        expected = f"{victim.name} does not match the sha256 recorded in checkpoint.json"
    capfd.readouterr()
    again = train(1, job_path, run, ["stages.pretrain.steps=8"])  # a longer run of the same job
    out = capfd.readouterr().out
    assert f"warning: skipping checkpoint {newest}: {expected}" in out, out[-3000:]
    assert "resumed from" in out and "step_00000003" in out
    assert sorted(again["losses"]) == [4, 5, 6, 7, 8]
    # One history: the superseded attempt's steps 4-6 are gone from the step log, not doubled.
    from pipelines.rundir import MetricsLog

    steps = [r["step"] for r in MetricsLog(run / "pretrain" / "metrics.jsonl").records() if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8


def test_every_ranks_files_are_verified_before_any_rank_loads(base, capfd):
    """ZeRO-1 on 2 ranks: each rank writes its own optimizer shard. The record covers both, and
    one altered byte in rank 1's shard (in every checkpoint) makes both ranks skip every
    checkpoint and start fresh together: nothing unverified reaches DeepSpeed's load."""
    import json

    job_path = base[0]
    run = fresh(base, "altered-rank-1")
    layout = ["cluster.num_workers=2", "stages.pretrain.deepspeed.zero_stage=1"]
    train(2, job_path, run, layout + ["stages.pretrain.steps=6"])
    checkpoints = sorted((run / "pretrain" / "checkpoints").glob("step_*"))
    assert [p.name for p in checkpoints] == ["step_00000003", "step_00000006"]
    for path in checkpoints:
        recorded = json.loads((path / "checkpoint.json").read_text())["files"]
        assert set(recorded) == {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {"checkpoint.json"}
        shards = [name for name in recorded if name.startswith("zero_pp_rank_")]
        assert len(shards) == 2, recorded
        _alter_one_byte(path / next(name for name in shards if name.startswith("zero_pp_rank_1_")))
    capfd.readouterr()
    again = train(2, job_path, run, layout + ["stages.pretrain.steps=8"])
    out = capfd.readouterr().out
    for path in checkpoints:
        assert f"warning: skipping checkpoint {path}: zero_pp_rank_1_" in out, out[-3000:]
    assert "resumed from" not in out
    assert sorted(again["losses"]) == list(range(1, 9))


def test_sft_starts_from_the_pretrain_export_and_learns(base):
    job_path = base[0]
    run = fresh(base, "sft")
    train(1, job_path, run)
    sft = train(1, job_path, run, stage="sft")
    losses = sft["losses"]
    assert losses[max(losses)] < losses[min(losses)]
    from model.export import load_model_dir

    model, tok, meta = load_model_dir(run / "sft" / "model")
    assert meta["provenance"]["stage"] == "sft" and model.config.vocab_size == tok.n_vocab


def test_changing_masked_targets_leaves_the_loss_unchanged(base):
    from model.export import load_model_dir
    from pipelines.data.loader import open_split, to_batch

    run = base[1]
    rows = open_split(run / "data" / "sft", "train")
    tokens, mask = rows.window(0)

    class One:
        seq_len = rows.seq_len

        def __init__(self, t):
            self.t = t

        def window(self, i, offset=0):
            return self.t, mask

    torch.manual_seed(0)
    from model.gpt import GPT
    from helpers import tiny_config

    model = GPT(tiny_config(2048, block_size=32))
    x, y = to_batch(One(tokens), [0])
    base_loss = model(x, labels=y)[1]
    masked = int(np.flatnonzero(mask[1:] == 0)[0]) + 1
    supervised = int(np.flatnonzero(mask[1:] == 1)[0]) + 1
    changed = tokens.copy()
    changed[masked] = (changed[masked] + 1) % 700
    _, y_masked = to_batch(One(changed), [0])
    assert torch.equal(model(x, labels=y_masked)[1], base_loss)
    changed = tokens.copy()
    changed[supervised] = (changed[supervised] + 1) % 700
    _, y_sup = to_batch(One(changed), [0])
    assert not torch.equal(model(x, labels=y_sup)[1], base_loss)


def test_the_pretraining_option_reaches_the_loader(base):
    """data.pretrain.separate_documents: the end-of-text closing each document predicts nothing
    (its target is the next document's first token); off, every target counts."""
    job_path, steps = base[0], ["stages.pretrain.steps=2"]
    across = train(1, job_path, fresh(base, "across"), steps)
    apart = train(1, job_path, fresh(base, "apart"), steps + ["data.pretrain.separate_documents=true"])
    assert across["result"]["train/supervised_fraction"] == 1.0
    assert 0.8 < apart["result"]["train/supervised_fraction"] < 1.0


def test_tensorboard_has_the_scalars(base):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job_path = base[0]
    run = fresh(base, "tb")
    train(1, job_path, run)
    acc = EventAccumulator(str(run / "pretrain" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/achieved_tflops_per_device",
                "perf/step_time_s", "perf/peak_memory_gb", "val/loss", "val/bpb"}
    assert expected <= tags, expected - tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    # The resolved job and the rendered DeepSpeed config, as text summaries written at step 0.
    texts = {tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in acc.Tags()["tensors"]}
    assert "name: engine" in texts["config/job/text_summary"]
    assert "train_micro_batch_size_per_gpu: 4" in texts["config/deepspeed/text_summary"]


def test_the_worker_runs_under_torchrun(base, tmp_path):
    import subprocess
    import sys

    from distributed import free_port

    job_path = base[0]
    run = fresh(base, "torchrun")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "cluster.torchrun", str(job_path), "--stage", "pretrain", "--run-dir", str(run),
           "--set", "cluster.num_workers=2", "--set", "stages.pretrain.deepspeed.pipeline_stages=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[pretrain] done: 6 steps" in proc.stdout
    assert (run / "pretrain" / "model" / "model.safetensors").exists()


def test_export_is_independent_of_the_layout(base):
    """A pipeline-2 pretraining's export fine-tunes the same at data parallel 2, at pipeline 2
    and on one process (which accumulates what the data-parallel ranks split)."""
    import shutil

    job_path = base[0]
    run = fresh(base, "layout-pp2-dp2")
    train(2, job_path, run, ["cluster.num_workers=2", "stages.pretrain.deepspeed.pipeline_stages=2"])
    by_layout = {"dp2": train(2, job_path, run, ["cluster.num_workers=2"], stage="sft")}
    for name, procs, layout in (("pp2", 2, ["cluster.num_workers=2", "stages.sft.deepspeed.pipeline_stages=2"]), ("one", 1, [])):
        other = fresh(base, f"layout-pp2-{name}")
        shutil.copytree(run / "pretrain" / "model", other / "pretrain" / "model")
        by_layout[name] = train(procs, job_path, other, layout + ["stages.sft.grad_accum=2"], stage="sft")
    assert by_layout["dp2"]["result"]["step"] == 4
    for name, sft in by_layout.items():
        assert sorted(sft["losses"]) == [1, 2, 3, 4], name
        for step, loss in by_layout["dp2"]["losses"].items():
            assert abs(sft["losses"][step] - loss) < 1e-4, (name, step)
