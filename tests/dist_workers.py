"""Functions that run inside the processes of tests/distributed.py (importable by spawn)."""

from __future__ import annotations

from pathlib import Path


def pipeline_losses(config_kwargs: dict, stage_counts: list[int], batch_seed: int) -> dict:
    """Loss of one batch through a DeepSpeed PipelineModule for each number of stages."""
    import deepspeed
    import torch

    from model.config import GPTConfig
    from model.gpt import GPT
    from model.pipe import build_pipeline, load_gpt_state
    from pipelines.train.distributed import init_distributed

    init_distributed()  # as training workers do: no JIT build of DeepSpeed's shm op, whose lock a killed process can leave behind
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


def pipeline_layout(config_kwargs: dict, num_stages: int, partition_method: str) -> dict:
    """What this rank's PipelineModule holds: DeepSpeed's parts and its own parameter names."""
    from model.config import GPTConfig
    from model.pipe import build_pipeline
    from pipelines.train.distributed import init_distributed

    init_distributed()  # as training workers do: no JIT build of DeepSpeed's shm op, whose lock a killed process can leave behind
    pipe = build_pipeline(GPTConfig(**config_kwargs), num_stages, partition_method=partition_method)
    return {"parts": list(pipe.parts), "params": sorted(name for name, _ in pipe.named_parameters())}


def build_memory(config_kwargs: dict, zero_stage: int) -> dict:
    """Peak resident memory this rank adds while the engine's model is built (ZeRO-3: under
    zero.Init, sharded; otherwise the whole model), in bytes, and the parameters it then holds."""
    import resource

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed

    init_distributed()
    config = GPTConfig(**config_kwargs)
    plan = _plan(config, {"steps": 1, "deepspeed": {"zero_stage": zero_stage}})
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    if zero_stage == 3:
        from pipelines.train.engine import build_sharded

        module = build_sharded(plan, None)
        held = sum(p.ds_tensor.numel() for p in module.parameters())
    else:
        from model.gpt import GPT
        from model.pipe import init_like_pipeline

        module = init_like_pipeline(GPT(config), plan.seed)
        held = sum(p.numel() for p in module.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"increase": peak - before, "held": held, "total": config.num_params()}


def init_build_memory(init_dir: str, zero_stage: int) -> dict:
    """Peak resident memory this rank adds while building a model that starts from a model
    directory (as SFT does): under ZeRO-3 sharded from the lazily read file, otherwise whole.
    Under ZeRO-3 the weights are then gathered and compared with the file's, bit for bit."""
    from model.export import open_model_weights
    from pipelines.train.distributed import init_distributed
    from pipelines.train.initial import initial_state

    init_distributed()
    config, tokenizer, _ = open_model_weights(init_dir)
    plan = _plan(config, {"steps": 1, "deepspeed": {"zero_stage": zero_stage}}, init_model=Path(init_dir))
    before = _restart_peak()
    state = initial_state(plan, tokenizer)
    if zero_stage == 3:
        from pipelines.train.engine import build_sharded

        module = build_sharded(plan, state)
    else:
        from model.gpt import GPT

        module = GPT(config, initialize=False)
        module.load_state_dict(state, strict=True)
    increase = _proc_status("VmHWM") - before
    shard = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in module.parameters()) if zero_stage == 3 else None
    same = True
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            same = all(torch_equal(p.data, state[name]) for name, p in module.named_parameters())
    largest = max(v.numel() * v.element_size() for v in (state[k] for k in state))
    return {"increase": increase, "shard": shard, "largest": largest, "same": same}


def torch_equal(a, b) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.equal(a, b))


def _plan(config, stage_kwargs: dict, init_model=None):
    """A TrainPlan for `config` on the current process group, without a job file."""
    import torch

    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    return plan_training("pretrain", TrainStageSpec(**stage_kwargs), config, world_size=torch.distributed.get_world_size(),
                         seq_len=config.block_size, device="cpu", data_dir=Path("."), init_model=init_model, seed=0)


