"""Pretraining data: documents -> datasets.map(tokenize) -> train / val token shards.

Every document is encoded with tiktoken's batch encoder inside `datasets.map(batched=True,
num_proc=N)` and followed by end-of-text. The split is by document: a document goes to
validation when a seeded hash of its text falls below `val_fraction`, so the split does not
depend on source order and duplicates never straddle it.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np

from model.errors import RelayError
from model.atomic import atomic_dir
from model.tokenizer import Tokenizer
from pipelines.data.shards import ShardWriter, read_manifest, token_dtype, write_manifest
from pipelines.data.sources import SourceStats, apply_weight, load_rows, text_field


def split_draw(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8, key=struct.pack("<q", seed)).digest()
    return int.from_bytes(digest, "little") / 2**64


def validation_mask(draws: np.ndarray, val_fraction: float) -> np.ndarray:
    """Documents whose draw is below val_fraction; at least one when there are two or more."""
    val = draws < val_fraction
    if val_fraction > 0 and not val.any() and len(draws) >= 2:
        val[int(np.argmin(draws))] = True
    return val


def _tokenize_batch(batch, tokenizer: Tokenizer, seed: int, threads: int):
    ids = tokenizer.encode_batch(batch["text"], num_threads=threads)
    dtype = token_dtype(tokenizer.n_vocab)
    eot = tokenizer.eot_id
    return {
        "ids": [np.fromiter((*x, eot), dtype=dtype, count=len(x) + 1) for x in ids],
        "draw": [split_draw(t, seed) for t in batch["text"]],
    }


def collect_documents(job, stats: SourceStats) -> list[str]:
    docs: list[str] = []
    for i, source in enumerate(job.data.pretrain.sources):
        rows = load_rows(source, job, stats, role="pretrain")
        weighted = apply_weight(rows, source.weight, seed=job.seed + i)
        docs += text_field(weighted, source)
    return docs


def tokenize_documents(docs: list[str], tokenizer: Tokenizer, num_proc: int, seed: int):
    """A datasets.Dataset with `ids` (tokens + end-of-text) and `draw` per document."""
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_dict({"text": docs})
    num_proc = max(1, min(num_proc, len(docs)))
    threads = 1 if num_proc > 1 else 4  # tiktoken's own threads would fight the processes
    return ds.map(_tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if num_proc > 1 else None,
                  fn_kwargs={"tokenizer": tokenizer, "seed": seed, "threads": threads}, remove_columns=["text"])


def write_token_splits(ds, directory: Path, tokenizer: Tokenizer, val_fraction: float, shard_tokens: int) -> dict:
    """Flatten the tokenized documents of each split into shards; the manifest's split table."""
    import pyarrow.compute as pc

    dtype = token_dtype(tokenizer.n_vocab)
    val = validation_mask(np.asarray(ds["draw"], dtype=np.float64), val_fraction)
    table = ds.with_format("arrow")[:]
    splits = {}
    for name, mask in (("train", ~val), ("val", val)):
        writer = ShardWriter(directory, name, dtype, shard_tokens)
        part = table.filter(mask)
        for chunk in part.column("ids").chunks:
            writer.write(pc.list_flatten(chunk).to_numpy(zero_copy_only=False))
        shards = writer.close()
        splits[name] = {"documents": int(mask.sum()), "tokens": sum(s["items"] for s in shards), "shards": shards}
    return splits


def prepare_pretrain(job, tokenizer: Tokenizer, directory: Path, fingerprint: str) -> dict:
    """Write data/pretrain (or reuse it when the fingerprint matches); returns the manifest."""
    existing = read_manifest(directory)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "cached": True}
    spec = job.data.pretrain
    stats = SourceStats()
    docs = collect_documents(job, stats)
    ds = tokenize_documents(docs, tokenizer, job.data.num_proc, job.seed)
    with atomic_dir(directory) as tmp:
        splits = write_token_splits(ds, tmp, tokenizer, spec.val_fraction, spec.shard_tokens)
        if splits["train"]["tokens"] == 0:
            raise RelayError("data.pretrain: no training tokens after the split; add data or lower val_fraction")
        manifest = {
            "kind": "pretrain",
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.identity,
            "dtype": token_dtype(tokenizer.n_vocab).name,
            "eot_id": tokenizer.eot_id,
            "splits": splits,
            "sources": [s.model_dump(mode="json") for s in spec.sources],
            "stats": {"documents": len(docs), "text_bytes": sum(len(d.encode("utf-8", "surrogatepass")) for d in docs),
                      "replaced_bytes": stats.replaced_bytes, "files": stats.files},
        }
        write_manifest(tmp, manifest)
    return {**manifest, "cached": False}
