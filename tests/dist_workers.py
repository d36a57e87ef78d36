"""Functions that run inside the processes of tests/distributed.py (importable by spawn)."""

from __future__ import annotations


def pipeline_losses(config_kwargs: dict, stage_counts: list[int], batch_seed: int) -> dict:
    """Loss of one batch through a DeepSpeed PipelineModule for each number of stages."""
    import deepspeed
    import torch

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.pipe import build_pipeline, load_gpt_state

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = GPTConfig(**config_kwargs)
    torch.manual_seed(0)
    reference = GPT(config)
    g = torch.Generator().manual_seed(batch_seed)
    x = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    y = torch.randint(0, config.vocab_size, (4, 24), generator=g)
    out = {}
    for stages in stage_counts:
        pipe = build_pipeline(config, stages)
        load_gpt_state(pipe, config, reference.state_dict())
        # Every data-parallel rank gets the whole batch, so each computes the full-batch loss;
        # with 2 stages, eval_batch broadcasts the last stage's loss to the first.
        engine, *_ = deepspeed.initialize(model=pipe, config={
            "train_micro_batch_size_per_gpu": 4,
            "gradient_accumulation_steps": 1,
            "steps_per_print": 10**9,
        })
        out[stages] = float(engine.eval_batch(iter([(x, y)])))
    return out


def train_and_record(job_path: str, overrides: list, stage: str, run_dir: str, until_step=None) -> dict:
    """Run one training stage; rank 0 returns the loss of every step it logged."""
    from jobs.spec import load_job
    from pipelines.train import train_stage

    job = load_job(job_path, overrides)
    seen = []
    result = train_stage(job, stage, run_dir, report=lambda m: seen.append(dict(m)), until_step=until_step)
    losses = {m["step"]: m["train/loss"] for m in seen if "train/loss" in m}
    return {"losses": losses, "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))}}
