"""SFT data: conversations -> chat template (ids + loss mask) -> packed fixed-length rows.

Each source is streamed on the driver, a block of records at a time (a hub dataset too), and
every conversation is rendered by `model.chat.render_chat` (the same template generation
uses), followed by an end-of-text separator outside the loss. Rows of `seq_len + 1` tokens are
filled greedily with whole conversations of one source and written as they fill; the rest of
a row is padding outside the loss. Shards hold one source's rows and carry its index
("source"); each split counts conversations, rows and tokens per source. Every conversation
is prepared once: a source's `weight` is applied where training batches are drawn.

A conversation longer than a row is truncated (counted); one left with no supervised target
is dropped (counted), as is one that does not end with an assistant turn. The split is by
conversation, as for pretraining (a seeded hash of its text), with at least one validation
conversation when there are two or more: when none drew one, the source holding the smallest
draw is packed again with it forced. The end-of-text id is recorded in the manifest: the loader
cuts rows into their conversations there (pipelines/data/loader.py), so that attention stays
within each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from model.atomic import atomic_dir
from model.chat import render_chat
from model.errors import RelayError
from model.tokenizer import Tokenizer
from pipelines.data.chat_formats import FORMAT_KEYS, detect_format, map_columns, to_messages
from pipelines.data.data_plan import DataPlan
from pipelines.data.pretrain import SPLITS, split_draw
from pipelines.data.records import read_records
from pipelines.data.shards import ShardWriter, read_manifest, token_dtype, write_manifest
from pipelines.data.sources import DEFAULT_BLOCK_BYTES, SourceStats, plan_source, source_label

ROWS_PER_WRITE = 256
COUNTS = ("dropped_no_assistant_turn", "truncated", "dropped_no_supervised_tokens")


class RowPacker:
    """Greedy packing of (ids, mask) conversations into rows of `row_len`, padded with `pad_id`
    outside the loss; a completed row goes to `emit(tokens, mask)`."""

    def __init__(self, row_len: int, pad_id: int, counts: dict, emit: Callable[[list, list], None]) -> None:
        self.row_len, self.pad_id, self.counts, self.emit = row_len, pad_id, counts, emit
        self.ids: list[int] = []
        self.mask: list[int] = []

    def add(self, ids: list[int], mask: list[int]) -> None:
        if len(ids) > self.row_len:
            self.counts["truncated"] += 1
            ids, mask = ids[: self.row_len], mask[: self.row_len]
        if sum(mask[1:]) == 0:  # a target exists only from the second token on
            self.counts["dropped_no_supervised_tokens"] += 1
            return
        if len(self.ids) + len(ids) > self.row_len:
            self.flush()
        self.ids += ids
        self.mask += mask

    def flush(self) -> None:
        if self.ids:
            pad = self.row_len - len(self.ids)
            self.emit(self.ids + [self.pad_id] * pad, self.mask + [0] * pad)
            self.ids, self.mask = [], []


def pack_rows(conversations, row_len: int, pad_id: int, counts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of (ids, mask) pairs into (rows, row_len) token and mask arrays."""
    tokens_rows, mask_rows = [], []
    packer = RowPacker(row_len, pad_id, counts, lambda t, m: (tokens_rows.append(t), mask_rows.append(m)))
    for ids, mask in conversations:
        packer.add(list(ids), list(mask))
    packer.flush()
    if not tokens_rows:
        return np.zeros((0, row_len), dtype=np.int64), np.zeros((0, row_len), dtype=np.uint8)
    return np.asarray(tokens_rows, dtype=np.int64), np.asarray(mask_rows, dtype=np.uint8)


class _SplitWriter:
    """One source's rows of one split: token and mask shards, written ROWS_PER_WRITE rows at a time."""

    def __init__(self, directory: Path, split: str, source: int, dtype: np.dtype) -> None:
        self.source = source
        self.tokens = ShardWriter(directory, f"{split}_tokens_{source:03d}", dtype, 1 << 30)
        self.masks = ShardWriter(directory, f"{split}_mask_{source:03d}", np.uint8, 1 << 30)
        self.pending: list[tuple[list, list]] = []
        self.counts = {"documents": 0, "rows": 0, "tokens": 0, "supervised_tokens": 0}

    def row(self, tokens: list, mask: list) -> None:
        self.pending.append((tokens, mask))
        if len(self.pending) >= ROWS_PER_WRITE:
            self.write()

    def write(self) -> None:
        if self.pending:
            tokens = np.asarray([t for t, _ in self.pending], dtype=np.int64)
            mask = np.asarray([m for _, m in self.pending], dtype=np.uint8)
            self.tokens.write(tokens.reshape(-1))
            self.masks.write(mask.reshape(-1))
            self.counts["rows"] += len(tokens)
            self.counts["tokens"] += int(tokens.size)
            self.counts["supervised_tokens"] += int(mask[:, 1:].sum())
            self.pending = []

    def close(self) -> list[dict]:
        self.write()
        return [{**t, "mask_file": m["file"], "mask_sha256": m["sha256"], "source": self.source}
                for t, m in zip(self.tokens.close(), self.masks.close())]


def iter_records(plan: DataPlan, index: int, source, stats: SourceStats) -> Iterator[tuple[object, object]]:
    """(record, where) of one source, streamed a block at a time."""
    for block in plan_source(plan, index, source, "sft", DEFAULT_BLOCK_BYTES, stats):
        yield from read_records(block, stats)


