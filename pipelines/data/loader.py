"""Batches for training: fixed-length windows in a seeded shuffled order, sharded by rank.

Pretraining windows are `seq_len + 1` consecutive tokens at a stride of `seq_len`, shifted
by an offset in [0, seq_len) drawn per epoch, so a small corpus is not cut at the same
boundaries every epoch (which lets a model memorise tokens by position instead of learning
from context); SFT rows are the packed rows themselves, with their loss masks. Each epoch
visits the windows in a permutation; offset and permutation are fixed by (seed, epoch). At every step the next `micro_batch * dp_size` windows of
the permutation are taken and data-parallel rank r gets the r-th slice, so ranks see disjoint
windows; an epoch's remainder that cannot fill a whole step is skipped. The state (epoch,
position) is the same on every rank and is all a checkpoint needs for a resumed run to see
exactly the batches the uninterrupted run would have seen.

Packed rows hold several documents (pretraining: every document closed by end-of-text; SFT:
every conversation closed by end-of-text, then padding made of end-of-text). Opened with
`separate_documents`, a split keeps them apart: a batch is ((x, document_ids), y), where
document_ids (B, T) number the documents of each row, for the model to attend within a
document only and restart positions at each (model/gpt.py); without it a batch is (x, y) and
attention runs across the whole row. The ids are cut at end-of-text, which is exact: text is
encoded with `encode_ordinary` and the chat template places its own tokens by id, so
end-of-text occurs only where preparation closed a document.

Pipeline engines: the first and the last stage of a data-parallel rank build the same loader
(same rank, seed and state), so both see the same batches (inputs and labels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from model.errors import RelayError
from model.gpt import IGNORE_INDEX
from pipelines.data.shards import load_split, read_manifest, verify_shards


class TokenWindows:
    """Overlapping-by-one windows over a pretraining split's token stream."""

    shifts = True  # windows may start at an epoch's offset

    def __init__(self, tokens: np.ndarray, seq_len: int, document_end: int | None = None) -> None:
        """`document_end`: the end-of-text id, when documents are kept apart (see `to_batch`)."""
        self.tokens, self.seq_len, self.document_end = tokens, seq_len, document_end
        # Room is kept for any offset below seq_len, so every epoch has the same count.
        self.num_windows = max(0, (len(tokens) - 1 - (seq_len - 1)) // seq_len) if len(tokens) > 2 * seq_len else max(0, (len(tokens) - 1) // seq_len)
        self.max_offset = seq_len if len(tokens) > 2 * seq_len else 1

    def window(self, i: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        start = offset + i * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64), None


class PackedRows:
    """SFT rows (rows, seq_len + 1) with their loss masks."""

    shifts = False
    max_offset = 1

    def __init__(self, tokens, mask, row_len: int, document_end: int | None = None) -> None:
        """`tokens`, `mask`: the rows one after another (arrays, or shards read in place);
        `document_end`: the end-of-text id, when conversations are kept apart (see `to_batch`)."""
        flat = [np.reshape(a, -1) if isinstance(a, np.ndarray) else a for a in (tokens, mask)]
        self.tokens, self.mask, self.row_len = flat[0], flat[1], row_len
        self.document_end = document_end
        self.seq_len = row_len - 1
        self.num_windows = len(self.tokens) // row_len

    def window(self, i: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
        start = i * self.row_len
        return (np.asarray(self.tokens[start:start + self.row_len], dtype=np.int64),
                np.asarray(self.mask[start:start + self.row_len]))


def open_split(directory: str | Path, split: str, seq_len: int | None = None, verify: bool = True,
               separate_documents: bool = False):
    """Windows of a prepared data directory's split, read in place; `verify` runs the quick
    integrity check first (sizes and the manifest's digest: pipelines/data/shards.py).

    `separate_documents`: batches carry document ids, so packed documents stay apart."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise RelayError(f"{directory}: no manifest.json; prepare the data first (relaygpt data prepare)")
    if verify:
        verify_shards(directory, manifest)
    document_end = None
    if separate_documents:
        document_end = manifest.get("eot_id")
        if document_end is None:
            raise RelayError(f"{directory}: prepared by an older relaygpt that did not record the end-of-text id, which keeping "
                             "documents apart needs; re-run relaygpt data prepare")
    if manifest["kind"] == "sft":
        tokens = load_split(directory, manifest, split)
        mask = load_split(directory, manifest, split, key="mask_file")
        return PackedRows(tokens, mask, manifest["row_len"], document_end)
    if seq_len is None:
        raise ValueError("pretraining windows need seq_len")
    return TokenWindows(load_split(directory, manifest, split), seq_len, document_end)


def to_batch(windows, indices, offset: int = 0, document_end: int | None = None):
    """(x, y) LongTensors (B, T); y is IGNORE_INDEX where the mask excludes the target.

    With `document_end` (the end-of-text id that closes every document) the batch is
    ((x, document_ids), y): document_ids (B, T) count the documents closed before each token,
    and a document's end-of-text predicts nothing, as its target opens the next document."""
    rows, masks = zip(*(windows.window(int(i), offset) for i in indices))
    return windows_to_batch(rows, masks, document_end)


def windows_to_batch(rows, masks, document_end: int | None = None):
    """`to_batch` for windows already read (each a (tokens, mask or None) pair's parts)."""
    data = torch.from_numpy(np.stack(rows))
    x, y = data[:, :-1].contiguous(), data[:, 1:].clone()
    if masks[0] is not None:
        keep = torch.from_numpy(np.stack(masks)[:, 1:].astype(bool))
        y[~keep] = IGNORE_INDEX
    if document_end is None:
        return x, y
    ends = x == document_end  # (B, T) the last token of each document
    document_ids = ends.cumsum(dim=1) - ends.long()  # (B, T) documents closed before each token
    y[ends] = IGNORE_INDEX
    return (x, document_ids), y


@dataclass
class LoaderState:
    epoch: int = 0
    position: int = 0  # windows of this epoch's permutation already handed out (all ranks)


class BatchLoader:
    """Infinite iterator of this rank's micro-batches, resumable from `state_dict()`."""

    def __init__(self, windows, micro_batch: int, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> None:
        self.windows, self.micro_batch = windows, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.step_windows = micro_batch * dp_size
        if windows.num_windows < self.step_windows:
            raise RelayError(
                f"the data has {windows.num_windows} windows of {windows.seq_len} tokens, fewer than one step needs "
                f"(micro_batch {micro_batch} x data-parallel {dp_size}); add data or shrink the batch"
            )
        self.state = LoaderState()
        self._perm_epoch, self._perm = -1, None

    @property
    def steps_per_epoch(self) -> int:
        return self.windows.num_windows // self.step_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.windows.num_windows)
            self._offset = int(rng.integers(0, self.windows.max_offset))
            self._perm_epoch = epoch
        return self._perm

    @property
    def offset(self) -> int:
        """Where this epoch's windows start (0 for packed SFT rows)."""
        self._permutation(self.state.epoch)
        return self._offset

    def next_indices(self) -> np.ndarray:
        if self.state.position + self.step_windows > self.windows.num_windows:
            self.state = LoaderState(self.state.epoch + 1, 0)
        start = self.state.position + self.dp_rank * self.micro_batch
        indices = self._permutation(self.state.epoch)[start : start + self.micro_batch]
        self.state.position += self.step_windows
        return indices

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        indices = self.next_indices()
        return to_batch(self.windows, indices, self.offset, self.windows.document_end)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = LoaderState(int(state["epoch"]), int(state["position"]))


def source_windows(directory: str | Path, split: str, seq_len: int | None = None, separate_documents: bool = False):
    """[(name, weight, windows)] per source of a split whose shards are tagged by source (see
    pipelines/data/prepare.py), in source order; [] when the manifest does not tag them."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards = manifest["splits"][split]["shards"]
    if not shards or any("source" not in shard for shard in shards):
        return []
    document_end = manifest.get("eot_id") if separate_documents else None
    settings = manifest.get("sources", [])
    out = []
    for index in sorted({shard["source"] for shard in shards}):
        part = {**manifest, "splits": {split: {"shards": [sh for sh in shards if sh["source"] == index]}}}
        source = settings[index] if index < len(settings) else {}
        name = source_name(index, source)
        if manifest["kind"] == "sft":
            windows = PackedRows(load_split(directory, part, split), load_split(directory, part, split, key="mask_file"),
                                 manifest["row_len"], document_end)
        else:
            windows = TokenWindows(load_split(directory, part, split), seq_len, document_end)
        out.append((name, float(source.get("weight", 1.0)), windows))
    return out


def source_name(index: int, source: dict) -> str:
    """A short label for a source: its file's or dataset's name, prefixed by its position."""
    label = source.get("name") or Path(str(source.get("path") or source.get("type") or "source")).name
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "source"
    return f"{index}_{clean}"


def make_loader(directory: str | Path, windows, micro_batch: int, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                separate_documents: bool = False):
    """The training loader of a split: one stream over every window, or, when the sources carry
    different weights, a mixture that draws each window's source by probability."""
    parts = source_windows(directory, "train", windows.seq_len, separate_documents)
    if len(parts) < 2 or len({weight for _, weight, _ in parts}) == 1:
        return BatchLoader(windows, micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)
    return MixtureLoader(parts, micro_batch, dp_rank=dp_rank, dp_size=dp_size, seed=seed)


class MixtureLoader:
    """Micro-batches whose windows come from several sources, each drawn with probability
    proportional to weight x the source's tokens (a weight of 2 doubles a source's share of
    what the run sees, 0.5 halves it; equal weights are the sources' natural proportions).

    Applied after packing: every source keeps its own windows in its own seeded epochs. At step
    t the sources of the step's micro_batch x dp_size windows are drawn from a generator fixed
    by (seed, t), the same on every rank; each rank takes its slice, as BatchLoader does. The
    state (step, every source's epoch and position, the tokens served per source) is what a
    checkpoint keeps, so a resumed run sees the same windows."""

    def __init__(self, parts: list, micro_batch: int, *, dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> None:
        self.names = [name for name, _, _ in parts]
        self.micro_batch, self.dp_rank, self.dp_size, self.seed = micro_batch, dp_rank, dp_size, seed
        self.streams = []
        for i, (name, _, windows) in enumerate(parts):
            if windows.num_windows < 1:
                raise RelayError(f"data source {name}: fewer tokens than one window of {windows.seq_len}; add data to it or remove it")
            self.streams.append(BatchLoader(windows, 1, seed=seed * 1_000_003 + i + 1))
        shares = np.array([weight * w.num_windows for _, weight, w in parts], dtype=np.float64)
        self.target = shares / shares.sum()
        self.seq_len = parts[0][2].seq_len
        self.document_end = parts[0][2].document_end
        self.step, self.served = 0, np.zeros(len(parts), dtype=np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        rng = np.random.default_rng([self.seed, 7919, self.step])
        chosen = rng.choice(len(self.streams), size=self.micro_batch * self.dp_size, p=self.target)
        mine = range(self.dp_rank * self.micro_batch, (self.dp_rank + 1) * self.micro_batch)
        rows, masks = [], []
        for slot, source in enumerate(chosen):
            stream = self.streams[source]
            index = int(stream.next_indices()[0])  # every rank advances every source alike
            self.served[source] += 1
            if slot in mine:
                tokens, mask = stream.windows.window(index, stream.offset)
                rows.append(tokens)
                masks.append(mask)
        self.step += 1
        return windows_to_batch(rows, masks, self.document_end)

    def fractions(self) -> dict[str, float]:
        """The share of windows each source has given the run so far (all ranks together)."""
        total = max(1, int(self.served.sum()))
        return {name: float(n) / total for name, n in zip(self.names, self.served)}

    def state_dict(self) -> dict:
        return {"step": self.step, "served": self.served.tolist(), "sources": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("sources", [])) != len(self.streams):
            raise RelayError("the checkpoint's data state is for a different set of sources; start the stage afresh")
        self.step, self.served = int(state["step"]), np.asarray(state["served"], dtype=np.int64)
        for stream, saved in zip(self.streams, state["sources"]):
            stream.load_state_dict(saved)


def eval_batches(windows, micro_batch: int, *, dp_rank: int = 0, dp_size: int = 1, max_batches: int | None = None):
    """Validation batches in file order, disjoint across ranks; every rank yields the same count."""
    per_step = micro_batch * dp_size
    steps = windows.num_windows // per_step
    if max_batches is not None:
        steps = min(steps, max_batches)
    for step in range(steps):
        start = step * per_step + dp_rank * micro_batch
        yield to_batch(windows, range(start, start + micro_batch), document_end=windows.document_end)
