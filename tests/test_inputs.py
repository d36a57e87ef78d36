"""What a stage read is part of its fingerprint: file contents, a tokenizer directory, an init model."""

import json
import os
import time

import numpy as np
import pytest
import yaml

from jobs.fingerprints import fingerprints, stage_inputs
from helpers import relaygpt
from jobs.spec import load_job
from pipelines.inputs import SETTLED_NS, FileHashes, describe_change


def _age(path, seconds: float = 60) -> None:
    """Date a file back (as if written a while ago), so its digest may be cached."""
    past = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


def test_cached_digests_follow_size_and_mtime(tmp_path):
    data, cache = tmp_path / "corpus.txt", tmp_path / "run" / "input_hashes.json"
    data.write_text("one two three")
    _age(data)
    hashes = FileHashes(cache)
    first = hashes.sha256(data)
    hashes.save()
    entry = json.loads(cache.read_text())[str(data.resolve())]
    assert entry == {"size": 13, "mtime_ns": data.stat().st_mtime_ns, "sha256": first}
    data.write_text("one two THREE")  # same size, new mtime
    _age(data, 30)
    assert FileHashes(cache).sha256(data) != first
    # The cache is what answers for an unchanged (path, size, mtime): put the old mtime back on new
    # bytes and the stale digest comes back, which is why only settled files are cached.
    os.utime(data, ns=(entry["mtime_ns"], entry["mtime_ns"]))
    assert FileHashes(cache).sha256(data) == first


def test_a_file_written_just_now_is_hashed_every_time(tmp_path):
    data, cache = tmp_path / "corpus.txt", tmp_path / "input_hashes.json"
    data.write_text("fresh")
    # Dated a second ahead, so it is "just written" however slowly this test runs.
    mtime = time.time_ns() + SETTLED_NS // 2
    os.utime(data, ns=(mtime, mtime))
    hashes = FileHashes(cache)
    digest = hashes.sha256(data)
    hashes.save()
    assert not cache.exists()
    data.write_text("FRESH")  # within one tick of a coarse clock the mtime could stay the same
    os.utime(data, ns=(mtime, mtime))
    assert FileHashes(cache).sha256(data) != digest


def _job(tmp_path, **stages):
    job = {"name": "fp", "model": {"preset": "tiny", "block_size": 32}, "tokenizer": {"dir": "tok"},
           "data": {"num_proc": 1, "pretrain": {"sources": [{"type": "text", "path": "corpus/*.txt"},
                                                            {"type": "hub", "name": "roneneldan/TinyStories", "field": "text"}]}},
           "stages": {"pretrain": {"steps": 2, **stages}}}
    path = tmp_path / "fp.yaml"
    path.write_text(yaml.safe_dump(job))
    return load_job(path)


