"""Nothing outside relaygpt's own output is touched (issue 20, item 2).

Every command that writes a directory writes only one it created (it carries the
`.relaygpt-output` marker), or an absent or empty one. A user's file where a command would
write survives: the command is refused in one line naming the path, exit 2, before anything is
written. One run per run directory: a second `relaygpt run` on a directory a first one is
training in is refused with the holder's pid, and a crashed holder leaves nothing locked.
A relative `--out` is relative to the folder the command runs in.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers import assert_one_line_error, relaygpt, tiny_config

MARKER = ".relaygpt-output"


def _run_cli(capsys, *args):
    """`relaygpt ARGS` in this process: (exit status, stdout, stderr)."""
    import cluster.cli as cli

    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _refused(result, *needles):
    code, out, err = result
    err = err.strip()
    assert code == 2 and "Traceback" not in err and "\n" not in err, (code, out[-2000:], err)
    for needle in needles:
        assert needle in err, err


def _users_folder(path: Path) -> Path:
    """A folder holding a user's own file (and a sub-folder of theirs)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my own notes\n")
    (path / "photos").mkdir(exist_ok=True)
    (path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    return path


def _intact(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "my own notes\n"
    assert (path / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8 cat"


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained_tokenizer):
    from model.export import save_model_dir
    from model.gpt import GPT

    torch.manual_seed(0)
    return save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, block_size=128)), trained_tokenizer,
                          tmp_path_factory.mktemp("models") / "tiny")


