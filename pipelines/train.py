"""The training loop, one for pretraining and SFT: they differ only in data and init.

`train_stage(job, "pretrain" | "sft", run_dir)` runs on every worker (Ray Train or torchrun)
with torch.distributed initialised from the environment. It resumes from the newest complete
checkpoint when the stage has one, so a restarted worker group continues where it stopped.

    RUN/<stage>/checkpoints/step_NNNNNNNN/   DeepSpeed state + TrainState, committed atomically
    RUN/<stage>/tensorboard/                 scalars (rank 0)
    RUN/<stage>/model/                       the native export, independent of the parallel layout
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.errors import RelayError
from model.gpt import IGNORE_INDEX
from pipelines import checkpoint as ckpt
from pipelines.data.loader import BatchLoader, eval_batches, open_split
from pipelines.files import write_text_atomically
from pipelines.metrics import Board, StepTimer, bits_per_byte, device_peak_flops, peak_memory_bytes, token_byte_lengths


@dataclass
class TrainState:
    """Everything besides the DeepSpeed state that a resumed run needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    loader: dict = field(default_factory=dict)
    best_val_loss: float = float("inf")
    rng: dict = field(default_factory=dict)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))


class CountingIterator:
    """Passes batches through and counts targets, for the supervised fraction of each step."""

    def __init__(self, inner) -> None:
        self.inner, self.targets, self.supervised = inner, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        x, y = next(self.inner)
        self.targets += y.numel()
        self.supervised += int((y != IGNORE_INDEX).sum())
        return x, y

    def take_fraction(self) -> float:
        value = self.supervised / self.targets if self.targets else float("nan")
        self.targets = self.supervised = 0
        return value


def stage_paths(run_dir: Path, stage: str) -> dict[str, Path]:
    root = Path(run_dir) / stage
    return {"root": root, "checkpoints": root / "checkpoints", "tensorboard": root / "tensorboard", "model": root / "model"}


def _init_model(job, stage_name: str, stage, run_dir: Path, tokenizer):
    """(GPTConfig, initial GPT state or None) for the stage."""
    from model.export import load_model_dir

    init = stage.init or (str(stage_paths(run_dir, "pretrain")["model"]) if stage_name == "sft" else None)
    if init is None:
        return job.model.config(tokenizer.n_vocab), None
    model, init_tok, _ = load_model_dir(job.path(init))
    if init_tok.sha256 != tokenizer.sha256 or init_tok.special_tokens != tokenizer.special_tokens:
        raise RelayError(f"stages.{stage_name}.init: {init} uses tokenizer {init_tok.name} ({init_tok.sha256[:12]}), "
                         f"the job's is {tokenizer.name} ({tokenizer.sha256[:12]})")
    model = add_missing_tokens(model, tokenizer.n_vocab)
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def add_missing_tokens(model, n_vocab: int):
    """Grow the vocabulary to `n_vocab` (e.g. chat tokens a base model lacks); new rows = mean embedding."""
    from model.gpt import GPT

    old = model.config.vocab_size
    if n_vocab <= old:
        return model
    grown = GPT(model.config.replace(vocab_size=n_vocab))
    state = model.state_dict()
    with torch.no_grad():
        for name in ("transformer.wte.weight", "lm_head.weight"):
            if name == "lm_head.weight" and model.config.tie_embeddings:
                continue
            rows = grown.state_dict()[name].clone()
            rows.zero_()
            rows[:old] = state[name][:old]
            rows[old:n_vocab] = state[name][:old].mean(dim=0)
            state[name] = rows
        if model.config.tie_embeddings:
            state["lm_head.weight"] = state["transformer.wte.weight"]
    grown.load_state_dict(state)
    return grown