def test_fingerprints_cover_source_tokenizer_and_init_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("alpha")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "base" / "tokenizer").mkdir(parents=True)
    (tmp_path / "base" / "model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "base" / "tokenizer" / "ranks.tiktoken").write_text("x")
    job = _job(tmp_path, init="base")
    inputs = stage_inputs(job)
    assert inputs == {"data": {"corpus/a.txt": inputs["data"]["corpus/a.txt"], "tok/tokenizer.json": inputs["data"]["tok/tokenizer.json"]},
                      "pretrain": {"base/model.safetensors": inputs["pretrain"]["base/model.safetensors"],
                                   "base/tokenizer/ranks.tiktoken": inputs["pretrain"]["base/tokenizer/ranks.tiktoken"]}}
    before = fingerprints(job)
    assert fingerprints(job) == before  # unchanged files: the same fingerprints

    (tmp_path / "base" / "model.safetensors").write_bytes(b"\x01" * 64)  # new weights: pretrain (and after), not data
    after = fingerprints(job)
    assert after["data"] == before["data"] and after["pretrain"] != before["pretrain"]
    change = describe_change(inputs["pretrain"], stage_inputs(job)["pretrain"])
    assert change.startswith("base/model.safetensors (sha256 ") and "…" in change

    (tmp_path / "tok" / "tokenizer.json").write_text("[]")  # the same size, other contents
    (tmp_path / "corpus" / "b.txt").write_text("beta")  # the glob matches one more file
    again = fingerprints(job)
    assert again["data"] != after["data"] and again["pretrain"] != after["pretrain"]
    assert describe_change(inputs["data"], stage_inputs(job)["data"]) == "corpus/b.txt (new file) and 1 more"


def test_a_job_reading_no_files_keeps_its_fingerprints(tmp_path):
    """Synthetic and hub sources with a named encoding: settings only, digested as before inputs were."""
    import hashlib

    job = load_job(_write(tmp_path, {"name": "s", "tokenizer": {"encoding": "gpt2"}, "data": {"pretrain": {"sources": [
        {"type": "synthetic"}, {"type": "hub", "name": "roneneldan/TinyStories", "config": "default"}]}}}))
    assert stage_inputs(job) == {"data": {}}
    d = job.resolved_dict()
    settings = json.dumps([d["tokenizer"], d["data"], d["seed"], d["model"].get("block_size")], sort_keys=True, default=str)
    assert fingerprints(job)["data"] == hashlib.sha256(settings.encode()).hexdigest()[:16]
    hub = load_job(tmp_path / "job.yaml", ["data.pretrain.sources.1.config=other"])
    assert fingerprints(hub)["data"] != fingerprints(job)["data"]


def _write(tmp_path, job):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# ---- end to end: `relaygpt run` twice, then with a changed corpus and a changed tokenizer ----

@pytest.mark.slow
def test_changed_inputs_re_run_their_stage_and_everything_after(tmp_path, shared_data):
    from model.tokenizer import Tokenizer
    from pipelines.data.shards import load_split, read_manifest

    story = (shared_data / "pretrain" / "tinystories_sample.txt").read_text()
    (tmp_path / "corpus.txt").write_text(story)
    Tokenizer.train([story], 300, name="small").save(tmp_path / "tok")
    job = {"name": "fp", "seed": 3, "model": {"preset": "tiny", "n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32},
           "tokenizer": {"dir": "tok"}, "output_dir": "runs",
           "data": {"num_proc": 1, "pretrain": {"sources": [{"type": "text", "path": "corpus.txt", "split_by": "blank_line"}]}},
           "cluster": {"num_workers": 1},
           "stages": {"pretrain": {"steps": 2, "micro_batch": 2, "log_every": 1, "eval_every": 100, "checkpoint_every": 100,
                                   "save_checkpoints": False, "deepspeed": {"zero_stage": 0}}}}
    path = _write(tmp_path, job)
    run = tmp_path / "runs" / "fp" / "default"

    def relaygpt_run():
        # An embedded one-worker run: the local launcher, no Ray (the fingerprints are the same either way).
        proc = relaygpt("run", path, env={"RAY_ADDRESS": ""}, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout.splitlines()

    def skipped(lines):
        return [line.split("]")[0][1:] for line in lines if "up to date" in line]

    def corpus_text():
        directory = run / "data" / "pretrain"
        manifest = read_manifest(directory)
        tok = Tokenizer.from_dir(run / "tokenizer")
        tokens = np.concatenate([load_split(directory, manifest, split) for split in ("train", "val")])
        return tok.decode([t for t in tokens.tolist() if t != tok.eot_id])

    assert skipped(relaygpt_run()) == []
    assert skipped(relaygpt_run()) == ["data", "pretrain"]
    first_export = (run / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns

    (tmp_path / "corpus.txt").write_text(story + "\n\nA purple walrus named Zebedee sang to the moon every night.\n")
    lines = relaygpt_run()
    changed = [line for line in lines if "input changed" in line]
    assert len(changed) == 1 and changed[0].startswith("[data] input changed: corpus.txt (sha256 "), lines
    assert changed[0].endswith(", re-preparing") and skipped(lines) == []
    assert "purple walrus named Zebedee" in corpus_text()
    assert (run / "pretrain" / "model" / "model.safetensors").stat().st_mtime_ns != first_export  # pretrained again

    Tokenizer.train([story], 320, name="small").save(tmp_path / "tok")
    lines = relaygpt_run()
    changed = [line for line in lines if "input changed" in line]
    assert len(changed) == 1 and changed[0].startswith("[data] input changed: tok/ranks.tiktoken (sha256 "), lines
    assert skipped(lines) == [] and json.loads((run / "tokenizer" / "tokenizer.json").read_text())["sha256"] == \
        json.loads((tmp_path / "tok" / "tokenizer.json").read_text())["sha256"]
    assert skipped(relaygpt_run()) == ["data", "pretrain"]


def test_the_eval_stage_fingerprint_covers_its_task_files_data_and_models(tmp_path):
    """A task file of the user's, the local data it names and a model directory named by path
    are the eval stage's inputs: changing one re-runs eval only; shipped tasks are code."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("alpha")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.yaml").write_text("name: mine\nsource: {file: mine.jsonl}\nmetric: exact_match\n")
    (tmp_path / "tasks" / "mine.jsonl").write_text('{"input": "2+2", "target": "4"}\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_bytes(b"\x00" * 8)
    _job(tmp_path)
    raw = yaml.safe_load((tmp_path / "fp.yaml").read_text())
    raw["stages"]["eval"] = {"models": ["base", "other"], "tasks": ["synthetic", "gsm8k", "tasks/mine.yaml"]}
    (tmp_path / "fp.yaml").write_text(yaml.safe_dump(raw))
    job = load_job(tmp_path / "fp.yaml")
    assert set(stage_inputs(job)["eval"]) == {"tasks/mine.yaml", "tasks/mine.jsonl", "other/model.safetensors"}
    before = fingerprints(job)
    (tmp_path / "tasks" / "mine.jsonl").write_text('{"input": "2+2", "target": "5"}\n')
    after = fingerprints(job)
    assert after["eval"] != before["eval"] and {k: after[k] for k in ("data", "pretrain")} == {k: before[k] for k in ("data", "pretrain")}
    (tmp_path / "other" / "model.safetensors").write_bytes(b"\x01" * 8)
    assert fingerprints(job)["eval"] != after["eval"]


def test_a_run_reads_each_input_file_once_for_its_plan_and_its_fingerprints(tmp_path, monkeypatch):
    """A tokenizer trained on the corpus: pre-flight's plan asks whether the prepared tokenizer is
    current (a digest of the corpus), the driver fingerprints the stages (the same digest). With
    the run's one FileHashes they read the corpus once; `relaygpt plan` reads the run's cache."""
    import pipelines.inputs
    from cluster.preflight import check
    from pipelines.rundir import RunDir

    (tmp_path / "corpus").mkdir()
    corpus = tmp_path / "corpus" / "a.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    _age(corpus)
    job = {"name": "fp", "model": {"preset": "tiny", "block_size": 32}, "tokenizer": {"train": {"vocab_size": 600}},
           "data": {"num_proc": 1, "pretrain": {"sources": [{"type": "text", "path": "corpus/*.txt"}]}},
           "stages": {"pretrain": {"steps": 2}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    loaded, run_dir = load_job(tmp_path / "job.yaml"), RunDir(tmp_path / "run")
    reads = []
    real = pipelines.inputs.sha256_of
    monkeypatch.setattr(pipelines.inputs, "sha256_of", lambda path: reads.append(path.name) or real(path))
    hashes = FileHashes(run_dir.input_hashes)
    run, problems = check(loaded, run_dir, hashes=hashes)
    assert not problems and not run.vocab_exact and reads == ["a.txt"]
    stage_inputs(loaded, hashes, run.data)
    assert reads == ["a.txt"]
    hashes.save()
    check(loaded, run_dir)  # relaygpt plan: a new process, the run's cache
    assert reads == ["a.txt"]