def _job(folder: Path, shakespeare: str, steps: int = 8, **top) -> Path:
    """A one-worker job that needs no Ray: data in the driver, training in one local rank."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text(shakespeare[:60_000])
    job = {"name": "mine", "seed": 3, **top,
           "model": {"preset": "tiny", "n_layer": 2, "n_embd": 64, "n_head": 2, "block_size": 64},
           "tokenizer": {"train": {"vocab_size": 512}},
           "data": {"num_proc": 1, "pretrain": {"val_fraction": 0.1, "sources": [
               {"type": "text", "path": "corpus.txt", "split_by": "blank_line"}]}},
           "cluster": {"num_workers": 1, "cpus_per_worker": 1},
           "stages": {"pretrain": {"steps": steps, "micro_batch": 4, "log_every": 1, "eval_every": 100000,
                                   "checkpoint_every": 100000, "deepspeed": {"zero_stage": 0}}}}
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


# ---- the marker --------------------------------------------------------------------------------

def test_a_directory_is_written_only_when_absent_empty_or_marked_as_the_same_kind(tmp_path):
    from model.errors import RelayError
    from model.owned import check_owned, claim, marker_kind

    claim(tmp_path / "new" / "run", "run", "--x")  # absent: created, with its parents, and marked
    assert marker_kind(tmp_path / "new" / "run") == "run"
    claim(tmp_path / "new" / "run", "run", "--x")  # ours: again
    (tmp_path / "empty").mkdir()
    claim(tmp_path / "empty", "eval", "--x")
    assert marker_kind(tmp_path / "empty") == "eval"
    with pytest.raises(RelayError, match=r"^--x .*new/run: is a run directory of relaygpt, not a model directory; refusing"):
        check_owned(tmp_path / "new" / "run", "model", "--x")
    users = _users_folder(tmp_path / "users")
    with pytest.raises(RelayError, match=r"^--x .*users: holds files relaygpt did not write \(no \.relaygpt-output marker\)"):
        claim(users, "run", "--x")
    (users / MARKER).write_text("I made this up")  # a marker that does not say what it marks is no marker
    with pytest.raises(RelayError, match="holds files relaygpt did not write"):
        check_owned(users, "run", "--x")
    with pytest.raises(RelayError, match=r"notes.txt: exists and is not a directory"):
        check_owned(users / "notes.txt", "run", "--x")
    _intact(users)


# ---- every command that writes there ------------------------------------------------------------

def test_export_never_replaces_a_users_folder(model_dir, tmp_path, capsys):
    for fmt in ("native", "hf"):
        users = _users_folder(tmp_path / f"users-{fmt}")
        before = _tree(users)
        _refused(_run_cli(capsys, "export", model_dir, "--out", users, "--format", fmt),
                 f"--out {users}: holds files relaygpt did not write")
        _intact(users)
        assert _tree(users) == before and not any(p.name.startswith(".") for p in tmp_path.iterdir())
        out = tmp_path / f"ours-{fmt}"
        for _ in range(2):  # an export of its own is replaced
            code, _, err = _run_cli(capsys, "export", model_dir, "--out", out, "--format", fmt)
            assert code == 0, err
            assert json.loads((out / MARKER).read_text())["kind"] == "model"
    run_dir = tmp_path / "run"
    from model.owned import mark

    run_dir.mkdir()
    mark(run_dir, "run")
    (run_dir / "job.yaml").write_text("name: x\n")
    _refused(_run_cli(capsys, "export", model_dir, "--out", run_dir), "is a run directory of relaygpt, not a model directory")
    assert (run_dir / "job.yaml").exists()


def test_tokenizer_train_eval_and_generate_never_write_over_a_users_files(model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world, the quick brown fox\n" * 50)
    users = _users_folder(tmp_path / "users")
    _refused(_run_cli(capsys, "tokenizer", "train", "--input", corpus, "--vocab-size", 300, "--out", users),
             f"--out {users}: holds files relaygpt did not write")
    # eval --out: refused before any generation; into a folder of its own, written and re-written
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"q": f"count {i}", "a": str(i)}) + "\n" for i in range(2)))
    task = tmp_path / "task.yaml"
    task.write_text(f"name: mine\nsource: {{file: {rows.name}}}\ninput_field: q\ntarget_field: a\nshots: 0\nmax_new_tokens: 2\n")
    _refused(_run_cli(capsys, "eval", model_dir, "--task", task, "--out", users), f"--out {users}: holds files relaygpt did not write")
    for _ in range(2):
        code, _, err = _run_cli(capsys, "eval", model_dir, "--task", task, "--out", tmp_path / "eval")
        assert code == 0, err
    assert (tmp_path / "eval" / "metrics.json").exists() and json.loads((tmp_path / "eval" / MARKER).read_text())["kind"] == "eval"
    # generate --out FILE: a user's file (or its .log) is refused; an earlier generation's output is replaced
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "ROMEO:"}) + "\n")
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"my": "data"}\n')
    _refused(_run_cli(capsys, "generate", model_dir, "--prompts", prompts, "--out", mine, "--max-new-tokens", 2),
             f"--out {mine}: is a file relaygpt did not write")
    assert mine.read_text() == '{"my": "data"}\n'
    out = tmp_path / "out.jsonl"
    for _ in range(2):
        code, _, err = _run_cli(capsys, "generate", model_dir, "--prompts", prompts, "--out", out, "--max-new-tokens", 2)
        assert code == 0, err
    Path(f"{tmp_path / 'other.jsonl'}.log").write_text("my log\n")
    _refused(_run_cli(capsys, "generate", model_dir, "--prompts", prompts, "--out", tmp_path / "other.jsonl"),
             "other.jsonl.log exists and was not written by relaygpt generate")
    assert Path(f"{tmp_path / 'other.jsonl'}.log").read_text() == "my log\n" and not (tmp_path / "other.jsonl").exists()
    _intact(users)
    assert _tree(users) == ["notes.txt", "photos", "photos/cat.jpg"]


def test_run_and_data_prepare_refuse_a_users_folder_as_their_run_directory(tmp_path, shakespeare, capsys):
    """The run directory OUT/<name>/<run-id>, whichever way it is named (output_dir, --out,
    --run-id): refused before anything is written (no job.yaml, no log, no marker)."""
    job = _job(tmp_path / "jobs", shakespeare)
    users = _users_folder(tmp_path / "jobs" / "runs" / "mine" / "default")  # the job's output_dir (runs), default run id
    for command in (["run", job], ["run", job, "--resume"], ["data", "prepare", job],
                    ["data", "inspect", job, "--stage", "pretrain"]):
        _refused(_run_cli(capsys, *command), f"run directory {users}: holds files relaygpt did not write")
    out = tmp_path / "out"
    _users_folder(out / "mine" / "exp1")
    _refused(_run_cli(capsys, "run", job, "--out", out, "--run-id", "exp1"), "exp1: holds files relaygpt did not write")
    elsewhere = _job(tmp_path / "other", shakespeare, output_dir=str(tmp_path / "out"))
    _refused(_run_cli(capsys, "data", "prepare", elsewhere, "--run-id", "exp1"), "exp1: holds files relaygpt did not write")
    _intact(users)
    _intact(out / "mine" / "exp1")
    assert _tree(users) == ["notes.txt", "photos", "photos/cat.jpg"]
    assert _tree(out / "mine" / "exp1") == ["notes.txt", "photos", "photos/cat.jpg"]


def test_a_relative_out_is_the_current_folder_and_a_users_files_beside_the_run_survive(tmp_path, shakespeare, capsys, monkeypatch):
    """`data prepare --out rel` from another folder writes under that folder, not the job's;
    a user's files in OUT and in OUT/<name> beside the run directory stay as they were."""
    job = _job(tmp_path / "jobs", shakespeare)
    here = tmp_path / "here"
    _users_folder(here / "rel")
    _users_folder(here / "rel" / "mine")
    monkeypatch.chdir(here)
    code, out, err = _run_cli(capsys, "data", "prepare", job, "--out", "rel")
    assert code == 0, err
    run = here / "rel" / "mine" / "default"
    assert (run / "data" / "pretrain" / "manifest.json").exists() and not (tmp_path / "jobs" / "rel").exists()
    assert json.loads((run / MARKER).read_text())["kind"] == "run"
    _intact(here / "rel")
    _intact(here / "rel" / "mine")
    assert _tree(here / "rel" / "mine") == sorted(["default", "notes.txt", "photos", "photos/cat.jpg"]
                                                  + [f"default/{p}" for p in _tree(run)])


