"""Direct preference optimisation as a training stage: the same engine, loop, checkpoints and
export as pretraining and SFT; only the data (pairs) and the loss differ.

For a prompt x with a chosen answer y_w and a rejected one y_l, the policy pi (the model being
trained) and the reference pi_ref (the stage's starting model, frozen) each give the summed
log-probability of the answer's tokens (the response mask of pipelines/data/preference.py):

    chosen reward   r_w = beta (log pi(y_w|x) - log pi_ref(y_w|x))
    rejected reward r_l = beta (log pi(y_l|x) - log pi_ref(y_l|x))
    sigmoid (DPO, Rafailov et al. 2023, eq. 7):  -log sigmoid(r_w - r_l), with label smoothing
        eps: -(1 - eps) log sigmoid(r_w - r_l) - eps log sigmoid(r_l - r_w)
    ipo (Azar et al. 2023, eq. 17):  ((r_w - r_l) / beta - 1 / (2 beta))^2
    accuracy: the share of pairs with r_w > r_l; margin: the mean of r_w - r_l

The reference never changes, so its log-probabilities of every prepared pair are computed once,
by the engine before its first step (when it holds exactly the starting model: with LoRA the
adapters are still zero), and cached in RUN/dpo/reference/ (per split, with the sha256 of each
file and the data's fingerprint); a resumed or restarted stage reads them back. Training then
holds one model and runs one forward per micro-batch of 2 x micro_batch rows (chosen, rejected).
"""

from __future__ import annotations

import hashlib
import json
import math

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from model.errors import RelayError
from model.gpt import IGNORE_INDEX
from pipelines.data.loader import BatchLoader
from pipelines.train.distributed import from_rank_0
from pipelines.train.trainer import Trainer

STATS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
               reference_rejected: torch.Tensor, *, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per pair (B,): the loss, the chosen and the rejected reward (see the module's docstring)."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)  # difference of log-ratios
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * margin) * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; valid: sigmoid, ipo")
    chosen = beta * (policy_chosen - reference_chosen).detach()
    rejected = beta * (policy_rejected - reference_rejected).detach()
    return losses, chosen, rejected


def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, **settings):
    """(mean loss, (4,) statistics in STATS order: mean chosen reward, rejected reward, margin, accuracy)."""
    losses, chosen, rejected = dpo_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected, **settings)
    stats = torch.stack([chosen.mean(), rejected.mean(), (chosen - rejected).mean(), (chosen > rejected).float().mean()])
    return losses.mean(), stats


def sequence_logps(engine, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) the sum of each row's log-probabilities of its labels (IGNORE_INDEX left out), the
    log-softmax in fp32, through the DeepSpeed engine (under ZeRO-3 every rank calls it: the
    forward gathers the weights)."""
    logits, _ = engine.engine(tokens.to(engine.engine.device))  # (B, T, V)
    labels = labels.to(logits.device)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * (labels != IGNORE_INDEX)).sum(dim=-1)


def pair_batch(rows, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels (2B, seq_len) of pairs `indices`: the chosen rows, then the rejected rows.
    Labels are the next tokens, IGNORE_INDEX outside the answer."""
    pairs = [rows.pair(int(i)) for i in indices]
    tokens = np.concatenate([np.stack([t[side] for t, _ in pairs]) for side in (0, 1)]).astype(np.int64)  # (2B, row_len)
    masks = np.concatenate([np.stack([m[side] for _, m in pairs]) for side in (0, 1)])
    labels = np.where(masks[:, 1:] > 0, tokens[:, 1:], IGNORE_INDEX)
    return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(labels)


