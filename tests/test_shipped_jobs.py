"""Every shipped job file and sweep point loads, validates and resolves to the plan its numbers
imply (checked against arithmetic done by hand); the cluster configs are valid YAML."""

from pathlib import Path

import pytest
import yaml

from cluster.plan import check
from jobs.spec import load_job
from pipelines.rundir import RunDir
from pipelines.train.memory import stage_memory

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if not p.name.startswith("sweep-"))

# Real tokenizers: the encoding's ids plus relaygpt's four chat tokens (system, user, assistant,
# end of turn); a tokenizer still to be trained counts its target size until it exists.
GPT2_IDS, CL100K_IDS = 50257 + 4, 100277 + 4

# job -> stage -> (vocab, world, pipeline, data-parallel, micro, accum, global batch, seq_len, tokens/step, steps, precision, device)
EXPECTED = {
    "tiny-assistant.yaml": {
        "pretrain": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 1000, "fp32", "cpu"),
        "sft": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 150, "fp32", "cpu")},
    "gpt2-124m.yaml": {  # 2e9 tokens / (512 x 1024) = 3814.7 -> 3815 steps
        "pretrain": (GPT2_IDS, 8, 1, 8, 32, 2, 512, 1024, 524288, 3815, "bf16", "cuda"),
        "sft": (GPT2_IDS, 8, 1, 8, 16, 1, 128, 1024, 131072, 1000, "bf16", "cuda")},
    "gpt-1.3b-pp4.yaml": {  # 26e9 / (256 x 2048) = 49591.1 -> 49592
        "pretrain": (CL100K_IDS, 8, 4, 2, 4, 32, 256, 2048, 524288, 49592, "bf16", "cuda")},
    "gpt-6.7b-pp8-dp4.yaml": {  # 1e11 / (512 x 2048) = 95367.4 -> 95368
        "pretrain": (CL100K_IDS, 32, 8, 4, 2, 64, 512, 2048, 1048576, 95368, "bf16", "cuda")},
    "gpt-6.7b-tp8-dp4.yaml": {  # tensor 8 x data 4; the same batch arithmetic as the pipeline version
        "pretrain": (CL100K_IDS, 32, 1, 4, 2, 64, 512, 2048, 1048576, 95368, "bf16", "cuda")},
    "gpt-13b-tp8-pp2.yaml": {  # tensor 8 x pipe 2 x data 2; 2.6e11 / (512 x 2048) = 247955.1 -> 247956
        "pretrain": (CL100K_IDS, 32, 2, 2, 2, 128, 512, 2048, 1048576, 247956, "bf16", "cuda")},
}


def _numbers(run, plan) -> tuple:
    return (plan.model.vocab_size, plan.world_size, plan.pipeline_stages, plan.data_parallel, plan.micro_batch, plan.grad_accum,
            plan.global_batch, plan.seq_len, plan.tokens_per_step, plan.total_steps, plan.precision, plan.device)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_job_resolves_to_the_hand_computed_plan(path, tmp_path):
    job = load_job(path)
    run, problems = check(job, RunDir(tmp_path / "run"))
    # Offline (as tests run), the only problems are eval tasks whose data lives on the hub:
    # preflight reads every task's data before anything starts.
    hub = [p for p in problems if p.startswith("stages.eval.tasks[") and "could not be loaded" in p]
    assert problems == hub, problems
    assert len(hub) == len([t for t in (job.stages.eval.tasks if job.stages.eval else []) if t != "synthetic"])
    assert {stage: _numbers(run, plan) for stage, plan in run.training.items()} == EXPECTED[path.name]
    for plan in run.training.values():
        assert plan.deepspeed_config["train_batch_size"] == plan.global_batch
        assert plan.deepspeed_config["gradient_accumulation_steps"] == plan.grad_accum
        assert plan.data_dir == run.run_dir.data(plan.stage) and plan.data_dir.is_absolute()
    assert run.vocab_exact == (job.tokenizer.train is None)


def test_sft_starts_from_the_pretrain_export_of_the_same_run(tmp_path):
    run = check(load_job(REPO / "jobs" / "tiny-assistant.yaml"), RunDir(tmp_path / "run"))[0]
    assert run.stage("sft").init_model == (tmp_path / "run" / "pretrain" / "model").resolve()
    assert run.stage("pretrain").init_model is None and run.stage("sft").model == run.stage("pretrain").model


def test_the_expected_jobs_ship():
    names = {p.name for p in JOBS}
    assert {"tiny-assistant.yaml", "gpt2-124m.yaml", "gpt-1.3b-pp4.yaml", "gpt-6.7b-pp8-dp4.yaml"} <= names


def test_multi_node_jobs_use_pipeline_and_data_parallel(tmp_path):
    job = load_job(REPO / "jobs" / "gpt-6.7b-pp8-dp4.yaml")
    plan = check(job, RunDir(tmp_path / "a"))[0].stage("pretrain")
    assert (plan.pipeline_stages, plan.data_parallel) == (8, 4)
    # Each pipeline stage of the 6.7B model fits an 80 GB GPU; the whole model on one GPU does not.
    assert max(m.total for m in stage_memory(plan)) < 80 * 1024**3
    one = load_job(REPO / "jobs" / "gpt-6.7b-pp8-dp4.yaml", ["cluster.num_workers=1", "stages.pretrain.deepspeed.pipeline_stages=1",
                                                             "stages.pretrain.global_batch=null"])
    problems = check(one, RunDir(tmp_path / "b"))[1]
    assert problems and "pipeline stage 0 needs" in problems[0]