def conversations(plan: DataPlan, index: int, source, stats: SourceStats, counts: dict, found: dict) -> Iterator[list[dict]]:
    """The messages of every conversation of a source that ends with an assistant turn; the
    source's format (read from its first record) goes to found["format"]."""
    fields, fmt = source.fields or {}, None
    for row, where in iter_records(plan, index, source, stats):
        if fmt is None:  # all mapped columns must be in the first record; the format is read from it
            first = map_columns(row, fields, where, check=fields) if fields else row
            fmt = found["format"] = source.format if source.format != "auto" else detect_format(first, where)
        messages = to_messages(map_columns(row, fields, where, check=FORMAT_KEYS[fmt]) if fields else row, fmt, where)
        if not messages or messages[-1]["role"] != "assistant":
            counts["dropped_no_assistant_turn"] += 1
            continue
        yield messages
    if fmt is None:
        raise RelayError(f"{source_label(source)}: the dataset is empty")


def prepare_source(plan: DataPlan, index: int, tokenizer: Tokenizer, directory: Path, row_len: int, force_val: int | None = None) -> dict:
    """Render, split and pack one SFT source into its shards; its counts, shards and smallest draw.
    `force_val` (a conversation's number) sends that conversation to validation."""
    source, spec = plan.data.sft.sources[index], plan.data.sft
    stats, counts = SourceStats(), dict.fromkeys(COUNTS, 0)
    writers = {split: _SplitWriter(directory, split, index, token_dtype(tokenizer.n_vocab)) for split in SPLITS}
    packers = {split: RowPacker(row_len, tokenizer.eot_id, counts, writers[split].row) for split in SPLITS}
    number, smallest, found = 0, None, {}
    for messages in conversations(plan, index, source, stats, counts, found):
        draw = split_draw("\x00".join(m["content"] for m in messages), plan.seed)
        if smallest is None or draw < smallest[0]:
            smallest = [draw, number]
        split = "val" if draw < spec.val_fraction or number == force_val else "train"
        ids, mask = render_chat(tokenizer, messages)
        packers[split].add(ids + [tokenizer.eot_id], mask + [0])
        writers[split].counts["documents"] += 1
        number += 1
    splits = {}
    for split in SPLITS:
        packers[split].flush()
        shards = writers[split].close()
        splits[split] = {**writers[split].counts, "shards": shards}
    return {"source": index, "format": found["format"], "documents": number, "smallest": smallest, "counts": counts,
            "replaced_bytes": stats.replaced_bytes, "files": stats.files, "splits": splits}


def _ensure_validation(plan: DataPlan, results: list[dict], tokenizer: Tokenizer, directory: Path, row_len: int) -> list[dict]:
    """At least one validation conversation when there are two or more (see the module's docstring)."""
    if plan.data.sft.val_fraction == 0 or sum(r["documents"] for r in results) < 2 \
            or any(r["splits"]["val"]["documents"] for r in results):
        return results
    at = min((i for i, r in enumerate(results) if r["smallest"] is not None), key=lambda i: results[i]["smallest"][0])
    for part in results[at]["splits"].values():
        for shard in part["shards"]:
            (directory / shard["file"]).unlink()
            (directory / shard["mask_file"]).unlink()
    redone = prepare_source(plan, at, tokenizer, directory, row_len, force_val=results[at]["smallest"][1])
    return results[:at] + [redone] + results[at + 1:]


def _split_tables(results: list[dict]) -> dict:
    splits = {}
    for split in SPLITS:
        per_source = [{k: v for k, v in r["splits"][split].items() if k != "shards"} for r in results]
        splits[split] = {"conversations": sum(s["documents"] for s in per_source), "rows": sum(s["rows"] for s in per_source),
                         "tokens": sum(s["tokens"] for s in per_source),
                         "supervised_tokens": sum(s["supervised_tokens"] for s in per_source),
                         "shards": [shard for r in results for shard in r["splits"][split]["shards"]], "sources": per_source}
    return splits


def prepare_sft(plan: DataPlan, tokenizer: Tokenizer, directory: Path, fingerprint: str, seq_len: int) -> dict:
    """Write data/sft (or reuse it when the fingerprint matches); returns the manifest."""
    existing = read_manifest(directory)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "cached": True}
    spec = plan.data.sft
    row_len = seq_len + 1
    with atomic_dir(directory, durable=True) as tmp:
        results = [prepare_source(plan, i, tokenizer, Path(tmp), row_len) for i in range(len(spec.sources))]
        if not sum(r["documents"] for r in results):
            raise RelayError("data.sft: no conversation ends with an assistant turn; nothing to train on")
        results = _ensure_validation(plan, results, tokenizer, Path(tmp), row_len)
        splits = _split_tables(results)
        if splits["train"]["supervised_tokens"] == 0:
            raise RelayError("data.sft: the training split has zero supervised (assistant) tokens")
        counts = {k: sum(r["counts"][k] for r in results) for k in COUNTS}
        totals = {k: sum(splits[s][k] for s in SPLITS) for k in ("tokens", "supervised_tokens")}
        manifest = {
            "kind": "sft",
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.identity,
            "dtype": token_dtype(tokenizer.n_vocab).name,
            "eot_id": tokenizer.eot_id,  # closes every conversation and pads rows: where documents part
            "seq_len": seq_len,
            "row_len": row_len,
            "splits": splits,
            "sources": [s.model_dump(mode="json") for s in spec.sources],
            "formats": [r["format"] for r in results],
            "stats": {"conversations": sum(r["documents"] for r in results), **counts, **totals,
                      "supervised_fraction": totals["supervised_tokens"] / max(1, totals["tokens"]),
                      "replaced_bytes": sum(r["replaced_bytes"] for r in results), "files": [f for r in results for f in r["files"]]},
        }
        write_manifest(tmp, manifest)
    return {**manifest, "cached": False}
