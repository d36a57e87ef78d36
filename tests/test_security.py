"""Security fixes, one test (or more) each: nothing a user types or a file holds runs as a command,
escapes its directory, or reaches DeepSpeed's unpickler unverified; the shipped cluster config starts.

The end-to-end halves live beside their subjects: a hostile --out submitted to the session's Ray
head (tests/test_jobs_submit.py), tampered checkpoints skipped on resume (tests/test_engine.py) and
packages planted in the working folder or beside the job file (tests/test_own_code.py).
"""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import cluster.cli as cli
import cluster.runtime
from model.errors import RelayError

REPO = Path(__file__).resolve().parents[1]
TINY_JOB = REPO / "jobs" / "tiny-assistant.yaml"
HOSTILE = "x; touch PWNED && echo $(id) `id` 'q' \"d\" | cat"


def _files_under(path: Path) -> set[Path]:
    return set(path.rglob("*"))


# ---- relaygpt submit: the entrypoint Ray runs through a shell ------------------------------

def test_the_entrypoint_round_trips_through_the_shell_to_the_intended_argv(tmp_path):
    from cluster.submit import entrypoint

    out = tmp_path / f"o u t; touch {tmp_path / 'PWNED'}"
    command = entrypoint(HOSTILE, str(out), resume=True)
    assert shlex.split(command) == ["python", "-m", "cluster.cli", "run", "job.yaml", "--run-id", HOSTILE,
                                    "--out", str(out.resolve()), "--resume"]
    assert shlex.split(entrypoint("default", None, resume=False)) == ["python", "-m", "cluster.cli", "run", "job.yaml",
                                                                     "--run-id", "default"]


