"""The training loop, one for pretraining, SFT and DPO: they differ only in data, init and (DPO,
pipelines/train/dpo.py) the loss of a micro-batch.

`pipelines.train.entry.train_stage(run_plan, "pretrain" | "sft" | "dpo")` runs on every worker (Ray Train or torchrun) with
torch.distributed initialised from the environment. Every number it uses comes from the
stage's resolved `TrainPlan`; the trainer goes through named phases:

    build     tokenizer, initial weights, data windows, the DeepSpeed engine, the loader
    resume    from the newest complete checkpoint whose files match their recorded sha256
    step      one optimizer step (any layout: the engine hides pipelined vs plain)
    evaluate  validation loss and bits per byte, every `eval_every` steps and at the end
    checkpoint  every `checkpoint_every` steps, at the end and where the run stops early
    finish    peak memory of every rank, the native export, result.json

    RUN/<stage>/checkpoints/step_NNNNNNNN/   DeepSpeed state + TrainState, committed atomically with
                                             the sha256 of every file (checkpoint.json)
    RUN/<stage>/tensorboard/, metrics.jsonl  written by rank 0 (MetricsLogger)
    RUN/<stage>/model/                       the native export, independent of the parallel layout
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.errors import RelayError
from model.gpt import IGNORE_INDEX
from pipelines.train import checkpoint as ckpt
from pipelines.train.distributed import all_ranks, from_rank_0
from pipelines.train.initial import initial_state
from pipelines.train.metrics import MetricsLogger, StepTimer, bits_per_byte, device_peak_flops, peak_memory_bytes, token_byte_lengths
from pipelines.train.tracking import plan_params


@dataclass
class TrainState:
    """Everything besides the DeepSpeed state that a resumed run needs to continue exactly."""

    step: int = 0
    tokens_seen: int = 0
    loader: dict = field(default_factory=dict)
    best_val_loss: float = float("inf")
    rng: dict = field(default_factory=dict)


def _rng_state() -> dict:
    """Every generator a step can draw from (dropout on a GPU draws from this process's CUDA generator)."""
    state = {"torch": torch.get_rng_state(), "numpy": list(np.random.get_state()[1].tolist()), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
        random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
        np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CountingIterator:
    """Passes batches through and counts targets, for the supervised fraction of each step."""

    def __init__(self, inner) -> None:
        self.inner, self.targets, self.supervised = inner, 0, 0

    def __iter__(self):
        return self

    def __next__(self):
        x, y = next(self.inner)
        self.targets += y.numel()
        self.supervised += int(np.count_nonzero(y.numpy() != IGNORE_INDEX))  # host batches: nothing waits on a device
        return x, y

    def take_fraction(self) -> float:
        value = self.supervised / self.targets if self.targets else float("nan")
        self.targets = self.supervised = 0
        return value


class Trainer:
    """One training stage on this worker, from its plan."""

    def __init__(self, run, stage: str, *, console: bool = True) -> None:
        self.run, self.plan = run, run.stage(stage)
        self.dir = run.run_dir.stage(stage)
        self.console = console

    # ---- build ------------------------------------------------------------------------------

    def build(self) -> None:
        from model.tokenizer import Tokenizer
        from pipelines.train.distributed import init_distributed
        from pipelines.train.engine import Engine
        from pipelines.train.startup import WorkerStartup

        init_distributed()
        self.startup = WorkerStartup(self.dir.startup, rank=dist.get_rank())
        self.startup.mark("distributed")
        plan = self.plan
        if dist.get_world_size() != plan.world_size:
            raise RelayError(f"cluster.num_workers: the plan is for {plan.world_size} workers but {dist.get_world_size()} started")
        self.tokenizer = Tokenizer.from_dir(self.run.run_dir.tokenizer)
        self.open_data()
        self.engine = Engine(plan, init_state=initial_state(plan, self.tokenizer))
        self.topo = self.engine.topology
        self.make_loader()
        self.state = TrainState()
        self.logger = MetricsLogger(self.dir, rank=self.topo.rank, console=self.console, tracking=self.run.tracking,
                                    params=plan_params(self.run.job, plan) if self.topo.rank == 0 and self.run.tracking else None)
        self.byte_lengths = token_byte_lengths(self.tokenizer)
        self.peak_flops = device_peak_flops(plan.settings.peak_tflops)
        self.flops_per_token = plan.model.flops_per_token(plan.seq_len)
        self.startup.mark("built")

    def open_data(self) -> None:
        """The stage's prepared splits (read in place; the training split's shards verified)."""
        from pipelines.data.loader import open_split

        plan, separate = self.plan, self.plan.separate_documents
        self.train_windows = open_split(plan.data_dir, "train", seq_len=plan.seq_len, separate_documents=separate)
        self.val_windows = open_split(plan.data_dir, "val", seq_len=plan.seq_len, verify=False, separate_documents=separate)

    def make_loader(self) -> None:
        """This rank's training batches (the ranks of a pipeline that read data)."""
        from pipelines.data.loader import make_loader

        plan = self.plan
        self.loader = make_loader(plan.data_dir, self.train_windows, plan.micro_batch, dp_rank=self.topo.dp_rank,
                                  dp_size=plan.data_parallel, seed=plan.seed,
                                  separate_documents=plan.separate_documents) if self.topo.needs_data else None
        self.batches = CountingIterator(self.loader) if self.loader is not None else None

    # ---- resume -----------------------------------------------------------------------------

    def resume(self) -> None:
        """Continue from the newest complete checkpoint, if any; a fresh run records its config."""
        if self.topo.rank == 0:
            self.dir.checkpoints.mkdir(parents=True, exist_ok=True)
            ckpt.drop_unfinished(self.dir.checkpoints)
        dist.barrier()
        found = self._newest_verified()
        if found is None:
            if self.topo.rank == 0:
                self.dir.metrics.keep_through(0)  # a fresh start: an abandoned attempt's steps are not history
            self.logger.text("config/job", "```\n" + _yaml(self.run.job) + "\n```")
            self.logger.text("config/deepspeed", "```\n" + _yaml(self.plan.deepspeed_config) + "\n```")
            return
        _, tag = found
        client = self.engine.load(str(self.dir.checkpoints), tag)
        saved = client.get("train_state", {})
        self.state = TrainState(**{k: v for k, v in saved.items() if k in TrainState.__dataclass_fields__})
        if self.loader is not None and self.state.loader:
            self.loader.load_state_dict(self.state.loader)
        _set_rng_state(self.state.rng)
        if self.topo.rank == 0:
            self.dir.metrics.keep_through(self.state.step)  # one history: the superseded attempt's later steps go
            self._say(f"[{self.plan.stage}] resumed from {self.dir.checkpoints / tag} at step {self.state.step}")

    def _newest_verified(self) -> tuple[int, str] | None:
        """The newest checkpoint every file of which matches its recorded sha256, chosen by all
        ranks together (each hashes a share of the files) before any of them loads one, so that a
        damaged checkpoint is skipped rather than loaded (loading itself runs no code from the
        files: pipelines/train/checkpoint.py, WeightsOnlyLoading)."""
        def first_problem(reason: str | None) -> str | None:
            return next((r for r in all_ranks(reason) if r is not None), None)

        candidates = from_rank_0(ckpt.committed(self.dir.checkpoints) if self.topo.rank == 0 else None)
        return ckpt.newest_usable(self.dir.checkpoints, warn=self._warn, part=(self.topo.rank, self.topo.world_size),
                                  agree=first_problem, candidates=candidates)

    def _warn(self, message: str) -> None:
        self._say(f"[{self.plan.stage}] warning: {message}")

    def _say(self, line: str) -> None:
        """A line for the person running the stage, from rank 0: printed under torchrun; under
        Ray recorded in the stage's messages, which the driver shows (worker output goes to the log)."""
        if self.topo.rank != 0:
            return
        if self.console:
            print(line, flush=True)
        else:
            self.dir.messages.append({"message": line})

    # ---- the loop ---------------------------------------------------------------------------

    def fit(self, until_step: int | None = None) -> dict:
        """Train to the end of the budget (or to `until_step`, checkpointed, as a preempted run
        would stop); returns the final metrics (complete on rank 0)."""
        plan, state, timer = self.plan, self.state, StepTimer()
        stop_at = min(plan.total_steps, until_step or plan.total_steps)
        self.last: dict = {}
        while state.step < stop_at:
            out = self.train_step()
            state.step += 1
            state.tokens_seen += plan.tokens_per_step
            logged = self._due(plan.settings.log_every)
            values = self.engine.read(out) if logged else None  # the step's one read from the device
            timer.step_done()  # after the read: the GPU's queued work counts towards the steps it belongs to
            metrics = self.train_metrics(values, timer) if logged else {}
            metrics.update(self.maybe_evaluate())
            if metrics:
                self.log(metrics)
            self.maybe_checkpoint(stop_at)
            timer.skip()  # evaluation and checkpoint time is not step time
        self.logger.close()
        return self.finish()

    def train_step(self):
        return self.engine.train_step(self.batches)

    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.plan.total_steps

    def train_metrics(self, out: dict, timer: StepTimer) -> dict:
        """The logged step's scalars; `out` is what `Engine.read` returned for it."""
        plan = self.plan
        step_time = timer.take_mean()
        achieved = self.flops_per_token * plan.tokens_per_step / step_time / plan.world_size
        metrics = {
            "train/loss": out["loss"], "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
            "train/tokens_seen": self.state.tokens_seen,
            "perf/tokens_per_s": plan.tokens_per_step / step_time, "perf/step_time_s": step_time,
            "perf/tokens_per_s_per_device": plan.tokens_per_step / step_time / plan.world_size,  # comparable across layouts
            "perf/achieved_tflops_per_device": achieved / 1e12,
            "perf/mfu": achieved / self.peak_flops if self.peak_flops else None,
            "perf/peak_memory_gb": peak_memory_bytes() / 1e9,
            "eta_s": step_time * (plan.total_steps - self.state.step),
        }
        if isinstance(self.batches, CountingIterator):
            metrics["train/supervised_fraction"] = self.batches.take_fraction()
        if hasattr(self.loader, "fractions"):  # a mixture: the share each source has had so far, and its target
            for (name, share), target in zip(self.loader.fractions().items(), self.loader.target):
                metrics[f"data/fraction/{name}"] = share
                metrics[f"data/target_fraction/{name}"] = float(target)
        return metrics

    def maybe_evaluate(self) -> dict:
        if not self._due(self.plan.settings.eval_every):
            return {}
        val = evaluate(self.engine, self.val_windows, self.plan, self.byte_lengths)
        if val:
            self.state.best_val_loss = min(self.state.best_val_loss, val["val/loss"])
        return val

    def log(self, values: dict) -> None:
        metrics = {"stage": self.plan.stage, "step": self.state.step, "total_steps": self.plan.total_steps, **values}
        self.last.update(metrics)
        self.logger.log(self.state.step, metrics)

    def maybe_checkpoint(self, stop_at: int) -> None:
        settings = self.plan.settings
        if settings.save_checkpoints and (self.state.step % settings.checkpoint_every == 0 or self.state.step == stop_at):
            self.save()

    def save(self) -> None:
        root, state = self.dir.checkpoints, self.state
        state.loader = self.loader.state_dict() if self.loader is not None else state.loader
        state.rng = _rng_state()
        self.engine.save(str(root), ckpt.temp_tag(state.step), {"train_state": asdict(state)})
        dist.barrier()
        # Every rank's files are written: the ranks hash them between them, rank 0 records them all.
        tmp, part = root / ckpt.temp_tag(state.step), (self.topo.rank, self.topo.world_size)
        shares = all_ranks(ckpt.describe(tmp, ckpt.share(ckpt.files_of(tmp), part)))
        if self.topo.rank == 0:
            ckpt.commit(root, state.step, files={name: f for hashed in shares for name, f in hashed.items()})
            ckpt.prune(root, self.plan.settings.keep_last)
        dist.barrier()

    # ---- finish -----------------------------------------------------------------------------

    def finish(self) -> dict:
        """Peak memory of every rank, then (at the end of the budget) the export and result.json."""
        plan, state = self.plan, self.state
        memory = _peak_memory_per_rank(self.engine)
        if state.step < plan.total_steps:
            return {**self.last, "step": state.step, "total_steps": plan.total_steps, "stopped_early": True}
        result = {**self.last, "step": state.step, "total_steps": plan.total_steps, "tokens_seen": state.tokens_seen,
                  "best_val_loss": state.best_val_loss, "perf/peak_memory_gb_per_rank": memory, "params": plan.model.num_params(),
                  "seq_len": plan.seq_len, "tokens_per_step": plan.tokens_per_step, "flops_per_token": self.flops_per_token,
                  "optimizer": self.engine.optimizer_name,
                  "trainable_params": self.engine.trainable_params, "compiled_blocks": self.engine.compiled_blocks}
        if plan.settings.export_model:
            self.export()
            result["model_dir"] = str(self.dir.model)
            if plan.settings.lora is not None:
                result["adapter_dir"] = str(self.dir.adapter)
        if self.topo.rank == 0:
            self.dir.write_result({k: v for k, v in result.items() if k != "stage"})
        dist.barrier()
        return result

    def export(self) -> None:
        plan = self.plan
        export_model(self.engine, self.tokenizer, self.dir.model, provenance={
            "job": self.run.job_name, "stage": plan.stage, "steps": self.state.step, "tokens_seen": self.state.tokens_seen,
            "layout": {"pipeline_stages": plan.pipeline_stages, "data_parallel": plan.data_parallel, "zero_stage": plan.zero_stage},
            "final": {k: v for k, v in self.last.items() if "/" in k}})
        lora = plan.settings.lora
        if lora is not None:
            export_adapter(self.engine, self.dir.adapter, lora, base_model=str(plan.init_model or ""))


def export_adapter(engine, out: Path, lora, base_model: str) -> None:
    """The adapter alone in PEFT's layout, for the Hugging Face export of the model the stage
    started from (`base_model`; the stage's own export already has the adapter merged in)
    (model/lora.py: peft_adapter); a model Hugging Face has no class for gets none, and says why."""
    from model.lora import write_peft_adapter

    weights = engine.adapter_weights()  # a collective under ZeRO-3: every rank takes part, rank 0 writes
    if engine.topology.rank != 0:
        return
    try:
        write_peft_adapter(out, engine.plan.model, weights, rank=lora.rank, alpha=lora.alpha,
                           dropout=lora.dropout, targets=lora.targets, base_model=base_model)
    except ValueError as exc:
        print(f"relaygpt: no PEFT adapter written: {exc}", flush=True)


def export_model(engine, tokenizer, out: Path, provenance: dict) -> None:
    """The native model directory, streamed from whatever layout trained it (a collective):
    rank 0 writes each weight as it arrives, the other ranks send or gather theirs in turn."""
    from model.export import write_model_dir
    from model.weights_file import file_order

    specs = engine.export_specs()
    weights = engine.stream_weights(file_order(specs))
    if engine.topology.rank != 0:
        for _ in weights:  # take part in every gather and send, in order
            pass
        return
    write_model_dir(engine.plan.model, tokenizer, out, specs, weights, provenance=provenance)


def evaluate(engine, windows, plan, byte_lengths: np.ndarray) -> dict:
    """Validation loss (per supervised token) and bits per byte over `eval_batches` micro-batches."""
    from pipelines.data.loader import eval_batches

    topo = engine.topology
    steps = min(plan.settings.eval_batches, windows.num_windows // (plan.micro_batch * topo.dp))
    if steps == 0:
        return {}
    batches = eval_batches(windows, plan.micro_batch, dp_rank=topo.dp_rank, dp_size=topo.dp, max_batches=steps)
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
    reduced = sums.to(engine.reduce_device)
    dist.all_reduce(reduced)
    nats, count, nbytes = reduced.tolist()
    return {"val/loss": nats / max(count, 1), "val/bpb": bits_per_byte(nats, int(nbytes))}


def _peak_memory_per_rank(engine) -> list[float]:
    """Every rank's peak memory in GB (a collective): pipeline stages and ZeRO shards differ."""
    mine = torch.tensor([peak_memory_bytes() / 1e9], dtype=torch.float64, device=engine.reduce_device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [round(float(t), 4) for t in gathered]


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