def evaluate(engine, windows, stage, byte_lengths: np.ndarray) -> dict:
    """Validation loss (per supervised token) and bits per byte over `eval_batches` micro-batches."""
    topo = engine.topology
    steps = min(stage.eval_batches, windows.num_windows // (stage.micro_batch * topo.dp))
    if steps == 0:
        return {}
    batches = eval_batches(windows, stage.micro_batch, dp_rank=topo.dp_rank, dp_size=topo.dp, max_batches=steps)
    sums = torch.zeros(3, dtype=torch.float64)  # nats, supervised targets, bytes
    for _ in range(steps):
        x, y = next(batches)
        loss = engine.micro_batch_loss(x, y)
        # A pipeline returns the same data-parallel mean loss on every rank; each first-stage rank
        # weighs it by its own targets (exact when ranks hold equally many, as in pretraining).
        if not engine.pipelined or topo.is_first_stage:
            keep = y != IGNORE_INDEX
            count = int(keep.sum())
            sums += torch.tensor([loss * count, count, float(byte_lengths[y[keep].numpy()].sum())], dtype=torch.float64)
    reduced = sums.to(engine._reduce_device())
    dist.all_reduce(reduced)
    nats, count, nbytes = reduced.tolist()
    return {"val/loss": nats / max(count, 1), "val/bpb": bits_per_byte(nats, int(nbytes))}


def _print_report(metrics: dict) -> None:
    """The torchrun console line; under Ray the driver shows its own progress display."""
    parts = [f"[{metrics['stage']}] step {metrics['step']}/{metrics['total_steps']}"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}  lr {metrics['train/lr']:.2e}  "
                     f"{metrics['perf/tokens_per_s']:.0f} tok/s  eta {metrics.get('eta_s', 0):.0f}s")
    if "val/loss" in metrics:
        parts.append(f"val loss {metrics['val/loss']:.4f}  val bpb {metrics['val/bpb']:.3f}")
    print("  ".join(parts), flush=True)


def _windows(job, stage_name: str, stage, run_dir: Path, config):
    directory = Path(run_dir) / "data" / stage_name
    seq_len = stage.seq_len or config.block_size
    train = open_split(directory, "train", seq_len=seq_len)
    val = open_split(directory, "val", seq_len=seq_len, verify=False)
    return train, val


def train_stage(job, stage_name: str, run_dir: str | Path, *, report=None, until_step: int | None = None) -> dict:
    """Train one stage on this worker; returns the final metrics (complete on rank 0).

    `until_step` stops early at that step (checkpointed, same schedule), as a preempted or
    time-limited run would; the next call resumes from there.
    """
    from model.tokenizer import Tokenizer
    from pipelines.distributed import init_distributed
    from pipelines.engine import Engine

    init_distributed()
    report = report or _print_report
    run_dir = Path(run_dir)
    stage = getattr(job.stages, stage_name)
    paths = stage_paths(run_dir, stage_name)
    tokenizer = Tokenizer.from_dir(run_dir / "tokenizer")
    config, init_state = _init_model(job, stage_name, stage, run_dir, tokenizer)
    train_windows, val_windows = _windows(job, stage_name, stage, run_dir, config)
    world, pp = dist.get_world_size(), stage.deepspeed.pipeline_stages
    dp = world // pp
    seq_len = train_windows.seq_len
    tokens_per_step = stage.micro_batch * stage.grad_accum * dp * seq_len
    total_steps = stage.steps or math.ceil(stage.tokens / tokens_per_step)
    engine = Engine(config, stage, total_steps, init_state=init_state, seed=job.seed)
    topo = engine.topology
    loader = BatchLoader(train_windows, stage.micro_batch, dp_rank=topo.dp_rank, dp_size=dp, seed=job.seed) if topo.needs_data else None
    batches = CountingIterator(loader) if loader is not None else None

    state = TrainState()
    if topo.rank == 0:
        paths["checkpoints"].mkdir(parents=True, exist_ok=True)
        ckpt.prune(paths["checkpoints"], keep_last=10**9)  # leftovers of an interrupted write
    dist.barrier()
    found = ckpt.newest_usable(paths["checkpoints"], warn=lambda msg: topo.rank == 0 and print(f"[{stage_name}] warning: {msg}", flush=True))
    if found is not None:
        step, tag = found
        client = engine.load(str(paths["checkpoints"]), tag)
        state = TrainState(**{k: v for k, v in client.get("train_state", {}).items() if k in TrainState.__dataclass_fields__})
        if loader is not None and state.loader:
            loader.load_state_dict(state.loader)
        _set_rng_state(state.rng)
        if topo.rank == 0:
            print(f"[{stage_name}] resumed from {paths['checkpoints'] / tag} at step {state.step}", flush=True)

    board = Board(paths["tensorboard"] if topo.rank == 0 else None)
    if state.step == 0:
        board.text("config/job", "```\n" + _yaml(job.resolved_dict()) + "\n```")
        board.text("config/deepspeed", "```\n" + _yaml(engine.ds_config) + "\n```")
    peak = device_peak_flops(stage.peak_tflops)
    flops_per_token = config.flops_per_token(seq_len)
    byte_lengths = token_byte_lengths(tokenizer)
    timer, window_time, window_steps, last = StepTimer(), 0.0, 0, {}
    stop_at = min(total_steps, until_step or total_steps)
    while state.step < stop_at:
        out = engine.train_step(batches)
        state.step += 1
        state.tokens_seen += tokens_per_step
        elapsed = timer.lap()
        window_time, window_steps = window_time + elapsed, window_steps + 1
        metrics = {"stage": stage_name, "step": state.step, "total_steps": total_steps}
        if state.step % stage.log_every == 0 or state.step == total_steps:
            step_time = window_time / window_steps
            achieved = flops_per_token * tokens_per_step / step_time / world
            metrics.update({
                "train/loss": out["loss"], "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
                "train/tokens_seen": state.tokens_seen,
                "perf/tokens_per_s": tokens_per_step / step_time, "perf/step_time_s": step_time,
                "perf/achieved_tflops_per_device": achieved / 1e12,
                "perf/mfu": achieved / peak if peak else None,
                "perf/peak_memory_gb": peak_memory_bytes() / 1e9,
                "eta_s": step_time * (total_steps - state.step),
            })
            if batches is not None:
                metrics["train/supervised_fraction"] = batches.take_fraction()
            window_time, window_steps = 0.0, 0
        if state.step % stage.eval_every == 0 or state.step == total_steps:
            val = evaluate(engine, val_windows, stage, byte_lengths)
            metrics.update(val)
            if val:
                state.best_val_loss = min(state.best_val_loss, val["val/loss"])
        if len(metrics) > 3:
            board.scalars(state.step, {k: v for k, v in metrics.items() if "/" in k})
            last.update(metrics)
            if topo.rank == 0:
                report(metrics)
                log_metrics(paths["root"] / "metrics.jsonl", metrics)
        if stage.save_checkpoints and (state.step % stage.checkpoint_every == 0 or state.step in (total_steps, stop_at)):
            _save(engine, paths["checkpoints"], state, loader, stage, topo)
        timer.lap()  # evaluation and checkpoint time is not step time
    board.close()
    memory = _peak_memory_per_rank(engine)
    if state.step < total_steps:
        return {**last, "step": state.step, "total_steps": total_steps, "stopped_early": True}
    result = {**last, "step": state.step, "total_steps": total_steps, "tokens_seen": state.tokens_seen,
              "best_val_loss": state.best_val_loss, "perf/peak_memory_gb_per_rank": memory, "params": config.num_params(),
              "seq_len": seq_len, "tokens_per_step": tokens_per_step, "flops_per_token": flops_per_token}
    if stage.export_model:
        _export(engine, config, tokenizer, paths["model"], topo, provenance={
            "job": job.name, "stage": stage_name, "steps": state.step, "tokens_seen": state.tokens_seen,
            "layout": {"pipeline_stages": pp, "data_parallel": dp, "zero_stage": stage.deepspeed.zero_stage},
            "final": {k: v for k, v in last.items() if "/" in k}})
        result["model_dir"] = str(paths["model"])
    if topo.rank == 0:
        write_text_atomically(paths["root"] / "result.json",
                              json.dumps({k: v for k, v in result.items() if k != "stage"}, indent=2, default=str) + "\n")
    dist.barrier()
    return result


