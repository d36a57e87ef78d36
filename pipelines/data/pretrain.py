"""Pretraining data: blocks of documents -> tokens -> per-block train / val shards -> one manifest.

The driver cuts the sources into blocks (pipelines/data/sources.py). Each block is read,
tokenized (tiktoken; end-of-text after every document, which is where the loader parts
documents) and written as its own shards by one worker: a Ray Data task on any node
(cluster/launch.py), or this process when there is no Ray. The driver then lists the shards in
(source, block) order in one manifest, so the token stream of a split is the documents in
source order. A shard holds documents of one source and carries its index ("source"); each
split counts documents and tokens per source. Every document is prepared once: a source's
`weight` is applied where training batches are drawn, not here.

The split is by document: a document goes to validation when a seeded hash of its text falls
below `val_fraction`, so it does not depend on source order, block or worker, and duplicates
never straddle it. When that leaves validation empty and there are two documents or more, the
document with the smallest hash goes there: the driver writes its block again with it forced.

Blocks depend only on the sources and `block_bytes`, and a block's shards only on its
documents, so 1, 2 or 40 workers write byte-identical shards and split tables. A worker holds
one batch of a block's text and tokens at a time; the driver holds one small result per block.
"""

from __future__ import annotations

import functools
import hashlib
import pickle
import struct
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from model.atomic import atomic_dir
from model.errors import RelayError
from model.tokenizer import Tokenizer
from pipelines.data.data_plan import DataPlan
from pipelines.data.records import block_documents
from pipelines.data.shards import ShardWriter, read_manifest, token_dtype, write_manifest
from pipelines.data.sources import SourceStats, plan_blocks, plan_source, source_label

SPLITS = ("train", "val")
BATCH_CHARS = 1 << 20  # text per tiktoken call
BATCH_DOCUMENTS = 4096
PROGRESS_EVERY_S = 5.0

# run_blocks(blocks, work, workers) -> results, as blocks finish (any order); each result gains "node".
RunBlocks = Callable[[Iterable[dict], Callable[..., dict], int], Iterator[dict]]