def test_the_entrypoint_run_by_a_real_shell_runs_one_command(tmp_path):
    """What Ray's job supervisor does with the entrypoint (a shell runs it, in the job's working
    directory): the hostile run id reaches relaygpt as one argument, which refuses it; the shell
    runs nothing else. (The job names a closed port as its cluster, so that were the words split,
    the run they left would stop at once instead of training.)"""
    from cluster.submit import entrypoint
    from distributed import free_port

    job = yaml.safe_load(TINY_JOB.read_text())
    job["cluster"]["address"] = f"127.0.0.1:{free_port()}"
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    command = entrypoint(HOSTILE, str(tmp_path / f"o u t; touch {tmp_path / 'PWNED2'}"), resume=False)
    proc = subprocess.run(["/bin/sh", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--run-id" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]  # no PWNED, no output directory


def test_a_set_value_travels_in_the_job_file_not_the_entrypoint(tmp_path):
    from cluster.submit import _absolute_paths, entrypoint
    from jobs.spec import load_job

    value = f"o u t; touch {tmp_path / 'PWNED'}"
    job = load_job(TINY_JOB, [f"output_dir={value}", "stages.eval=null"])
    sent = yaml.safe_load(yaml.safe_dump(_absolute_paths(job), sort_keys=False))
    assert sent["output_dir"] == str((TINY_JOB.parent / value).resolve())
    assert "touch" not in entrypoint("default", None, resume=False)


# ---- --run-id: one directory under OUT/<name>/ ---------------------------------------------

BAD_RUN_IDS = ["../../x", "/abs", "", "a/b", "..", ".hidden", "-rf", "a b"]


@pytest.mark.parametrize("command", ["run", "plan", "submit"])
@pytest.mark.parametrize("run_id", BAD_RUN_IDS, ids=repr)
def test_a_bad_run_id_is_refused_and_nothing_is_created(command, run_id, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run id that should have been refused")

    monkeypatch.setattr(cluster.runtime, "ray_session", no_ray)
    job = tmp_path / "jobs" / "job.yaml"
    job.parent.mkdir()
    shutil.copy(TINY_JOB, job)
    if run_id == "/abs":
        run_id = str(tmp_path / "abs")
    extra = ["--address", "http://127.0.0.1:9"] if command == "submit" else []
    before = _files_under(tmp_path)
    code = cli.main([command, str(job), f"--run-id={run_id}", "--out", str(tmp_path / "out" / "o"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and "\n" not in err, err
    assert err.startswith("relaygpt: error: --run-id:") and "letters, digits" in err, err
    assert _files_under(tmp_path) == before


def test_a_valid_run_id_names_its_directory(tmp_path, capsys):
    from jobs.spec import load_job

    job = load_job(TINY_JOB)
    assert job.run_dir("r-1.b_2", str(tmp_path)) == tmp_path / "tiny-assistant" / "r-1.b_2"
    assert cli.main(["plan", str(TINY_JOB), "--run-id", "r-1.b_2", "--out", str(tmp_path)]) == 0
    assert str(tmp_path / "tiny-assistant" / "r-1.b_2") in capsys.readouterr().out


def test_clearing_a_stage_deletes_only_inside_the_run_directory(tmp_path):
    from cluster.driver import _clear_stage
    from pipelines.rundir import RunDir

    run_dir = RunDir(tmp_path / "out" / "job" / "r1")
    (run_dir.stage("pretrain").checkpoints / "step_00000003").mkdir(parents=True)
    _clear_stage(run_dir, "pretrain")  # a stage inside: gone
    assert not run_dir.stage("pretrain").root.exists() and run_dir.root.is_dir()

    precious = tmp_path / "precious"
    (precious / "keep.txt").parent.mkdir()
    (precious / "keep.txt").write_text("mine")
    run_dir.stage("sft").root.symlink_to(precious, target_is_directory=True)  # a link leading out
    with pytest.raises(RelayError, match="not inside the run directory"):
        _clear_stage(run_dir, "sft")
    for outside in (run_dir.root, run_dir.root / "..", tmp_path / "precious", Path("/")):
        with pytest.raises(RelayError, match="not inside the run directory"):
            run_dir.remove(outside)
    assert (precious / "keep.txt").read_text() == "mine" and run_dir.root.is_dir()


# ---- checkpoints: every file hashed at commit, verified before DeepSpeed unpickles it --------

def _tag(root: Path, step: int, files: dict[str, bytes]) -> Path:
    """An uncommitted checkpoint directory, as the ranks leave it after DeepSpeed's save."""
    from pipelines.train import checkpoint as ckpt

    tmp = root / ckpt.temp_tag(step)
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    return tmp


def _committed(root: Path, step: int, files: dict[str, bytes]) -> Path:
    from pipelines.train import checkpoint as ckpt

    _tag(root, step, files)
    return ckpt.commit(root, step)


RANK_FILES = {"mp_rank_00_model_states.pt": b"model" * 1000, "zero_pp_rank_0_mp_rank_00_optim_states.pt": b"opt0" * 999,
              "zero_pp_rank_1_mp_rank_00_optim_states.pt": b"opt1" * 999, "nested/extra_state.pt": b"x" * 10}


def test_commit_records_the_sha256_of_every_file_whichever_rank_hashed_it(tmp_path):
    import hashlib

    from pipelines.train import checkpoint as ckpt

    tmp = _tag(tmp_path, 3, RANK_FILES)
    names = ckpt.files_of(tmp)
    shares = [ckpt.describe(tmp, ckpt.share(names, (rank, 2))) for rank in range(2)]
    assert set(shares[0]).isdisjoint(shares[1]) and set(shares[0]) | set(shares[1]) == set(RANK_FILES)
    del shares[1][names[1]]  # a share that missed a file (a rank that did not see it yet): rank 0 hashes it
    path = ckpt.commit(tmp_path, 3, files={**shares[0], **shares[1]})
    recorded = json.loads((path / ckpt.MANIFEST).read_text())["files"]
    assert recorded == {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in RANK_FILES.items()}
    assert ckpt.problem_with(path) is None


def test_a_damaged_checkpoint_is_skipped_and_the_next_older_used(tmp_path):
    from pipelines.train import checkpoint as ckpt

    older, newest = _committed(tmp_path, 3, RANK_FILES), _committed(tmp_path, 6, RANK_FILES)
    victim = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte, same size
    victim.write_bytes(bytes(data))
    reasons = [ckpt.problem_with(newest, (rank, 2)) for rank in range(2)]  # only the rank hashing it sees it
    assert sorted(reasons, key=str)[0] is None and "does not match the sha256" in str(reasons)
    warnings = []
    assert ckpt.newest_usable(tmp_path, warnings.append) == (3, older.name)
    assert warnings == [f"skipping checkpoint {newest}: zero_pp_rank_1_mp_rank_00_optim_states.pt does not match the sha256 "
                        "recorded in checkpoint.json (altered or corrupted)"]
    # Damaged in every other way too: then none is usable (the run starts fresh).
    (older / "planted_optim_states.pt").write_bytes(b"evil")
    assert "planted_optim_states.pt is not in checkpoint.json" in (ckpt.problem_with(older) or "")
    (older / "planted_optim_states.pt").unlink()
    (older / "nested" / "extra_state.pt").unlink()
    assert ckpt.problem_with(older) == "nested/extra_state.pt is missing"
    warnings.clear()
    assert ckpt.newest_usable(tmp_path, warnings.append) is None and len(warnings) == 2


def test_a_checkpoint_recorded_without_hashes_is_not_loaded(tmp_path):
    """A record of sizes only (older relaygpt) cannot be verified, so it is never unpickled."""
    from pipelines.train import checkpoint as ckpt

    path = _committed(tmp_path, 3, RANK_FILES)
    record = json.loads((path / ckpt.MANIFEST).read_text())
    record["files"] = {name: f["size"] for name, f in record["files"].items()}
    (path / ckpt.MANIFEST).write_text(json.dumps(record))
    assert "records no sha256" in ckpt.problem_with(path)


class _Payload:
    """What a crafted checkpoint holds: unpickling it calls os.system (DeepSpeed's own loader would)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_a_crafted_pickle_with_its_record_rewritten_does_not_run_on_resume(tmp_path):
    """Whoever can write a checkpoint can rewrite its record: the sha256 then matches, and only
    loading as data (weights only) stands between the file and `--resume`. The run is refused
    in one line naming the file; the pickle's command never runs. A run of the main job cut to
    two steps, on one local rank (no Ray)."""
    import hashlib

    import torch

    from helpers import assert_one_line_error, relaygpt
    from pipelines.train.checkpoint import MANIFEST, deepspeed_types

    out, marker = tmp_path / "out", tmp_path / "PAYLOAD_RAN"
    short = ["data.num_proc=1", "data.synthetic.mentions_per_fact=2", "cluster.num_workers=1", "cluster.launcher=local",
             "stages.pretrain.steps=2", "stages.pretrain.log_every=1", "stages.pretrain.eval_every=2",
             "stages.pretrain.checkpoint_every=2", "stages.pretrain.micro_batch=2", "stages.pretrain.optimizer.warmup_steps=1",
             "stages.sft=null", "stages.eval=null"]
    settings = [arg for item in short for arg in ("--set", item)]
    env = {"RAY_ADDRESS": ""}
    first = relaygpt("run", TINY_JOB, "--out", out, *settings, env=env)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    stage = out / "tiny-assistant" / "default" / "pretrain"
    checkpoint = stage / "checkpoints" / "step_00000002"
    victim = checkpoint / "mp_rank_00_model_states.pt"
    with torch.serialization.safe_globals(deepspeed_types()):
        state = torch.load(victim, weights_only=True)
    state["payload"] = _Payload(f"touch {shlex.quote(str(marker))}")
    torch.save(state, victim)
    record = json.loads((checkpoint / MANIFEST).read_text())
    record["files"][victim.name] = {"size": victim.stat().st_size, "sha256": hashlib.sha256(victim.read_bytes()).hexdigest()}
    (checkpoint / MANIFEST).write_text(json.dumps(record))
    status = json.loads((stage / "stage.json").read_text())
    (stage / "stage.json").write_text(json.dumps({**status, "status": "interrupted"}))  # as if stopped after the checkpoint

    resumed = relaygpt("run", TINY_JOB, "--out", out, *settings, "--resume", env=env)
    assert not marker.exists(), "the crafted pickle ran"  # it does under torch.load(weights_only=False)
    assert_one_line_error(resumed, f"checkpoint file {victim}", "posix.system", f"delete {checkpoint}")


def test_universal_checkpoint_loading_is_refused_before_launch():
    """DeepSpeed's universal-checkpoint loader unpickles outside the checkpoint engine (so
    outside the weights-only loading): asking for it in deepspeed.extra is refused at load."""
    from jobs.spec import load_job

    with pytest.raises(RelayError, match=r"stages\.sft\.deepspeed\.extra\.checkpoint\.load_universal: .*unpickler"):
        load_job(TINY_JOB, ["stages.sft.deepspeed.extra={checkpoint: {load_universal: true}}"])


# ---- model directories: the tokenizer lies inside ------------------------------------------

@pytest.fixture
def model_dir(tmp_path, trained_tokenizer):
    from helpers import tiny_config
    from model.export import save_model_dir
    from model.gpt import GPT

    return save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab)), trained_tokenizer, tmp_path / "m")


def _point_tokenizer_at(model_dir: Path, value) -> None:
    meta = json.loads((model_dir / "config.json").read_text())
    meta["tokenizer"]["path"] = value
    (model_dir / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link"])
def test_a_tokenizer_path_outside_the_model_directory_is_refused(where, model_dir, tmp_path, capsys):
    """The tokenizer elsewhere is a valid one (the same files): only where it lies is wrong."""
    from model.export import load_model_dir, open_model_weights

    outside = tmp_path / "elsewhere-tok"
    shutil.copytree(model_dir / "tokenizer", outside)
    if where == "absolute":
        _point_tokenizer_at(model_dir, str(outside))
        needle = "is not a relative path inside the model directory"
    elif where == "dotdot":
        _point_tokenizer_at(model_dir, "../elsewhere-tok")
        needle = "leads outside the model directory"
    else:
        shutil.rmtree(model_dir / "tokenizer")
        (model_dir / "tokenizer").symlink_to(outside, target_is_directory=True)
        needle = "leads outside the model directory"
    for load in (load_model_dir, open_model_weights):
        with pytest.raises(RelayError, match=needle):
            load(model_dir)
    assert cli.main(["export", str(model_dir), "--out", str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config.json: tokenizer.path:" in err and needle in err, err
    assert not (tmp_path / "exported").exists()


def test_a_tokenizer_path_inside_the_model_directory_still_loads(model_dir):
    from model.export import load_model_dir

    (model_dir / "tokenizer").rename(model_dir / "tok")
    _point_tokenizer_at(model_dir, "./tok")
    assert load_model_dir(model_dir)[1].n_vocab > 0


# ---- the shipped Ray cluster launcher config -----------------------------------------------

def test_the_gpu_cluster_config_passes_rays_validation_and_gives_every_node_the_token():
    """Ray's own schema validation of a cluster launcher config (what `ray up` runs before
    anything else), then: the token file goes to every node (file_mounts reach the head; the
    head's autoscaler copies its copy to each worker), and every `ray start` reads it."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster" / "configs" / "gpu-cluster.yaml").read_text()))
    validate_config(config)
    token = [remote for remote, local in config["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert len(token) == 1 and token[0].startswith("/"), config["file_mounts"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            words = shlex.split(command)
            env = dict(w.split("=", 1) for w in words[: words.index("ray")])
            assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token[0]}, (key, command)


def test_a_checkpoint_and_a_stage_record_reach_the_disk_before_the_rename_that_commits_them(tmp_path, monkeypatch):
    """fsync of every file (and folder) of the tag before its rename, and of the folder after;
    the same for a stage's stage.json. A plain atomic write (a step log, a report) does not pay it."""
    import os

    from model.atomic import write_text_atomically
    from pipelines.rundir import RunDir
    from pipelines.train import checkpoint as ckpt

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(a))), real_replace(a, b))[1])
    tmp = _tag(tmp_path, 3, RANK_FILES)
    path = ckpt.commit(tmp_path, 3)
    renamed = events.index(("rename", str(tmp)))
    synced_before = {p for kind, p in events[:renamed] if kind == "fsync"}
    assert {str(tmp / name) for name in [*RANK_FILES, ckpt.MANIFEST]} | {str(tmp)} <= synced_before, synced_before
    assert ("fsync", str(tmp_path)) in events[renamed:], "the folder holding the rename"
    assert ckpt.problem_with(path) is None

    events.clear()
    stage = RunDir(tmp_path / "run").stage("pretrain")
    stage.write_status({"status": "completed"})
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"] and events[-1][1] == str(stage.root), events
    events.clear()
    write_text_atomically(tmp_path / "report.md", "text")
    assert [kind for kind, _ in events] == ["rename"], events


def test_a_file_system_without_fsync_still_commits_and_an_io_error_does_not(tmp_path, monkeypatch):
    import errno
    import os

    from model.atomic import write_text_atomically

    def refuse(code):
        def fsync(fd):
            raise OSError(code, os.strerror(code))
        return fsync

    monkeypatch.setattr(os, "fsync", refuse(errno.EINVAL))  # a mount that cannot sync: atomic, as before
    write_text_atomically(tmp_path / "stage.json", "{}", durable=True)
    assert (tmp_path / "stage.json").read_text() == "{}"
    monkeypatch.setattr(os, "fsync", refuse(errno.EIO))  # the disk failed: nothing is committed
    with pytest.raises(OSError):
        write_text_atomically(tmp_path / "stage.json", "new", durable=True)
    assert (tmp_path / "stage.json").read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["stage.json"]