def _peak_memory_per_rank(engine) -> list[float]:
    """Every rank's peak memory in GB (a collective): pipeline stages and ZeRO shards differ."""
    mine = torch.tensor([peak_memory_bytes() / 1e9], dtype=torch.float64, device=engine._reduce_device())
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [round(float(t), 4) for t in gathered]


def _export(engine, config, tokenizer, model_dir: Path, topo, provenance: dict) -> None:
    """The native model directory, gathered from whatever layout trained it (a collective)."""
    from model.export import save_model_dir
    from model.gpt import GPT

    full = engine.full_state_dict()
    if topo.rank == 0:
        with torch.device("meta"):
            model = GPT(config)
        model.load_state_dict(full, assign=True)
        if config.tie_embeddings:
            model.lm_head.weight = model.transformer.wte.weight
        save_model_dir(model, tokenizer, model_dir, provenance=provenance)


def _save(engine, root: Path, state: TrainState, loader, stage, topo) -> None:
    state.loader = loader.state_dict() if loader is not None else state.loader
    state.rng = _rng_state()
    engine.save(str(root), ckpt.temp_tag(state.step), {"train_state": asdict(state)})
    dist.barrier()
    if topo.rank == 0:
        ckpt.commit(root, state.step)
        ckpt.prune(root, stage.keep_last)
    dist.barrier()


def log_metrics(path: Path, metrics: dict) -> None:
    """Append one JSON line: the stage's metrics log, which the driver's progress display reads."""

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": time.time(), **{k: v for k, v in metrics.items() if v is None or isinstance(v, (int, float, str))}}) + "\n")


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
