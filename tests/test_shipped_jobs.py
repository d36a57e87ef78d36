"""Every shipped job file loads, validates and plans; the cluster configs are valid YAML."""

from pathlib import Path

import pytest
import yaml

from cluster.plan import plan_job
from jobs.spec import load_job

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if not p.name.startswith("sweep-"))


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_job_loads_and_plans(path):
    job = load_job(path)
    plans, problems = plan_job(job)
    assert problems == [], problems
    for plan in plans:
        assert plan.pp * plan.dp == job.cluster.num_workers
        spec = getattr(job.stages, plan.name)
        if spec.global_batch is not None:
            assert plan.global_batch == spec.global_batch


def test_the_expected_jobs_ship():
    names = {p.name for p in JOBS}
    assert {"tiny-assistant.yaml", "gpt2-124m.yaml", "gpt-1.3b-pp4.yaml", "gpt-6.7b-pp8-dp4.yaml"} <= names


def test_multi_node_jobs_use_pipeline_and_data_parallel():
    job = load_job(REPO / "jobs" / "gpt-6.7b-pp8-dp4.yaml")
    plan = plan_job(job)[0][0]
    assert (plan.pp, plan.dp) == (8, 4)
    # Each pipeline stage of the 6.7B model fits an 80 GB GPU; the whole model on one GPU does not.
    assert max(m.total for m in plan.memory) < 80 * 1024**3
    one = load_job(REPO / "jobs" / "gpt-6.7b-pp8-dp4.yaml", ["cluster.num_workers=1", "stages.pretrain.deepspeed.pipeline_stages=1",
                                                             "stages.pretrain.global_batch=null"])
    problems = plan_job(one)[1]
    assert problems and "pipeline stage 0 needs" in problems[0]


@pytest.mark.parametrize("name", ["gpu-cluster.yaml", "rayjob.yaml"])
def test_cluster_configs_parse(name):
    data = yaml.safe_load((REPO / "cluster" / "configs" / name).read_text())
    assert data
    if name == "rayjob.yaml":
        assert data["kind"] == "RayJob" and data["spec"]["entrypoint"].startswith("relaygpt run ")
    else:
        assert "head_start_ray_commands" in data and any("ray start --head" in c for c in data["head_start_ray_commands"])
