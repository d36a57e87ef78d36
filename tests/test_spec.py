"""Job-file checks on training stages: refused before any worker starts, the field named."""

import pytest
import yaml

from jobs.spec import JobError, load_job
from pipelines.train.engine import lr_multiplier
from pipelines.train.plan import deepspeed_config
from pipelines.train.settings import OptimizerSpec, TrainStageSpec


def job_file(tmp_path, stages, cluster=None):
    data = {"name": "s", "model": {"preset": "tiny", "n_layer": 4}, "tokenizer": {"encoding": "gpt2"},
            "data": {"pretrain": {"sources": [{"type": "synthetic"}]}, "sft": {"sources": [{"type": "synthetic"}]}},
            "stages": stages, "cluster": cluster or {"num_workers": 2}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize("stage, cluster, field, words", [
    ({"steps": 5, "deepspeed": {"pipeline_stages": 2, "zero_stage": 2}}, None,
     "stages.pretrain.deepspeed.zero_stage", "ZeRO-2 cannot be combined with pipeline_stages 2"),
    ({"steps": 5, "deepspeed": {"pipeline_stages": 2, "zero_stage": 3}}, None,
     "stages.pretrain.deepspeed.zero_stage", "ZeRO-3 cannot be combined"),
    ({"steps": 5, "deepspeed": {"pipeline_stages": 8}}, {"num_workers": 8},
     "stages.pretrain.deepspeed.pipeline_stages", "8 stages but the model has 4 layers"),
    ({"steps": 5, "micro_batch": 4, "grad_accum": 2, "global_batch": 12}, None,
     "stages.pretrain.global_batch", "12 != micro_batch 4 x grad_accum 2 x data-parallel 2 = 16"),
    ({"steps": 5, "deepspeed": {"pipeline_stages": 2}}, {"num_workers": 3},
     "cluster.num_workers", "3 workers is not a multiple of stages.pretrain.deepspeed.pipeline_stages (2)"),
    ({"steps": 5, "tokens": 100}, None, "stages.pretrain", "exactly one of steps, tokens"),
    ({"steps": 5, "seq_len": 4096}, None, "stages.pretrain.seq_len", "exceeds the model's block_size 256"),
    ({"steps": 5, "deepspeed": {"zero_stage": 4}}, None, "stages.pretrain.deepspeed.zero_stage", "Input should be 0, 1, 2 or 3"),
    # settings that would be accepted and do nothing
    ({"steps": 5, "deepspeed": {"zero_stage": 0, "offload_optimizer": True}}, None,
     "stages.pretrain.deepspeed.offload_optimizer", "offloading needs a ZeRO optimizer (zero_stage 1, 2 or 3)"),
    ({"steps": 5, "deepspeed": {"partition_method": "uniform"}}, None,
     "stages.pretrain.deepspeed.partition_method", "applies to pipeline_stages > 1"),
    ({"steps": 5, "deepspeed": {"precision": "fp16"}}, None,
     "stages.pretrain.deepspeed.precision", "fp16 (with loss scaling) runs on GPUs only"),
    ({"steps": 5}, {"num_workers": 2, "device_memory_gb": 80}, "cluster.device_memory_gb", "the workers have no GPU"),
    ({"steps": 5, "deepspeed": {"pipeline_stages": 2, "partition_method": "balanced"}}, None,
     "stages.pretrain.deepspeed.partition_method", "Input should be 'compute', 'type:BlockPipe', 'parameters' or 'uniform'"),
])
def test_bad_stage_settings_name_the_field(tmp_path, stage, cluster, field, words):
    with pytest.raises(JobError) as info:
        load_job(job_file(tmp_path, {"pretrain": stage}, cluster))
    message = str(info.value)
    assert f"{field}: " in message and words in message, message
    assert "job.yaml:" in message


def test_a_good_stage_renders_the_deepspeed_config(tmp_path):
    job = load_job(job_file(tmp_path, {"pretrain": {"steps": 5, "micro_batch": 4, "grad_accum": 2, "global_batch": 16,
                                                    "deepspeed": {"zero_stage": 2, "offload_optimizer": True,
                                                                  "extra": {"zero_optimization": {"overlap_comm": True}}}}}))
    stage = job.stages.pretrain
    config = deepspeed_config(stage, 2, "bf16", "cpu")
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 4
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": False}, "overlap_comm": True}
    # Offloaded, DeepSpeed steps (and clips) on the host; bf16 has no loss scale to skip steps for.
    assert config["bf16"] == {"enabled": True, "check_grad_overflow": False} and config["gradient_clipping"] == 1.0


@pytest.mark.parametrize("schedule, at_end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_learning_rate_schedules(schedule, at_end):
    fn = lr_multiplier(OptimizerSpec(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1), total_steps=20)
    assert [fn(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert fn(4) == pytest.approx(1.0) and fn(20) == pytest.approx(at_end)
    # A quarter of the way through the decay (step 8 of 4..20) the shapes differ: cosine has
    # fallen by (1 - cos(pi/4)) / 2 of its span, linear by a quarter, constant not at all.
    quarter = {"cosine": 0.1 + 0.9 * 0.5 * (1 + 2**-0.5), "linear": 0.1 + 0.9 * 0.75, "constant": 1.0}
    assert fn(8) == pytest.approx(quarter[schedule])


def test_a_stage_without_zero_in_fp32_clips_in_the_optimizer(tmp_path):
    """DeepSpeed would clip without reporting the norm: the plan moves clipping into the engine."""
    stage = load_job(job_file(tmp_path, {"pretrain": {"steps": 5, "deepspeed": {"zero_stage": 0}}})).stages.pretrain
    assert deepspeed_config(stage, 2, "fp32", "cpu")["gradient_clipping"] == 0.0
    assert deepspeed_config(stage, 2, "bf16", "cpu")["gradient_clipping"] == 1.0


def test_a_tokens_budget_becomes_whole_steps():
    from pipelines.train.plan import total_steps

    stage = TrainStageSpec(tokens=10_000)
    assert stage.steps is None
    assert total_steps(stage, 4096) == 3 and total_steps(stage, 5000) == 2 and total_steps(stage, 10_001) == 1


def test_the_default_partition_balances_compute_with_the_head_counted(tmp_path):
    """4 blocks of GPT-2 width and the 50k GPT-2 vocabulary on 2 stages: the LM head and the loss
    weigh about as much as all four blocks, so the last stage gets fewer blocks (here none) and the
    stages' FLOPs end up within 25 %. Equal blocks per stage (type:BlockPipe) leave them 3x apart."""
    from jobs.plan import resolve_plan
    from pipelines.rundir import RunDir
    from pipelines.train.memory import stage_memory

    stages = {"pretrain": {"steps": 5, "deepspeed": {"pipeline_stages": 2, "zero_stage": 1}}}
    path = job_file(tmp_path, stages)
    text = path.read_text().replace("n_layer: 4", "n_layer: 4\n  n_embd: 768\n  n_head: 12\n  block_size: 1024")
    path.write_text(text)
    plan = resolve_plan(load_job(path), RunDir(tmp_path / "run")).stage("pretrain")
    balanced = stage_memory(plan)
    assert [m.layers for m in balanced] == ["0-3", "-"]
    flops = [m.flops_per_step for m in balanced]
    assert max(flops) / min(flops) < 1.25, flops
    even = stage_memory(resolve_plan(load_job(path, ["stages.pretrain.deepspeed.partition_method=type:BlockPipe"]),
                                     RunDir(tmp_path / "run")).stage("pretrain"))
    assert [m.layers for m in even] == ["0-1", "2-3"]
    flops = [m.flops_per_step for m in even]
    assert max(flops) / min(flops) > 3, flops


def test_zero_buckets_are_never_larger_than_the_stage_and_the_planner_counts_them(tmp_path):
    """DeepSpeed allocates its gradient bucket whole (5e8 elements: 1.9 GiB in fp32) even for a
    model a fraction of that size: the plan caps it at the largest stage's parameters, an
    explicit deepspeed.extra value wins, and the memory model counts whichever is configured."""
    from jobs.plan import resolve_plan
    from pipelines.rundir import RunDir
    from pipelines.train.memory import stage_memory

    path = job_file(tmp_path, {"pretrain": {"steps": 5, "deepspeed": {"zero_stage": 3}}})
    plan = resolve_plan(load_job(path), RunDir(tmp_path / "run")).stage("pretrain")
    params = plan.model.num_params()
    zero = plan.deepspeed_config["zero_optimization"]
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == params == zero["stage3_prefetch_bucket_size"]
    memory = stage_memory(plan)[0]
    # the bucket (fp32 gradients) plus the weights ZeRO-3 gathers for compute (all of them: fewer than max_live)
    assert memory.buffers == params * 4 + params * 4
    explicit = ["stages.pretrain.deepspeed.extra={zero_optimization: {reduce_bucket_size: 1000, stage3_max_live_parameters: 2000}}"]
    plan = resolve_plan(load_job(path, explicit), RunDir(tmp_path / "run")).stage("pretrain")
    assert plan.deepspeed_config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert stage_memory(plan)[0].buffers == 1000 * 4 + 2000 * 4
    without_zero = resolve_plan(load_job(path, ["stages.pretrain.deepspeed.zero_stage=0"]), RunDir(tmp_path / "run")).stage("pretrain")
    assert "reduce_bucket_size" not in without_zero.deepspeed_config["zero_optimization"]


def test_the_pipeline_cut_moves_to_fit_a_stated_gpu_memory(tmp_path):
    """The compute cut of a 4-block model with the GPT-2 vocabulary at pp 2 puts every block on
    stage 0 (the head weighs as much). With a device memory that stage 0 of that cut exceeds,
    the plan takes the most balanced cut in which both stages fit, and says so; with a memory
    no cut fits, the compute cut stays and the fit check names the stage."""
    from cluster.preflight import check, format_plan
    from jobs.plan import resolve_plan
    from pipelines.rundir import RunDir
    from pipelines.train.memory import stage_memory

    path = job_file(tmp_path, {"pretrain": {"steps": 5, "micro_batch": 1, "grad_accum": 8,
                                            "deepspeed": {"pipeline_stages": 2, "zero_stage": 1}}})
    path.write_text(path.read_text().replace("n_layer: 4", "n_layer: 4\n  n_embd: 768\n  n_head: 12\n  block_size: 1024"))
    gpus = ["cluster.gpus_per_worker=1"]
    free = resolve_plan(load_job(path, gpus), RunDir(tmp_path / "run")).stage("pretrain")
    compute = stage_memory(free)
    assert [m.layers for m in compute] == ["0-3", "-"] and not free.partition_note
    assert compute[0].total > compute[1].total  # stage 0 binds: its blocks and their in-flight activations
    budget_gb = (compute[0].total - 1) / 1024**3
    bound = resolve_plan(load_job(path, gpus + [f"cluster.device_memory_gb={budget_gb}"]), RunDir(tmp_path / "run")).stage("pretrain")
    moved = stage_memory(bound)
    assert [m.layers for m in moved] != ["0-3", "-"] and "most balanced cut that fits" in bound.partition_note
    assert max(m.total for m in moved) <= budget_gb * 1024**3
    assert bound.deepspeed_config["zero_optimization"]["reduce_bucket_size"] == max(m.params for m in moved)
    tiny = load_job(path, gpus + ["cluster.device_memory_gb=0.01"])
    stuck = resolve_plan(tiny, RunDir(tmp_path / "run")).stage("pretrain")
    assert list(stuck.stage_layers) == list(free.stage_layers) and not stuck.partition_note
    run, problems = check(tiny, RunDir(tmp_path / "run"))
    assert any("pipeline stage 0 needs" in p for p in problems), problems
    job = load_job(path, gpus + [f"cluster.device_memory_gb={budget_gb}"])
    assert "pipeline cut: the compute-balanced cut puts stage 0 over" in format_plan(job, resolve_plan(job, RunDir(tmp_path / "run")), [])