def test_the_large_jobs_split_layers_within_a_node(tmp_path):
    """6.7B and 13B: tensor parallel 8 (one 8-GPU node per tensor group), every rank of every stage
    within an 80 GB GPU; and the 13B model on its 2 pipeline stages without tensor parallelism does not."""
    for name, pp in (("gpt-6.7b-tp8-dp4.yaml", 1), ("gpt-13b-tp8-pp2.yaml", 2)):
        plan = check(load_job(REPO / "jobs" / name), RunDir(tmp_path / name))[0].stage("pretrain")
        assert (plan.tensor_parallel, plan.pipeline_stages) == (8, pp)
        assert max(m.total for m in stage_memory(plan)) < 80 * 1024**3
        assert any(note.startswith("tensor parallel 8") for note in plan.engine_notes)
    whole = load_job(REPO / "jobs" / "gpt-13b-tp8-pp2.yaml", ["cluster.num_workers=2", "stages.pretrain.deepspeed.tensor_parallel=1",
                                                             "stages.pretrain.global_batch=null"])
    problems = check(whole, RunDir(tmp_path / "whole"))[1]
    assert problems and "needs ~" in problems[0]


def _sweep_points(name: str):
    from jobs.sweep import expand_points, load_sweep

    return expand_points(load_sweep(REPO / "jobs" / name))


def test_cpu_demo_sweep_points_resolve_by_hand(tmp_path):
    """workers x pipeline x micro: data-parallel = workers / pipeline, global = micro x dp (grad_accum 1),
    128-token windows, 2 warm-up + 6 timed steps; one worker cannot hold two pipeline stages."""
    expected = {  # (workers, pp, micro) -> (dp, global batch, tokens per step)
        (1, 1, 4): (1, 4, 512), (1, 1, 8): (1, 8, 1024),
        (2, 1, 4): (2, 8, 1024), (2, 1, 8): (2, 16, 2048),
        (2, 2, 4): (1, 4, 512), (2, 2, 8): (1, 8, 1024),
    }
    seen = {}
    for point in _sweep_points("sweep-cpu-demo.yaml"):
        key = (point.axes["workers"], point.axes["pipeline_stages"], point.axes["micro_batch"])
        if point.job is None:
            assert key[:2] == (1, 2) and "not a multiple" in point.reason
            continue
        plan = check(point.job, RunDir(tmp_path / point.id))[0].stage("pretrain")
        seen[key] = (plan.data_parallel, plan.global_batch, plan.tokens_per_step)
        assert plan.total_steps == 8 and plan.seq_len == 128 and plan.model.vocab_size == 1024
    assert seen == expected


def test_gpu_scaling_sweep_keeps_the_global_batch(tmp_path):
    """Strong scaling at 128 sequences of 1024 tokens: grad_accum = 128 / (micro x dp) wherever that divides."""
    measured = 0
    for point in _sweep_points("sweep-gpu-scaling.yaml"):
        if point.job is None:
            continue
        plan = check(point.job, RunDir(tmp_path / point.id))[0].stage("pretrain")
        workers, pp, micro = point.axes["workers"], point.axes["pipeline_stages"], point.axes["micro_batch"]
        assert (plan.world_size, plan.data_parallel) == (workers, workers // pp)
        assert plan.grad_accum == 128 // (micro * (workers // pp))
        assert (plan.global_batch, plan.tokens_per_step, plan.total_steps) == (128, 131072, 50)
        assert plan.model.n_layer == 24 and plan.model.vocab_size == GPT2_IDS  # gpt2-350m
        measured += 1
    assert measured > 0


def test_model_size_sweep_holds_the_token_budget(tmp_path):
    """1e8 tokens in steps of 8 x 4 x 8 sequences of 1024: 1e8 / 262144 = 381.5 -> 382 steps at every size."""
    layers = {"tiny": 4, "small": 6, "gpt2-124m": 12, "gpt2-350m": 24, "gpt2-774m": 36, "1.3b": 24}
    for point in _sweep_points("sweep-model-size.yaml"):
        plan = check(point.job, RunDir(tmp_path / point.id))[0].stage("pretrain")
        assert (plan.global_batch, plan.seq_len, plan.tokens_per_step, plan.total_steps) == (256, 1024, 262144, 382)
        assert plan.model.n_layer == layers[point.axes["preset"]] and plan.model.block_size == 1024


@pytest.mark.parametrize("name", ["gpu-cluster.yaml", "rayjob.yaml"])
def test_cluster_configs_parse(name):
    data = yaml.safe_load((REPO / "cluster" / "configs" / name).read_text())
    assert data
    if name == "rayjob.yaml":
        assert data["kind"] == "RayJob" and data["spec"]["entrypoint"].startswith("relaygpt run ")
    else:
        assert "head_start_ray_commands" in data and any("ray start --head" in c for c in data["head_start_ray_commands"])


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_the_resolved_job_loads_again_unchanged(path, tmp_path):
    """What a run records as job.yaml (and `submit` sends to the cluster) is a valid job: every
    default written out must not trip a check meant for settings a user chose."""
    job = load_job(path)
    again = tmp_path / path.name
    again.write_text(yaml.safe_dump(job.resolved_dict(), sort_keys=False))
    assert load_job(again).resolved_dict() == job.resolved_dict()