def _random_batches(plan, document_length: int | None = None):
    """Endless (x, y) micro-batches of random tokens, different on every rank; with
    `document_length`, ((x, document ids), y) of rows packed with documents that long."""
    import torch

    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    while True:
        x = torch.randint(0, plan.model.vocab_size, (plan.micro_batch, plan.seq_len), generator=g)
        if document_length is None:
            yield x, torch.roll(x, -1, dims=1)
        else:
            document_ids = (torch.arange(plan.seq_len) // document_length).expand(plan.micro_batch, -1)
            yield (x, document_ids), torch.roll(x, -1, dims=1)


def _restart_peak() -> int:
    """Restart the peak (VmHWM) from the current resident size; returns that size in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status("VmRSS")


def _proc_status(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def export_layout(init_dir: str, pipeline_stages: int, zero_stage: int, out_dir: str) -> dict:
    """Load a model directory into the engine of a layout and export it again (streamed); the
    peak resident memory the export added on this rank, and the largest tensor, in bytes."""
    import gc

    from model.export import load_model_dir
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine
    from pipelines.train.trainer import export_model

    init_distributed()
    model, tokenizer, _ = load_model_dir(init_dir)
    plan = _plan(model.config, {"steps": 1, "micro_batch": 1, "deepspeed": {"pipeline_stages": pipeline_stages, "zero_stage": zero_stage}},
                 init_model=Path(init_dir))
    largest = max(p.numel() * 4 for p in model.parameters())
    engine = Engine(plan, init_state={k: v.clone() for k, v in model.state_dict().items()})
    del model
    gc.collect()
    before = _restart_peak()
    export_model(engine, tokenizer, Path(out_dir), provenance={})
    return {"increase": _proc_status("VmHWM") - before, "largest": largest}


def training_memory(config_kwargs: dict, stage_kwargs: dict, steps: int) -> dict:
    """What a rank adds from building the engine through `steps` optimizer steps, next to what
    the planner (pipelines/train/memory.py) estimates for that rank's stage, in bytes:
    `allocated`, the peak of live tensor bytes (the CPU counterpart of
    torch.cuda.max_memory_allocated, from the profiler's allocation records), and `resident`,
    the peak resident growth of the process (allocator slack and libraries included)."""
    import torch

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine
    from pipelines.train.memory import stage_memory

    torch.set_num_threads(1)
    init_distributed()
    plan = _plan(GPTConfig(**config_kwargs), {**stage_kwargs, "steps": steps})
    torch.distributed.barrier()
    before = _restart_peak()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        engine = Engine(plan, init_state=None)
        it = _random_batches(plan)
        for _ in range(steps):
            engine.train_step(it)
    resident = _proc_status("VmHWM") - before
    planned = stage_memory(plan)[engine.topology.stage_id]
    return {"allocated": _allocation_peak(prof), "resident": resident, "planned": planned.total,
            "terms": {k: getattr(planned, k) for k in ("weights", "gradients", "optimizer", "buffers", "activations", "logits")}}


def _allocation_peak(prof) -> int:
    """The most tensor bytes alive at once among those allocated while `prof` recorded (the
    profiler's running total of CPU allocations, read from its trace)."""
    import json
    import os
    import tempfile

    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and "Total Allocated" in e.get("args", {}))


def train_and_record(job_path: str, overrides: list, stage: str, run_dir: str, until_step=None) -> dict:
    """Resolve the job's plan (as the driver does) and run one training stage; rank 0 returns the
    loss of every step this call logged."""
    from jobs.plan import resolve_plan
    from jobs.spec import load_job
    from pipelines.rundir import RunDir
    from pipelines.train.entry import train_stage

    job = load_job(job_path, overrides)
    run = resolve_plan(job, RunDir(run_dir))
    import time

    log = run.run_dir.stage(stage).metrics
    started = time.time()  # this call's records (a resume rewrites the log: indices would shift)
    result = train_stage(run, stage, until_step=until_step)
    losses = {m["step"]: m["train/loss"] for m in log.records() if "train/loss" in m and m["time"] >= started}
    return {"losses": losses, "result": {k: v for k, v in result.items() if isinstance(v, (int, float, str))}}


def train_layouts(job_path: str, runs: list[tuple], stage: str) -> list[dict]:
    """`train_and_record` for each (overrides, run directory, until_step) in turn, in the same
    processes (one start-up for all; a run directory named again resumes)."""
    results = []
    for overrides, run_dir, until in runs:
        results.append(train_and_record(job_path, overrides, stage, run_dir, until))
        # A pipeline engine leaves its grid as DeepSpeed's global model-parallel unit, which a later
        # engine in the same process would take for its own: forget it (a new stage is a new process).
        from deepspeed.utils import groups

        groups.mpu = None
    return results


def engine_throughput(config_kwargs: dict, stage_kwargs: dict, steps: int, warmup: int, threads: int,
                      document_length: int | None = None) -> dict:
    """Seconds per optimizer step of the relaygpt Engine on this process group (rank 0 reports);
    with `document_length`, on rows whose documents are kept apart (see `_random_batches`)."""
    import time

    import torch

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine

    torch.set_num_threads(threads)
    init_distributed()
    plan = _plan(GPTConfig(**config_kwargs), {**stage_kwargs, "steps": steps + warmup})
    engine = Engine(plan, init_state=None)
    it = _random_batches(plan, document_length)
    warm_start = time.perf_counter()
    for _ in range(warmup):
        engine.train_step(it)
    warmup_s = time.perf_counter() - warm_start
    torch.distributed.barrier()
    resident = _restart_peak()  # what the timed steps add
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = engine.read(engine.train_step(it))["loss"]
    busy = time.process_time() - cpu_start  # CPU time of this rank: its compute, not its waiting
    torch.distributed.barrier()
    return {"step_s": (time.perf_counter() - start) / steps, "busy_s": busy / steps, "loss": loss,
            "step_peak_bytes": _proc_status("VmHWM") - resident, "warmup_s": warmup_s}


def plain_loop_throughput(config_kwargs: dict, micro_batch: int, steps: int, warmup: int, threads: int) -> dict:
    """Seconds per step of a plain PyTorch loop: GPT, AdamW groups, clipping — the engine's peer."""
    import time

    import torch

    from model.config import GPTConfig
    from model.gpt import GPT
    from pipelines.train.engine import param_groups

    torch.set_num_threads(threads)
    config = GPTConfig(**config_kwargs)
    torch.manual_seed(0)
    model = GPT(config).train()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.1), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(0)

    def step():
        x = torch.randint(0, config.vocab_size, (micro_batch, config.block_size), generator=g)
        _, loss = model(x, labels=torch.roll(x, -1, dims=1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    return {"step_s": (time.perf_counter() - start) / steps, "loss": loss}


def packed_document_losses(configs: list[dict], layouts: list[dict], steps: int, document_end: int) -> list[list[dict]]:
    """For each model config, for each layout (DeepSpeed settings) in turn: losses of `steps`
    optimizer steps on packed rows whose documents are kept apart, then one evaluation loss; every
    rank reads the same batches, so every layout trains on the same data whatever its data-parallel size."""
    import numpy as np

    from model.config import GPTConfig
    from pipelines.data.loader import BatchLoader, TokenWindows, eval_batches
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine

    init_distributed()
    rng = np.random.default_rng(5)
    stream = rng.integers(0, document_end, 4000)
    stream[rng.random(4000) < 0.08] = document_end  # documents of about a dozen tokens
    out = [[] for _ in configs]
    for deepspeed in layouts:  # outermost: a process takes no plain engine after a pipeline one
        for kwargs, results in zip(configs, out):
            config = GPTConfig(**kwargs)
            windows = TokenWindows(stream, config.block_size, document_end)
            plan = _plan(config, {"steps": steps, "micro_batch": 2, "grad_accum": 2, "deepspeed": deepspeed})
            engine = Engine(plan, init_state=None)
            batches = BatchLoader(windows, plan.micro_batch, seed=1)  # data-parallel rank 0 on every rank
            losses = [engine.read(engine.train_step(batches))["loss"] for _ in range(steps)]
            inputs, y = next(eval_batches(windows, plan.micro_batch))
            results.append({"train": losses, "eval": engine.micro_batch_loss(inputs, y)})
    return out


DEVICE_READS = ("item", "cpu", "tolist", "__float__", "__int__", "__bool__", "__index__")


def reads_while_training(job_path: str, overrides: list, run_dir: str, warmup: int, steps: int) -> dict:
    """Train `warmup` then `steps` steps of the job's pretrain stage through the real Trainer loop,
    counting in the last `steps` every read of a tensor's value on the host (`DEVICE_READS`: what
    would wait for a GPU) by where it happened; evaluation, checkpoints and the export are left
    out (they are not steps), and so are the first steps, where ZeRO-3 records its fetch order."""
    import collections
    import traceback

    import torch

    from jobs.plan import resolve_plan
    from jobs.spec import load_job
    from pipelines.rundir import RunDir
    from pipelines.train.trainer import Trainer

    run = resolve_plan(load_job(job_path, overrides), RunDir(run_dir))
    trainer = Trainer(run, "pretrain", console=False)
    trainer.build()
    trainer.resume()
    trainer.maybe_evaluate = lambda: {}
    trainer.maybe_checkpoint = lambda stop_at: None
    trainer.finish = lambda: {}
    counts, originals = collections.Counter(), {}

    def counting(name):
        original = originals[name] = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if trainer.state.step >= warmup:
                frame = traceback.extract_stack(limit=2)[0]
                counts[f"{name} {Path(frame.filename).name}:{frame.lineno}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in DEVICE_READS:
        setattr(torch.Tensor, name, counting(name))
    try:
        trainer.fit(until_step=warmup + steps)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return {"reads": dict(counts), "notes": trainer.plan.engine_notes}


def clipped_losses(config_kwargs: dict, stage_kwargs: dict, steps: int, clip_by: list[str]) -> dict:
    """Losses of `steps` steps on random batches, with the gradients clipped by the engine (as
    planned), by DeepSpeed, or not at all: one engine after another in the same process group,
    keyed by `clip_by` (planned | deepspeed | none)."""
    from dataclasses import replace

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine

    init_distributed()
    results = {}
    for how in clip_by:
        plan = _plan(GPTConfig(**config_kwargs), {**stage_kwargs, "steps": steps})
        if how != "planned":
            clip = plan.settings.optimizer.grad_clip if how == "deepspeed" else 0.0
            plan = replace(plan, clip_in_optimizer=False, deepspeed_config={**plan.deepspeed_config, "gradient_clipping": clip})
        engine = Engine(plan, init_state=None)
        it = _random_batches(plan)
        values = [engine.read(out) for out in [engine.train_step(it) for _ in range(steps)]]
        results[how] = {"losses": [v["loss"] for v in values], "grad_norms": [v["grad_norm"] for v in values],
                        "clip_in_optimizer": plan.clip_in_optimizer}
        del engine
    return results

def pipeline_stage_document_masks(config_kwargs: dict) -> dict:
    """A one-stage PipelineModule on packed rows whose documents are kept apart, against the
    GPT's dense path: how many masks a forward builds, and
    - flex: its logits through FlexAttention (chosen here as on CUDA; forward only, CPU has no
      FlexAttention backward),
    - flex_recomputed: its gradients through DeepSpeed's recomputed chunks with the BlockMask
      riding along (the attention itself SDPA under the BlockMask's own dense form, for the
      backward CPU lacks),
    - dense_recomputed: the same with the dense mask, as CPU trains."""
    import deepspeed
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_mask

    import model.gpt as gpt
    import model.pipe as pipe_module
    from model.config import GPTConfig
    from model.gpt import GPT, lm_loss
    from model.pipe import build_pipeline, gpt_key, load_gpt_state
    from pipelines.train.distributed import init_distributed

    init_distributed()  # as training workers do: no JIT build of DeepSpeed's shm op, whose lock a killed process can leave behind
    config = GPTConfig(**config_kwargs)
    torch.manual_seed(0)
    reference = GPT(config)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, config.vocab_size, (2, 48), generator=g)
    y = torch.randint(0, config.vocab_size, (2, 48), generator=g)
    document_ids = (torch.rand(2, 48, generator=g) < 0.1).long().cumsum(dim=1)
    reference(x, labels=y, document_ids=document_ids)[1].backward()  # the dense path (CPU)
    expected_grads = {name: p.grad for name, p in reference.named_parameters()}
    expected_logits = reference.eval()(x, document_ids=document_ids)[0].detach()

    built = []
    mask_of = pipe_module.documents_apart_mask
    pipe_module.documents_apart_mask = lambda ids, dropout: built.append(ids.shape) or mask_of(ids, dropout)
    dense_choice, flex_attend = gpt.uses_flex_attention, gpt.flex_attend

    def attend_by_the_dense_form(q, k, v, block_mask, enable_gqa):
        B, _, T, _ = q.shape
        mask = create_mask(block_mask.mask_mod, B, 1, T, T, device=q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)

    def stage(interval: int):
        pipe = build_pipeline(config, 1, activation_checkpoint_interval=interval)
        pipe._precompute_checkpointable_values()  # what DeepSpeed's engine does before the first forward
        load_gpt_state(pipe, config, reference.state_dict())
        return pipe

    def grad_error(pipe) -> float:
        return max(float((p.grad - expected_grads[gpt_key(config, name)]).abs().max()) for name, p in pipe.named_parameters())

    out = {}
    gpt.uses_flex_attention = lambda device, attention_dropout: attention_dropout == 0.0
    with torch.no_grad():
        logits = stage(0).eval()((x, document_ids))
    out["flex"] = {"masks_built": len(built), "logits_error": float((logits - expected_logits).abs().max())}

    built.clear()
    gpt.flex_attend = attend_by_the_dense_form
    pipe = stage(1)
    lm_loss(pipe.train()((x, document_ids)), y).backward()
    out["flex_recomputed"] = {"masks_built": len(built), "grad_error": grad_error(pipe)}

    built.clear()
    gpt.uses_flex_attention, gpt.flex_attend = dense_choice, flex_attend
    pipe = stage(1)
    lm_loss(pipe.train()((x, document_ids)), y).backward()
    out["dense_recomputed"] = {"masks_built": len(built), "grad_error": grad_error(pipe)}
    return out


def optimizer_state_bytes(config_kwargs: dict, stage_kwargs: dict, steps: int) -> dict:
    """Bytes of the tensors this rank's optimizer holds after `steps` optimizer steps, counted on
    the live objects (not derived from parameter counts): every tensor reachable from the DeepSpeed
    optimizer's state_dict (ZeRO: the fp32 master partition and Adam's moments), each storage
    once; beside it the trainable parameters and the process's peak resident size."""
    import torch

    from model.config import GPTConfig
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine

    torch.set_num_threads(1)
    init_distributed()
    plan = _plan(GPTConfig(**config_kwargs), {**stage_kwargs, "steps": steps})
    engine = Engine(plan, init_state=None)
    it = _random_batches(plan)
    for _ in range(steps):
        engine.read(engine.train_step(it))
    seen, total = set(), 0
    stack = [engine.optimizer.state_dict()]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.storage_offset(), item.numel())
            if key not in seen:
                seen.add(key)
                total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    params = sum(p.numel() for p in engine.engine.module.parameters())
    return {"optimizer_bytes": total, "trainable": engine.trainable_params, "params": params,
            "peak_rss": _proc_status("VmHWM"), "optimizer": engine.optimizer_name}


def hub_import_loss(hub_dir: str, pipeline_stages: int, batch_seed: int) -> dict:
    """The loss of one random batch on a model that starts from a hub directory, built by the
    engine as a stage starting from it builds it (each pipeline stage reading only its tensors)."""
    import torch

    from model.export import open_model_weights
    from pipelines.train.distributed import init_distributed
    from pipelines.train.engine import Engine
    from pipelines.train.initial import initial_state

    init_distributed()
    config, tokenizer, _ = open_model_weights(hub_dir)
    plan = _plan(config, {"steps": 1, "micro_batch": 2, "deepspeed": {"pipeline_stages": pipeline_stages, "zero_stage": 0}},
                 init_model=Path(hub_dir))
    engine = Engine(plan, init_state=initial_state(plan, tokenizer))
    g = torch.Generator().manual_seed(batch_seed)
    x = torch.randint(0, tokenizer.n_vocab, (2, plan.seq_len), generator=g)
    y = torch.randint(0, tokenizer.n_vocab, (2, plan.seq_len), generator=g)
    return {"loss": engine.micro_batch_loss(x, y), "params": sum(p.numel() for p in engine.engine.module.parameters())}
