"""SFT data: conversations -> chat template (ids + loss mask) -> packed fixed-length rows.

Each conversation is rendered by `model.chat.render_chat` (the same template generation
uses) inside `datasets.map`, followed by an end-of-text separator outside the loss. Rows of
`seq_len + 1` tokens are filled greedily with whole conversations; the rest of a row is
padding outside the loss. A conversation longer than a row is truncated (counted); one left
with no supervised target is dropped (counted), as is one that does not end with an
assistant turn. The end-of-text id is recorded in the manifest: the loader cuts rows into
their conversations there (pipelines/data/loader.py), so that attention stays within each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.chat import render_chat
from model.errors import RelayError
from model.atomic import atomic_dir
from model.tokenizer import Tokenizer
from pipelines.data.chat_formats import FORMAT_KEYS, detect_format, map_columns, to_messages
from pipelines.data.pretrain import split_draw, validation_mask
from pipelines.data.shards import ShardWriter, read_manifest, token_dtype, write_manifest
from pipelines.data.sources import SourceStats, apply_weight, load_rows


def collect_conversations(job, stats: SourceStats, counts: dict) -> tuple[list[list[dict]], list[str]]:
    """Messages of every conversation of every SFT source, and the format used per source."""
    conversations, formats = [], []
    for i, source in enumerate(job.data.sft.sources):
        rows = apply_weight(load_rows(source, job, stats, role="sft"), source.weight, seed=job.seed + 100 + i)
        fields = source.fields or {}
        first = map_columns(rows.rows[0], fields, rows.where[0], check=fields) if fields else rows.rows[0]  # all mapped columns
        fmt = source.format if source.format != "auto" else detect_format(first, rows.where[0])
        formats.append(fmt)
        for row, where in zip(rows.rows, rows.where):
            messages = to_messages(map_columns(row, fields, where, check=FORMAT_KEYS[fmt]) if fields else row, fmt, where)
            if not messages or messages[-1]["role"] != "assistant":
                counts["dropped_no_assistant_turn"] += 1
                continue
            conversations.append(messages)
    return conversations, formats


def _render_batch(batch, tokenizer: Tokenizer, seed: int):
    ids_out, mask_out, draws = [], [], []
    for messages in batch["messages"]:
        ids, mask = render_chat(tokenizer, messages)
        ids_out.append(ids + [tokenizer.eot_id])
        mask_out.append(mask + [0])
        draws.append(split_draw("\x00".join(m["content"] for m in messages), seed))
    return {"ids": ids_out, "mask": mask_out, "draw": draws}


def pack_rows(conversations, row_len: int, pad_id: int, counts: dict) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of (ids, mask) pairs into (rows, row_len) token and mask arrays."""
    tokens_rows, mask_rows = [], []
    cur_ids: list[int] = []
    cur_mask: list[int] = []

    def flush():
        if cur_ids:
            pad = row_len - len(cur_ids)
            tokens_rows.append(cur_ids + [pad_id] * pad)
            mask_rows.append(cur_mask + [0] * pad)
            cur_ids.clear()
            cur_mask.clear()

    for ids, mask in conversations:
        if len(ids) > row_len:
            counts["truncated"] += 1
            ids, mask = ids[:row_len], mask[:row_len]
        if sum(mask[1:]) == 0:  # a target exists only from the second token on
            counts["dropped_no_supervised_tokens"] += 1
            continue
        if len(cur_ids) + len(ids) > row_len:
            flush()
        cur_ids += list(ids)
        cur_mask += list(mask)
    flush()
    if not tokens_rows:
        return np.zeros((0, row_len), dtype=np.int64), np.zeros((0, row_len), dtype=np.uint8)
    return np.asarray(tokens_rows, dtype=np.int64), np.asarray(mask_rows, dtype=np.uint8)


def prepare_sft(job, tokenizer: Tokenizer, directory: Path, fingerprint: str, seq_len: int) -> dict:
    """Write data/sft (or reuse it when the fingerprint matches); returns the manifest."""
    import datasets

    existing = read_manifest(directory)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "cached": True}
    spec = job.data.sft
    stats = SourceStats()
    counts = {"dropped_no_assistant_turn": 0, "truncated": 0, "dropped_no_supervised_tokens": 0}
    conversations, formats = collect_conversations(job, stats, counts)
    if not conversations:
        raise RelayError("data.sft: no conversation ends with an assistant turn; nothing to train on")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"messages": conversations})
    num_proc = max(1, min(job.data.num_proc, len(conversations)))
    ds = ds.map(_render_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                fn_kwargs={"tokenizer": tokenizer, "seed": job.seed}, remove_columns=["messages"])
    val = validation_mask(np.asarray(ds["draw"], dtype=np.float64), spec.val_fraction)
    ids_col, mask_col = ds["ids"], ds["mask"]
    row_len = seq_len + 1
    dtype = token_dtype(tokenizer.n_vocab)
    splits, totals = {}, {"tokens": 0, "supervised_tokens": 0}
    with atomic_dir(directory) as tmp:
        for name, keep in (("train", ~val), ("val", val)):
            chosen = [(ids_col[i], mask_col[i]) for i in np.flatnonzero(keep)]
            tokens, mask = pack_rows(chosen, row_len, tokenizer.eot_id, counts)
            token_writer = ShardWriter(tmp, f"{name}_tokens", dtype, 1 << 30)
            mask_writer = ShardWriter(tmp, f"{name}_mask", np.uint8, 1 << 30)
            token_writer.write(tokens.reshape(-1))
            mask_writer.write(mask.reshape(-1))
            shards = [{**t, "mask_file": m["file"], "mask_sha256": m["sha256"]} for t, m in zip(token_writer.close(), mask_writer.close())]
            supervised = int(mask[:, 1:].sum())
            splits[name] = {"conversations": int(keep.sum()), "rows": len(tokens), "tokens": int(tokens.size),
                            "supervised_tokens": supervised, "shards": shards}
            totals["tokens"] += int(tokens.size)
            totals["supervised_tokens"] += supervised
        if splits["train"]["supervised_tokens"] == 0:
            raise RelayError("data.sft: the training split has zero supervised (assistant) tokens")
        manifest = {
            "kind": "sft",
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.identity,
            "dtype": dtype.name,
            "eot_id": tokenizer.eot_id,  # closes every conversation and pads rows: where documents part
            "seq_len": seq_len,
            "row_len": row_len,
            "splits": splits,
            "sources": [s.model_dump(mode="json") for s in spec.sources],
            "formats": formats,
            "stats": {"conversations": len(conversations), **counts, **totals,
                      "supervised_fraction": totals["supervised_tokens"] / max(1, totals["tokens"]),
                      "replaced_bytes": stats.replaced_bytes, "files": stats.files},
        }
        write_manifest(tmp, manifest)
    return {**manifest, "cached": False}
