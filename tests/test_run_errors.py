"""Bad job files: each is one line naming the field or file:line, exit 2, and no Ray started."""

from pathlib import Path

import pytest
import yaml

import cluster.cli as cli
import cluster.runtime
from distributed import free_port
from helpers import assert_one_line_error, relaygpt

REPO = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((REPO / "jobs" / "tiny-assistant.yaml").read_text())


def _edit(job: dict, path: str, value):
    keys = path.split(".")
    node = job
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    if value is _DELETE:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


_DELETE = object()

CASES = [
    ("unknown top-level key", {"stagez": {}}, None, ["stagez: unknown key", "did you mean 'stages'"]),
    ("unknown nested key", {"stages.pretrain.stpes": 10}, None, ["stages.pretrain.stpes: unknown key", "did you mean 'steps'"]),
    ("wrong type", {"stages.pretrain.micro_batch": "eight"}, None, ["stages.pretrain.micro_batch", "valid integer"]),
    ("missing section", {"tokenizer": _DELETE}, None, ["tokenizer: required field is missing"]),
    ("missing data file", {"data.pretrain.sources": [{"type": "text", "path": "no/such/*.txt"}]}, None,
     ["data.pretrain.sources[0].path: no file matches"]),
    ("pipeline with ZeRO-2", {"stages.pretrain.deepspeed": {"zero_stage": 2, "pipeline_stages": 2}}, None,
     ["stages.pretrain.deepspeed.zero_stage", "ZeRO-2 cannot be combined with pipeline_stages 2"]),
    ("more stages than layers", {"stages.pretrain.deepspeed": {"pipeline_stages": 8}, "cluster.num_workers": 8}, None,
     ["stages.pretrain.deepspeed.pipeline_stages: 8 stages but the model has 4 layers"]),
    ("workers not a multiple of pp", {"stages.sft.deepspeed": {"pipeline_stages": 2}, "cluster.num_workers": 3}, None,
     ["cluster.num_workers: 3 workers is not a multiple of stages.sft.deepspeed.pipeline_stages (2)"]),
    ("global batch does not divide", {"stages.pretrain.global_batch": 20}, None,
     ["stages.pretrain.global_batch: 20 != micro_batch 8 x grad_accum 1 x data-parallel 2 = 16"]),
    ("unreachable address", {"cluster.address": "127.0.0.1:PORT"}, None, ["cluster.address: cannot reach the Ray cluster at 127.0.0.1:"]),
    ("unknown preset", {"model.preset": "gpt-5"}, None, ["model.preset", "unknown preset 'gpt-5'"]),
    ("unknown tokenizer", {"tokenizer": {"encoding": "gpt9"}}, None, ["tokenizer.encoding", "unknown encoding 'gpt9'"]),
    ("both steps and tokens", {"stages.pretrain.tokens": 1000}, None, ["stages.pretrain", "exactly one of steps, tokens"]),
    ("negative learning rate", {"stages.sft.optimizer.lr": -0.1}, None, ["stages.sft.optimizer.lr", "greater than 0"]),
    ("unknown eval task", {"stages.eval.tasks": ["synthetic", "mmlu-pro"]}, None, ["stages.eval.tasks[1]: 'mmlu-pro' is neither a task file"]),
    ("sft without sft data", {"data.sft": _DELETE}, None, ["stages.sft: needs a data.sft section"]),
    ("model too big for memory", {"model.preset": "13b", "stages.sft": _DELETE, "stages.eval": _DELETE}, None, ["stages.pretrain: pipeline stage 0 needs", "GiB per device"]),
    ("invalid YAML", None, "name: x\nstages: [unclosed\n", ["invalid YAML"]),
    ("bad --set path", {}, None, ["--set data.pretrain.sources.9.weight: data.pretrain.sources.9 does not exist"]),
    ("init model missing", {"stages.sft.init": "no/such/model"}, None, ["stages.sft.init: model directory", "does not exist"]),
    # once accepted silently (issue 14)
    ("repeated key", None, "name: x\nseed: 1\nseed: 2\n", ["job.yaml:3: key 'seed' is repeated (first at line 2)"]),
    ("repeated nested key", None, "name: x\nstages:\n  pretrain: {steps: 1, steps: 2}\n", ["job.yaml:3: key 'steps' is repeated"]),
    ("boolean micro_batch", {"stages.pretrain.micro_batch": True}, None,
     ["job.yaml:", "stages.pretrain.micro_batch: expected a number, got the boolean true"]),
    ("boolean learning rate", {"stages.sft.optimizer.lr": False}, None, ["stages.sft.optimizer.lr: expected a number, got the boolean false"]),
    ("extra contradicts train_batch_size", {"stages.pretrain.deepspeed": {"extra": {"train_batch_size": 7}}}, None,
     ["stages.pretrain.deepspeed.extra.train_batch_size: 7 contradicts", "data-parallel 2 = 16", "set stages.pretrain.micro_batch"]),
    ("extra contradicts the micro-batch", {"stages.sft.deepspeed": {"extra": {"train_micro_batch_size_per_gpu": 2}}}, None,
     ["stages.sft.deepspeed.extra.train_micro_batch_size_per_gpu: 2 contradicts the job's micro_batch = 8"]),
    ("extra contradicts grad_accum", {"stages.sft.deepspeed": {"extra": {"gradient_accumulation_steps": 3}}}, None,
     ["stages.sft.deepspeed.extra.gradient_accumulation_steps: 3 contradicts the job's grad_accum = 1"]),
    ("extra contradicts the ZeRO stage", {"stages.pretrain.deepspeed": {"zero_stage": 1, "extra": {"zero_optimization": {"stage": 3}}}}, None,
     ["stages.pretrain.deepspeed.extra.zero_optimization.stage: 3 contradicts the job's deepspeed.zero_stage = 1"]),
    ("extra contradicts the precision", {"stages.pretrain.deepspeed": {"extra": {"bf16": {"enabled": True}}}}, None,
     ["stages.pretrain.deepspeed.extra.bf16.enabled: True contradicts the job's deepspeed.precision 'auto'"]),
]