# ---- one run per run directory ------------------------------------------------------------------

def _steps(run: Path) -> list[int]:
    metrics = run / "pretrain" / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.mark.slow
def test_a_second_run_on_a_busy_run_directory_is_refused_and_a_crashed_run_leaves_no_lock(tmp_path, shakespeare):
    """A real first run trains (local launcher, no Ray); `run`, `run --resume` and `data
    prepare` on its run directory are refused with its pid while it does; the first run is
    then killed (SIGKILL: no chance to clean up) and the directory is free at once."""
    job = _job(tmp_path, shakespeare, steps=100000)
    run = tmp_path / "runs" / "mine" / "default"
    first = subprocess.Popen([sys.executable, "-m", "cluster.cli", "run", str(job)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    try:
        deadline = time.time() + 300
        while not _steps(run) and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert _steps(run), first.stderr.read() if first.poll() is not None else "no step in 300 s"
        for extra in ([], ["--resume"]):
            second = relaygpt("run", job, *extra, env={"RAY_ADDRESS": ""})
            assert_one_line_error(second, f"run directory {run} is in use by another relaygpt process (pid {first.pid})")
        second = relaygpt("data", "prepare", job)
        assert_one_line_error(second, f"run directory {run} is in use", f"pid {first.pid}")
        assert first.poll() is None, "the first run went on training"
        steps = _steps(run)[-1]
        assert json.loads((run / "pretrain" / "stage.json").read_text())["status"] == "running"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    rank = json.loads((run / "pretrain" / "workers" / "rank_0.json").read_text())["pid"]
    deadline = time.time() + 30
    while os.path.exists(f"/proc/{rank}") and time.time() < deadline:  # it dies with its driver (PR_SET_PDEATHSIG)
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{rank}") or "Z" in Path(f"/proc/{rank}/stat").read_text().rsplit(")", 1)[1][:3]
    assert steps >= 1
    again = relaygpt("data", "prepare", job)  # the lock died with its holder
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "pretrain: up to date" in again.stdout


def test_outputs_written_before_markers_are_still_relaygpts(tmp_path):
    """Run and model directories from before the marker keep working (told by the files only
    relaygpt writes together); a folder that merely has a config.json is still the user's."""
    import json

    import pytest

    from model.errors import RelayError
    from model.owned import check_owned

    run = tmp_path / "run"
    (run / "pretrain").mkdir(parents=True)
    (run / "job.yaml").write_text("name: x\n")
    (run / "pretrain" / "stage.json").write_text("{}")
    check_owned(run, "run", "run directory")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"format": "relaygpt-native"}))
    check_owned(model, "model", "--out")
    with pytest.raises(RelayError, match="is a model directory of relaygpt, not a run directory"):
        check_owned(model, "run", "run directory")
    users = tmp_path / "users"
    users.mkdir()
    (users / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RelayError, match="holds files relaygpt did not write"):
        check_owned(users, "model", "--out")