def split_draw(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the text and the seed."""
    return _draw(text.encode("utf-8", errors="surrogatepass"), seed)


def _draw(data: bytes, seed: int) -> float:
    digest = hashlib.blake2b(data, digest_size=8, key=struct.pack("<q", seed)).digest()
    return int.from_bytes(digest, "little") / 2**64


def validation_mask(draws: np.ndarray, val_fraction: float) -> np.ndarray:
    """Documents whose draw is below val_fraction; at least one when there are two or more."""
    val = draws < val_fraction
    if val_fraction > 0 and not val.any() and len(draws) >= 2:
        val[int(np.argmin(draws))] = True
    return val


@dataclass(frozen=True)
class BlockSettings:
    """What every block's worker needs (pickled to the workers)."""

    directory: str
    tokenizer: Tokenizer
    seed: int
    val_fraction: float
    shard_tokens: int

    # A Tokenizer pickles as where to load it from; a worker process loads it once for all its blocks.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "tokenizer": pickle.dumps(self.tokenizer)}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, tokenizer=_load_tokenizer(state["tokenizer"]))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(pickled: bytes) -> Tokenizer:
    return pickle.loads(pickled)


def _batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCUMENTS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode(tok: Tokenizer, texts: list[str], pool: ThreadPoolExecutor | None, threads: int) -> list[list[int]]:
    """Token ids of every text. tiktoken releases the GIL while it encodes, so the pool's threads
    share the work in contiguous chunks (its own batch call pays a thread-pool future per text,
    which cost more than the encoding on short documents)."""
    if pool is None or threads == 1 or len(texts) < 2 * threads:
        return [tok.encode(text) for text in texts]
    step = -(-len(texts) // threads)
    parts = pool.map(lambda chunk: [tok.encode(text) for text in chunk], [texts[i : i + step] for i in range(0, len(texts), step)])
    return [ids for part in parts for ids in part]


def tokenize_block(block: dict, settings: BlockSettings, pool: ThreadPoolExecutor | None = None, threads: int = 1) -> dict:
    """Read, tokenize and write one block: its shards `{split}_{source}_{block}_{n}.bin` in
    `settings.directory`, and what the manifest needs to know of them. `block["force_val"]`
    (a document's number in the block) sends that document to validation. `pool` (of
    `threads` threads) shares the tokenization; a Ray worker has one CPU and none."""
    tok = settings.tokenizer
    dtype = token_dtype(tok.n_vocab)
    stats, counts = SourceStats(), {"rows": 0}
    name = f"{block['source']:03d}_{block['index']:06d}"
    writers = {split: ShardWriter(Path(settings.directory), f"{split}_{name}", dtype, settings.shard_tokens) for split in SPLITS}
    splits = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
    forced, number, text_bytes, smallest = block.get("force_val"), 0, 0, None
    for batch in _batches(block_documents(block, stats, counts)):
        chosen: dict[str, list] = {split: [] for split in SPLITS}
        for text, ids in zip(batch, _encode(tok, batch, pool, threads)):
            data = text.encode("utf-8", errors="surrogatepass")
            draw = _draw(data, settings.seed)
            if smallest is None or draw < smallest[0]:
                smallest = [draw, number]
            chosen["val" if draw < settings.val_fraction or number == forced else "train"].append(ids)
            text_bytes += len(data)
            number += 1
        for split, docs in chosen.items():
            if docs:
                total = sum(map(len, docs)) + len(docs)
                writers[split].write(np.fromiter(chain.from_iterable(chain(d, (tok.eot_id,)) for d in docs), dtype=dtype, count=total))
                splits[split]["documents"] += len(docs)
                splits[split]["tokens"] += total
    for split in SPLITS:
        splits[split]["shards"] = writers[split].close()
    return {"source": block["source"], "index": block["index"], "rows": counts["rows"], "documents": number,
            "text_bytes": text_bytes, "replaced_bytes": stats.replaced_bytes, "smallest": smallest, "splits": splits}


def run_blocks_here(blocks: Iterable[dict], work: Callable[..., dict], workers: int) -> Iterator[dict]:
    """Blocks one after another in this process (no Ray), each tokenized by `workers` threads."""
    with ThreadPoolExecutor(workers) as pool:
        for block in blocks:
            yield {**work(block, pool=pool, threads=workers), "node": "local"}


def iter_documents(plan: DataPlan, stats: SourceStats) -> Iterator[str]:
    """Every pretraining document, in source order, read on this process a block at a time."""
    spec = plan.data.pretrain
    for block in plan_blocks(plan, spec.sources, "pretrain", spec.block_bytes, stats):
        yield from block_documents(block, stats, {"rows": 0})


class Progress:
    """Documents and tokens per second on the driver's console, at most every PROGRESS_EVERY_S."""

    def __init__(self, show: Callable[[str], None] | None, workers: int) -> None:
        self.show, self.workers = show, workers
        self.start = self.last = time.perf_counter()
        self.blocks = self.documents = self.tokens = 0

    def add(self, result: dict) -> dict:
        self.blocks += 1
        self.documents += result["documents"]
        self.tokens += sum(part["tokens"] for part in result["splits"].values())
        if self.show is not None and time.perf_counter() - self.last >= PROGRESS_EVERY_S:
            self.show(self.line())
            self.last = time.perf_counter()
        return result

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def line(self, done: bool = False) -> str:
        s = self.seconds
        return (f"pretrain: {'done, ' if done else ''}{self.blocks} block(s), {self.documents:,} documents ({self.documents / s:,.0f}/s), "
                f"{self.tokens:,} tokens ({self.tokens / s:,.0f}/s), {self.workers} worker(s), {s:.1f}s")


def prepare_pretrain(plan: DataPlan, tokenizer: Tokenizer, directory: Path, fingerprint: str, run_blocks: RunBlocks | None = None,
                     show: Callable[[str], None] | None = None) -> dict:
    """Write data/pretrain (or reuse it when the fingerprint matches); returns the manifest.
    `run_blocks` places the blocks' work (default: this process); `show` gets progress lines."""
    existing = read_manifest(directory)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "cached": True}
    spec, workers = plan.data.pretrain, plan.data.num_proc
    run_blocks = run_blocks or run_blocks_here
    stats = SourceStats()
    with atomic_dir(directory, durable=True) as tmp:
        settings = BlockSettings(str(tmp), tokenizer, plan.seed, spec.val_fraction, spec.shard_tokens)
        work = functools.partial(tokenize_block, settings=settings)
        blocks = plan_blocks(plan, spec.sources, "pretrain", spec.block_bytes, stats)
        first = next(blocks, None)  # a source that cannot be read fails here, before any Ray starts
        stream = run_blocks(chain([first], blocks), work, workers) if first is not None else iter(())
        progress = Progress(show, workers)  # from here: a Ray started for this is up
        results = sorted((progress.add(r) for r in stream), key=lambda r: (r["source"], r["index"]))
        _check_sources(spec.sources, results)
        results = _ensure_validation(plan, results, work, run_blocks, Path(tmp))
        splits = split_tables(results, len(spec.sources))
        if splits["train"]["tokens"] == 0:
            raise RelayError("data.pretrain: no training tokens after the split; add data or lower val_fraction")
        nodes = Counter(r["node"] for r in results)
        manifest = {
            "kind": "pretrain",
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.identity,
            "dtype": token_dtype(tokenizer.n_vocab).name,
            "eot_id": tokenizer.eot_id,
            "splits": splits,
            "sources": [s.model_dump(mode="json") for s in spec.sources],
            "stats": {"documents": sum(r["documents"] for r in results), "text_bytes": sum(r["text_bytes"] for r in results),
                      "replaced_bytes": sum(r["replaced_bytes"] for r in results), "files": stats.files, "blocks": len(results)},
            "num_workers": workers,
            "workers": [{"node": node, "blocks": nodes[node]} for node in sorted(nodes)],
            "throughput": {"seconds": round(progress.seconds, 3), "documents_per_s": round(progress.documents / progress.seconds, 1),
                           "tokens_per_s": round(progress.tokens / progress.seconds, 1)},
        }
        write_manifest(tmp, manifest)
    if show is not None:
        show(progress.line(done=True))
    return {**manifest, "cached": False}


def _check_sources(sources, results: list[dict]) -> None:
    """A source that gave no document is an error naming it."""
    documents, rows = Counter(), Counter()
    for r in results:
        documents[r["source"]] += r["documents"]
        rows[r["source"]] += r["rows"]
    for index, source in enumerate(sources):
        if documents[index]:
            continue
        label = source_label(source)
        if source.type == "text":
            raise RelayError(f"{label}: the file is empty")
        if not rows[index]:
            raise RelayError(f"{label}: the dataset is empty")
        raise RelayError(f"{label}: the dataset is empty (no text in field {source.field or 'text'!r})")


def _ensure_validation(plan: DataPlan, results: list[dict], work, run_blocks: RunBlocks, directory: Path) -> list[dict]:
    """At least one validation document when there are two or more: when none drew one, the
    block holding the smallest draw (the first, on a tie) is written again with that document
    sent to validation. The block is planned again from its source, deterministically."""
    spec = plan.data.pretrain
    if spec.val_fraction == 0 or sum(r["documents"] for r in results) < 2 or any(r["splits"]["val"]["documents"] for r in results):
        return results
    at = min((i for i, r in enumerate(results) if r["smallest"] is not None), key=lambda i: results[i]["smallest"][0])
    target = results[at]
    for part in target["splits"].values():
        for shard in part["shards"]:
            (directory / shard["file"]).unlink()
    source = spec.sources[target["source"]]
    block = next(b for b in plan_source(plan, target["source"], source, "pretrain", spec.block_bytes, SourceStats())
                 if b["index"] == target["index"])
    (redone,) = list(run_blocks([{**block, "force_val": target["smallest"][1]}], work, 1))
    return results[:at] + [redone] + results[at + 1:]


def split_tables(results: list[dict], num_sources: int) -> dict:
    """The manifest's splits: shards in (source, block) order, each tagged with its source, and
    documents and tokens per source."""
    splits = {}
    for split in SPLITS:
        per_source = [{"documents": 0, "tokens": 0} for _ in range(num_sources)]
        shards = []
        for r in results:
            part = r["splits"][split]
            per_source[r["source"]]["documents"] += part["documents"]
            per_source[r["source"]]["tokens"] += part["tokens"]
            shards += [{**shard, "source": r["source"]} for shard in part["shards"]]
        splits[split] = {"documents": sum(s["documents"] for s in per_source), "tokens": sum(s["tokens"] for s in per_source),
                         "shards": shards, "sources": per_source}
    return splits