@pytest.mark.parametrize("name, edits, raw, needles", CASES, ids=[c[0] for c in CASES])
def test_bad_job_is_one_line_exit_2_without_ray(name, edits, raw, needles, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job that should have been refused")

    monkeypatch.setattr(cluster.runtime, "ray_session", no_ray)
    monkeypatch.setattr(cluster.runtime, "start_embedded", no_ray)
    path = tmp_path / "job.yaml"
    if raw is not None:
        path.write_text(raw)
    else:
        job = yaml.safe_load(yaml.safe_dump(TINY))
        for key, value in edits.items():
            if value == "127.0.0.1:PORT" or (isinstance(value, str) and "PORT" in value):
                value = value.replace("PORT", str(free_port()))
            _edit(job, key, value)
        path.write_text(yaml.safe_dump(job, sort_keys=False))
    extra = ["--set", "data.pretrain.sources.9.weight=1"] if name == "bad --set path" else []
    code = cli.main(["run", str(path), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("stage.json"))


def test_more_gpus_than_the_cluster_has(ray_head, tmp_path):
    """The cluster is asked before anything starts: a job needing GPUs it lacks is one line, exit 2."""
    proc = relaygpt("run", REPO / "jobs" / "tiny-assistant.yaml", "--out", tmp_path / "out", "--address", ray_head.address,
                    "--set", "cluster.gpus_per_worker=1", "--set", "cluster.device_memory_gb=80", env=ray_head.env)
    assert_one_line_error(proc, "cluster.gpus_per_worker: the job needs 2 GPUs", "but the Ray cluster has 0")
    assert not list((tmp_path / "out").rglob("stage.json"))


def test_plan_reports_a_cluster_without_the_gpus(ray_head):
    proc = relaygpt("plan", REPO / "jobs" / "tiny-assistant.yaml", "--set", f"cluster.address={ray_head.address}",
                    "--set", "cluster.gpus_per_worker=1", env=ray_head.env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs 2 GPUs" in proc.stdout and "has 0" in proc.stdout, proc.stdout


def test_preflight_checks_the_run_directory_that_out_and_run_id_chose(tmp_path, monkeypatch, capsys, trained_tokenizer):
    """An eval-only job whose 'base' model lives in the run directory --out / --run-id name: plan and
    run look there, not in the job's default run directory."""
    from helpers import tiny_config
    from model.export import save_model_dir
    from model.gpt import GPT

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job that should have been refused")

    monkeypatch.setattr(cluster.runtime, "ray_session", no_ray)
    job = yaml.safe_load(yaml.safe_dump(TINY))
    del job["stages"]["pretrain"], job["stages"]["sft"]
    job["stages"]["eval"]["models"] = ["base"]
    job["output_dir"] = "runs"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    chosen = tmp_path / "elsewhere" / job["name"] / "r1"
    save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab)), trained_tokenizer, chosen / "pretrain" / "model")

    assert cli.main(["plan", str(path), "--out", str(tmp_path / "elsewhere"), "--run-id", "r1"]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and str(chosen) in out, out
    for command in ("plan", "run"):  # the same job without --out: its default run directory has no base model
        code = cli.main([command, str(path), "--run-id", "r1"])
        captured = capsys.readouterr()
        assert code == 2
        assert "stages.eval.models[0]: 'base' is the pretrain export, but the job has no pretrain stage" in captured.out + captured.err


def test_an_eval_task_without_its_data_fails_in_preflight_naming_the_task(tmp_path, capsys):
    """The eval stage's data is read before the first stage starts: a hub task offline, or a task
    file whose data file is missing, is refused by plan and run alike, nothing started."""
    job = yaml.safe_load(yaml.safe_dump(TINY))
    (tmp_path / "t.yaml").write_text("name: mine\nsource: {file: missing.jsonl}\nmetric: exact_match\n")
    job["stages"]["eval"]["tasks"] = ["synthetic", "arc_easy", str(tmp_path / "t.yaml")]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    for command in ("plan", "run"):
        code = cli.main([command, str(path), "--out", str(tmp_path / "out")])
        captured = capsys.readouterr()
        text = captured.out + captured.err
        assert code == 2, text
        assert "stages.eval.tasks[1]:" in text and "hub dataset 'allenai/ai2_arc' could not be loaded" in text, text
        assert "stages.eval.tasks[2]:" in text and "missing.jsonl does not exist" in text, text
        assert "stages.eval.tasks[0]" not in text
    assert not list((tmp_path / "out").rglob("stage.json"))


def test_extra_that_agrees_or_adds_is_accepted(tmp_path):
    from jobs.spec import load_job

    job = yaml.safe_load(yaml.safe_dump(TINY))
    job["stages"]["pretrain"]["deepspeed"]["extra"] = {"train_batch_size": 16, "zero_optimization": {"stage": 1, "overlap_comm": True}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    assert load_job(path).stages.pretrain.deepspeed.extra["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("assignment, needles", [
    ("stages.pretrain.micro_batch=abc", ["--set stages.pretrain.micro_batch=abc: stages.pretrain.micro_batch", "valid integer"]),
    ("stages.pretrain.micro_batch=true", ["--set stages.pretrain.micro_batch=true: stages.pretrain.micro_batch: expected a number"]),
    ("stages.sft.stpes=3", ["--set stages.sft.stpes=3: stages.sft.stpes: unknown key", "did you mean 'steps'"]),
    ("=5", ["--set '=5': expected KEY=VALUE"]),
    ("stages..steps=5", ["--set 'stages..steps=5': expected KEY=VALUE"]),
    ("stages.pretrain.steps", ["--set 'stages.pretrain.steps': expected KEY=VALUE"]),
])
def test_set_errors_name_the_set_argument_not_a_line_of_the_file(assignment, needles, capsys):
    code = cli.main(["plan", str(REPO / "jobs" / "tiny-assistant.yaml"), "--set", assignment])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and "\n" not in err, err
    assert "tiny-assistant.yaml:" not in err and "unknown key (top level)" not in err, err
    for needle in needles:
        assert needle in err, err


def test_an_init_model_that_contradicts_the_model_section_is_refused(tmp_path, capsys, trained_tokenizer):
    """The stage trains the init directory's architecture; a model: section the job writes must
    describe it. Without a model: section the directory's architecture is simply used."""
    from helpers import tiny_config
    from model.export import save_model_dir
    from model.gpt import GPT

    init = save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, n_layer=2, n_embd=64, block_size=128)), trained_tokenizer,
                          tmp_path / "init")
    job = yaml.safe_load(yaml.safe_dump(TINY))  # model: preset tiny (4 layers, 128 wide), block_size 128
    job["stages"]["pretrain"]["init"] = str(init)
    del job["stages"]["sft"], job["stages"]["eval"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    code = cli.main(["run", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert f"stages.pretrain.init: the model directory {init} has n_layer 2 (model: says 4), n_embd 64 (model: says 128)" in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("stage.json"))

    del job["model"]
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    assert cli.main(["plan", str(path), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr()
    assert "2 layers" in capsys.readouterr().out


def test_a_step_log_damaged_after_preflight_is_named_where_it_is_read(tmp_path):
    """A worker resuming reads metrics.jsonl (MetricsLog.records): a damaged line is a RelayError
    naming file:line and what to do, not a JSONDecodeError; a display following the log skips it."""
    from model.errors import RelayError
    from pipelines.rundir import MetricsLog

    path = tmp_path / "pretrain" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"step": 1}\n{oops\n' + b"[" * 5000 + b"\n")
    with pytest.raises(RelayError, match=r"metrics.jsonl:2: damaged .*--from-stage pretrain"):
        MetricsLog(path).records()
    assert MetricsLog(path).new_records() == [{"step": 1}]
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(RelayError, match="not UTF-8 at byte 12"):
        MetricsLog(path).records()


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_whose_package_is_not_installed_is_refused_before_launch(tmp_path, monkeypatch, capsys):
    """tracking.wandb without the wandb package (the `wandb` extra): one line, exit 2, before Ray."""
    monkeypatch.setattr(cluster.runtime, "ray_session", lambda *a, **k: pytest.fail("Ray started"))
    job = {**yaml.safe_load(yaml.safe_dump(TINY)), "tracking": {"wandb": {"mode": "offline", "project": "p"}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    code = cli.main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert "tracking.wandb: the wandb package is not installed; pip install 'relaygpt[wandb]'" in err, err