def split_sides(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    half = values.shape[0] // 2
    return values[:half], values[half:]


class PreferenceLoader(BatchLoader):
    """This rank's micro-batches of pairs, with the reference's log-probabilities of each:
    (inputs, labels, reference (B, 2)). Resumable like every loader (`state_dict`)."""

    def __init__(self, rows, reference: np.ndarray, micro_batch: int, *, dp_rank: int, dp_size: int, seed: int) -> None:
        super().__init__(rows, micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
        self.reference = reference

    def __next__(self) -> tuple:
        indices = self.next_indices()
        x, y = pair_batch(self.windows, indices)
        return x, y, torch.from_numpy(self.reference[indices])


def pair_rounds(num_pairs: int, micro_batch: int, dp_size: int, dp_rank: int, max_rounds: int | None = None):
    """(indices, real) of this rank's micro-batches covering pairs 0..num_pairs-1 in order, every
    rank the same number of rounds (ZeRO-3's forwards are collectives): the last round repeats the
    final pair where it runs out, and `real` marks the pairs that count."""
    per_round = micro_batch * dp_size
    rounds = math.ceil(num_pairs / per_round)
    for r in range(rounds if max_rounds is None else min(rounds, max_rounds)):
        wanted = np.arange(micro_batch) + r * per_round + dp_rank * micro_batch
        yield np.minimum(wanted, num_pairs - 1), wanted < num_pairs


@torch.no_grad()
def pair_logps(engine, rows, micro_batch: int) -> np.ndarray:
    """(pairs, 2) log-probabilities of every pair's chosen and rejected answer under the engine's
    current weights, on every rank (each computes its share; gathered)."""
    topo, n = engine.topology, len(rows)
    engine.engine.eval()
    mine = []
    for indices, _ in pair_rounds(n, micro_batch, topo.dp, topo.dp_rank):
        chosen, rejected = split_sides(sequence_logps(engine, *pair_batch(rows, indices)).float())
        mine.append(torch.stack([chosen, rejected], dim=1))  # (B, 2)
    if not mine:
        return np.zeros((0, 2), dtype=np.float32)
    local = torch.stack(mine).to(engine.reduce_device)  # (rounds, B, 2)
    gathered = [torch.zeros_like(local) for _ in range(topo.dp)]
    dist.all_gather(gathered, local)
    ordered = torch.stack(gathered, dim=1).reshape(-1, 2)  # round by round, rank by rank: pair order
    return ordered[:n].cpu().numpy().astype(np.float32)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reference_key(data_fingerprint: str, init_model) -> dict:
    """What the cached log-probabilities depend on: the prepared pairs and the reference model's
    weights (its directory, and the size and modification time of its files)."""
    files = sorted(p for p in Path(init_model).iterdir() if p.is_file()) if init_model and Path(init_model).is_dir() else []
    return {"data_fingerprint": data_fingerprint, "reference_model": str(init_model or ""),
            "reference_files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files}}


def cached_reference(directory, key: dict, splits: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The reference log-probabilities cached for this data and reference model (matching key, pair
    counts and the sha256 of every file), or None."""
    record = directory / "reference.json"
    if not record.is_file():
        return None
    meta = json.loads(record.read_text(encoding="utf-8"))
    if meta.get("key") != key:
        return None
    out = {}
    for split, pairs in splits.items():
        entry = meta.get("splits", {}).get(split)
        path = directory / f"{split}.npy"
        if not entry or entry["pairs"] != pairs or not path.is_file() or _sha256(path) != entry["sha256"]:
            return None
        out[split] = np.load(path, allow_pickle=False)
    return out


def write_reference(directory, key: dict, logps: dict[str, np.ndarray]) -> None:
    from model.atomic import write_json_atomically

    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, values in logps.items():
        tmp = directory / f".{split}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, values, allow_pickle=False)
        tmp.replace(directory / f"{split}.npy")
        splits[split] = {"pairs": int(len(values)), "sha256": _sha256(directory / f"{split}.npy")}
    write_json_atomically(directory / "reference.json", {"key": key, "columns": ["chosen", "rejected"], "splits": splits})


class DPOTrainer(Trainer):
    """The trainer of a DPO stage: pairs instead of windows, the reference's log-probabilities
    cached before the first step, the DPO loss and its statistics on train and validation pairs."""

    def open_data(self) -> None:
        from pipelines.data.preference import PreferenceRows

        self.train_rows = PreferenceRows(self.plan.data_dir, "train")
        self.val_rows = PreferenceRows(self.plan.data_dir, "val", verify=False)

    def make_loader(self) -> None:
        self.reference = self._reference()
        plan = self.plan
        self.loader = PreferenceLoader(self.train_rows, self.reference["train"], plan.micro_batch, dp_rank=self.topo.dp_rank,
                                       dp_size=plan.data_parallel, seed=plan.seed)
        self.batches = self.loader

    def _reference(self) -> dict[str, np.ndarray]:
        """The reference's log-probabilities of every pair: read from the cache, or computed now (the
        engine holds the starting model: nothing has trained and no checkpoint is loaded yet)."""
        directory = self.dir.reference
        key = reference_key(self.train_rows.manifest["fingerprint"], self.plan.init_model)
        splits = {"train": len(self.train_rows), "val": len(self.val_rows)}
        found = from_rank_0(self.topo.rank == 0 and cached_reference(directory, key, splits) is not None)
        if found:
            cached = cached_reference(directory, key, splits)
            if cached is None:
                raise RelayError(f"{directory}: rank {self.topo.rank} cannot read the reference log-probabilities rank 0 found; "
                                 "the run directory must be on a filesystem every node sees")
            return cached
        logps = {split: pair_logps(self.engine, rows, self.plan.micro_batch) for split, rows in
                 (("train", self.train_rows), ("val", self.val_rows))}
        if self.topo.rank == 0:
            write_reference(directory, key, logps)
            self._say(f"[{self.plan.stage}] reference log-probabilities of {splits['train']} + {splits['val']} pairs "
                      f"computed and cached in {directory}")
        dist.barrier()
        return logps

    def objective(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, reference = batch
        chosen, rejected = split_sides(sequence_logps(self.engine, x, y))
        reference = reference.to(chosen.device)
        return dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], **self._settings())

    def _settings(self) -> dict:
        s = self.plan.settings
        return {"beta": s.beta, "loss": s.loss, "label_smoothing": s.label_smoothing}

    def train_step(self):
        return self.engine.train_step(self.batches, loss_of=self.objective)

    def train_metrics(self, out: dict, timer) -> dict:
        metrics = super().train_metrics(out, timer)
        metrics.update({f"train/{name}": value for name, value in zip(STATS, out["extras"])})
        return metrics

    def maybe_evaluate(self) -> dict:
        if not self._due(self.plan.settings.eval_every):
            return {}
        val = self.evaluate_pairs()
        if val:
            self.state.best_val_loss = min(self.state.best_val_loss, val["val/loss"])
        return val

    @torch.no_grad()
    def evaluate_pairs(self) -> dict:
        """Loss and rewards over the first eval_batches x micro_batch x data-parallel validation pairs."""
        plan, topo, n = self.plan, self.topo, len(self.val_rows)
        if n == 0:
            return {}
        self.engine.engine.eval()
        sums = torch.zeros(6, dtype=torch.float64)  # loss, chosen, rejected, margin, correct, pairs
        reference = torch.from_numpy(self.reference["val"])
        for indices, real in pair_rounds(n, plan.micro_batch, topo.dp, topo.dp_rank, plan.settings.eval_batches):
            chosen, rejected = split_sides(sequence_logps(self.engine, *pair_batch(self.val_rows, indices)).float())
            ref = reference[indices].to(chosen.device)
            losses, r_w, r_l = dpo_losses(chosen, rejected, ref[:, 0], ref[:, 1], **self._settings())
            keep = torch.from_numpy(real).to(chosen.device).double()
            parts = [losses, r_w, r_l, r_w - r_l, (r_w > r_l).float()]
            sums += torch.stack([(p.double() * keep).sum() for p in parts] + [keep.sum()]).cpu()
        reduced = sums.to(self.engine.reduce_device)
        dist.all_reduce(reduced)
        totals = reduced.tolist()
        count = max(totals[-1], 1)
        return {"val/loss": totals[0] / count, **{f"val/{name}": value / count for name, value in zip(STATS, totals[1:5])}}
