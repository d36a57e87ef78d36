"""Pretraining preparation in blocks: the same shards whatever the number of workers or nodes.

A corpus of many small files, a JSONL file cut into several blocks, a blank-line text, a
Parquet file of several row groups and a CSV with quoted newlines, prepared in this process
(no Ray), by 1, 2 and 4 Ray Data workers on the session's Ray head, and by 2 workers on a
simulated two-node cluster: byte-identical shards and split tables every time.
"""

import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import relaygpt
from jobs.plan import data_plan
from jobs.spec import load_job
from model.errors import RelayError
from pipelines.data.pretrain import iter_documents, split_draw
from pipelines.data.shards import load_split, read_manifest
from pipelines.data.sources import SourceStats, csv_record_ranges, plan_blocks
from test_data import prepare, write_job

REPO = Path(__file__).resolve().parents[1]


def _paragraphs(shakespeare: str) -> list[str]:
    return [b.strip() for b in shakespeare.split("\n\n") if b.strip()]


def write_corpus(tmp_path: Path, shakespeare: str, shared_data: Path, **pretrain) -> Path:
    """A job whose pretraining sources cover every local kind, most of them in several blocks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = _paragraphs(shakespeare)
    files = tmp_path / "files"
    files.mkdir()
    for i in range(40):  # many small files, one document each
        (files / f"part{i:03d}.txt").write_text("\n\n".join(paragraphs[i * 5 : i * 5 + 5]))
    with open(tmp_path / "large.jsonl", "w") as f:  # ~ 300 KB: several blocks of 32 KiB
        for i, text in enumerate(paragraphs[200:2200]):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    (tmp_path / "stories.txt").write_text((shared_data / "pretrain" / "tinystories_sample.txt").read_text())
    pq.write_table(pa.table({"body": paragraphs[2200:2600]}), tmp_path / "rows.parquet", row_group_size=50)
    with open(tmp_path / "table.csv", "w") as f:
        f.write("id,content\n")
        for i, text in enumerate(paragraphs[2600:3400]):
            f.write(f'{i},"{text.replace(chr(34), chr(34) * 2)}"\n')  # quoted: newlines and quotes inside
    sources = [{"type": "text", "path": "files/*.txt"}, {"type": "json", "path": "large.jsonl"},
               {"type": "text", "path": "stories.txt", "split_by": "blank_line"},
               {"type": "parquet", "path": "rows.parquet", "field": "body"}, {"type": "csv", "path": "table.csv", "field": "content"}]
    return write_job(tmp_path, {"num_proc": 1, "pretrain": {"val_fraction": 0.05, "shard_tokens": 4096, "block_bytes": 32768,
                                                            "sources": sources, **pretrain}})


def expected_documents(tmp_path: Path, shakespeare: str, shared_data: Path) -> list[list[str]]:
    paragraphs = _paragraphs(shakespeare)
    stories = (shared_data / "pretrain" / "tinystories_sample.txt").read_text()
    return [["\n\n".join(paragraphs[i * 5 : i * 5 + 5]) for i in range(40)], paragraphs[200:2200],
            [b.strip() for b in re.split(r"\n[ \t\r\f\v]*\n", stories) if b.strip()], paragraphs[2200:2600], paragraphs[2600:3400]]


def shard_digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.bin"))}


def documents_of(directory: Path, manifest: dict, split: str, tok) -> list[tuple[int, str]]:
    """(source, text) of every document of a split, read back from each source's shards (a
    document may continue into the next shard of its block, never into another source's)."""
    out = []
    for source in sorted({s["source"] for s in manifest["splits"][split]["shards"]}):
        tokens = np.concatenate([np.fromfile(directory / s["file"], dtype=manifest["dtype"])
                                 for s in manifest["splits"][split]["shards"] if s["source"] == source])
        assert tokens[-1] == tok.eot_id  # the source's last shard ends with a whole document
        for document in np.split(tokens, np.flatnonzero(tokens == tok.eot_id) + 1)[:-1]:
            out.append((source, tok.decode(document[:-1])))
    return out


# ---- reading in blocks --------------------------------------------------------------------

def test_blank_line_blocks_give_the_documents_of_the_whole_file(tmp_path, monkeypatch):
    """However a text is cut into blocks (and read in chunks), its documents are those re.split
    gives on the whole text."""
    from pipelines.data import records

    monkeypatch.setattr(records, "READ_CHUNK", 64)
    rng = random.Random(0)
    pieces = ["word", "é", " ", "\t", "\r", "\n", "\n", "\n\n", "\n \n", "\n\t\r\n", "\u3000", "\x0b", "\n\u3000\n"]
    for trial in range(6):
        text = "".join(rng.choice(pieces) for _ in range(12_000))
        (tmp_path / f"t{trial}.txt").write_text(text)
        path = write_job(tmp_path, {"pretrain": {"block_bytes": 4096, "sources": [
            {"type": "text", "path": f"t{trial}.txt", "split_by": "blank_line"}]}}, name=f"t{trial}")
        job = load_job(path)
        assert len(list(plan_blocks(data_plan(job), job.data.pretrain.sources, "pretrain", 4096, SourceStats()))) >= 5
        docs = list(iter_documents(data_plan(job), SourceStats()))
        assert docs == [b.strip() for b in re.split(r"\n[ \t\r\f\v]*\n", text) if b.strip()]


def test_lines_are_read_a_chunk_at_a_time_exactly(tmp_path, monkeypatch):
    """Lines longer than a chunk, invalid UTF-8 and multi-byte characters across chunks read as
    decoding the whole range would, with the same replaced bytes."""
    from pipelines.data import records
    from pipelines.data.text import decode_counting

    monkeypatch.setattr(records, "READ_CHUNK", 7)
    rng = random.Random(1)
    data = b"".join(rng.choice([b"a", b"\n", b"\n\n", "é€".encode(), b"\xff", b"\xe2\x82", b"a long line " * 3, b"\r\n"])
                    for _ in range(3000))
    (tmp_path / "t.bin").write_bytes(data)
    for start, end in [(0, len(data)), (1, len(data) - 1), (100, 2000), (len(data) // 2, len(data))]:
        stats, expected_stats = SourceStats(), SourceStats()
        assert list(records.lines(str(tmp_path / "t.bin"), start, end, stats)) == decode_counting(data[start:end], expected_stats).split("\n")
        assert stats.replaced_bytes == expected_stats.replaced_bytes > 0


def test_a_malformed_line_deep_in_a_large_jsonl_names_its_line(tmp_path):
    lines = [json.dumps({"text": f"record number {i} " * 5}) for i in range(2000)]
    lines[1499] = '{"text": "cut off'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    path = write_job(tmp_path, {"pretrain": {"block_bytes": 4096, "sources": [{"type": "json", "path": "big.jsonl"}]}})
    with pytest.raises(RelayError, match=r"big\.jsonl:1500: malformed JSON line"):
        prepare(path)


def test_csv_is_cut_between_records_only(tmp_path):
    import pyarrow.csv as pv

    rows = [f'{i},"line one of {i}\nline ""two"" of {i}",x' for i in range(3000)]
    (tmp_path / "t.csv").write_text("id,text,other\n" + "\n".join(rows) + "\n")
    header_end, ranges = csv_record_ranges(tmp_path / "t.csv", 4096)
    ends = list(np.cumsum([header_end] + [len(r) + 1 for r in rows]))  # where each record starts (ASCII text)
    assert header_end == len("id,text,other\n") and len(ranges) > 10 and ranges[-1][1] == ends[-1]
    for start, end, first_row in ranges:  # cut between records only, each knowing its first row
        assert start in ends and end in ends and first_row == ends.index(start)
    path = write_job(tmp_path, {"pretrain": {"block_bytes": 4096, "sources": [{"type": "csv", "path": "t.csv", "field": "text"}]}})
    docs = list(iter_documents(data_plan(load_job(path)), SourceStats()))
    assert docs == pv.read_csv(tmp_path / "t.csv").column("text").to_pylist()


def test_a_hub_dataset_is_streamed_a_block_at_a_time(tmp_path, monkeypatch, shakespeare):
    """Hub sources are read with streaming=True, never as a whole dataset, for pretraining and SFT."""
    import datasets

    paragraphs = _paragraphs(shakespeare)[:600]

    class Stream:  # what load_dataset(streaming=True) returns: an iterable without length or to_list
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    def load_dataset(name, config=None, split=None, streaming=False):
        assert streaming and split == "train"
        if name == "chats":
            return Stream([{"prompt": f"Say {t[:20]}", "response": t} for t in paragraphs[:100]])
        return Stream([{"text": t, "id": i} for i, t in enumerate(paragraphs)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.0, "block_bytes": 8192, "sources": [{"type": "hub", "name": "corpus"}]},
                                "sft": {"val_fraction": 0.0, "sources": [{"type": "hub", "name": "chats"}]}})
    job, out = prepare(path)
    m = out["pretrain"]
    assert m["stats"]["blocks"] > 5 and m["stats"]["documents"] == len(paragraphs)
    assert [text for _, text in documents_of(job.run_dir() / "data" / "pretrain", m, "train", out["tokenizer"])] == paragraphs
    assert out["sft"]["formats"] == ["prompt_response"] and out["sft"]["stats"]["conversations"] == 100


# ---- the split, sources and determinism -----------------------------------------------------

def test_at_least_one_validation_document_whatever_the_blocks(tmp_path):
    texts = [f"Document number {i}: " + "lorem ipsum " * 400 for i in range(30)]
    for i, text in enumerate(texts):
        (tmp_path / f"d{i:02d}.txt").write_text(text)
    draws = [split_draw(t, 7) for t in texts]
    fraction = min(draws) / 2  # no document draws validation on its own
    smallest = texts[int(np.argmin(draws))]
    tables = []
    for block_bytes in (1 << 20, 4096):  # one block, or a block per document or two
        path = write_job(tmp_path, {"pretrain": {"val_fraction": fraction, "block_bytes": block_bytes,
                                                 "sources": [{"type": "text", "path": "d*.txt"}]}}, name=f"b{block_bytes}", seed=7)
        job, out = prepare(path)
        m = out["pretrain"]
        assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 29
        val = load_split(job.run_dir() / "data" / "pretrain", m, "val")
        assert out["tokenizer"].decode(val[:-1]) == smallest
        tables.append(m)
    assert tables[0]["stats"]["blocks"] == 1 and tables[1]["stats"]["blocks"] == 30
    # The block written again left no shard of its first writing behind.
    assert set(shard_digests(job.run_dir() / "data" / "pretrain")) == {s["file"] for t in tables[1]["splits"].values() for s in t["shards"]}


def test_shards_hold_one_source_each_and_every_document_once(tmp_path, shakespeare, shared_data):
    path = write_corpus(tmp_path, shakespeare, shared_data)
    job, out = prepare(path)
    m, tok = out["pretrain"], out["tokenizer"]
    directory = job.run_dir() / "data" / "pretrain"
    expected = expected_documents(tmp_path, shakespeare, shared_data)
    assert m["stats"]["blocks"] > 15
    seen = [[] for _ in expected]
    for split in ("train", "val"):
        table = m["splits"][split]
        per_source = [{"documents": 0, "tokens": 0} for _ in expected]
        for source, text in documents_of(directory, m, split, tok):
            seen[source].append(text)
            per_source[source]["documents"] += 1
            per_source[source]["tokens"] += len(tok.encode(text)) + 1
        assert table["sources"] == per_source
        assert table["documents"] == sum(s["documents"] for s in per_source) and table["tokens"] == sum(s["tokens"] for s in per_source)
        assert all(0 < s["items"] <= 4096 for s in table["shards"])
        assert [s["source"] for s in table["shards"]] == sorted(s["source"] for s in table["shards"])
    for source, docs in enumerate(expected):  # every document once, in its own source's shards
        assert sorted(seen[source]) == sorted(docs), source
    assert m["splits"]["val"]["documents"] > 0 and m["workers"] == [{"node": "local", "blocks": m["stats"]["blocks"]}]


def test_sft_shards_are_tagged_and_counted_by_source(tmp_path, shared_data):
    path = write_job(tmp_path, {"sft": {"val_fraction": 0.1, "sources": [
        {"type": "json", "path": str(shared_data / "instruct" / "alpaca_demo.json"), "weight": 3.0},
        {"type": "json", "path": str(shared_data / "instruct" / "prompt_response_demo.jsonl"), "weight": 0.5}]}})
    job, out = prepare(path)
    m = out["sft"]
    assert m["formats"] == ["alpaca", "prompt_response"]
    assert sum(t["sources"][0]["documents"] for t in m["splits"].values()) == 999  # once each, whatever the weight
    assert sum(t["sources"][1]["documents"] for t in m["splits"].values()) == 1000
    for table in m["splits"].values():
        assert {s["source"] for s in table["shards"]} == {0, 1}
        for key in ("rows", "tokens", "supervised_tokens"):
            assert table[key] == sum(s[key] for s in table["sources"])
        for shard in table["shards"]:
            assert shard["items"] == table["sources"][shard["source"]]["tokens"]


@pytest.mark.slow
def test_one_two_and_four_workers_write_identical_shards(ray_head, tmp_path, shakespeare, shared_data):
    path = write_corpus(tmp_path, shakespeare, shared_data)
    job, out = prepare(path)  # this process, no Ray
    reference = out["pretrain"]
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}
    for workers in (1, 2, 4):
        proc = relaygpt("data", "prepare", path, "--run-id", f"w{workers}", "--set", f"data.num_proc={workers}", env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert re.search(r"pretrain: done, \d+ block\(s\), [\d,]+ documents \([\d,]+/s\), [\d,]+ tokens \([\d,]+/s\)", proc.stdout)
        assert proc.stderr.strip() == "", proc.stderr
        directory = job.run_dir(f"w{workers}") / "data" / "pretrain"
        manifest = read_manifest(directory)
        assert manifest["splits"] == reference["splits"] and manifest["num_workers"] == workers
        assert sum(w["blocks"] for w in manifest["workers"]) == reference["stats"]["blocks"]
        assert shard_digests(directory) == shard_digests(job.run_dir() / "data" / "pretrain")


@pytest.mark.slow
def test_two_nodes_prepare_the_shards_of_one_worker(tmp_path, shakespeare, shared_data):
    path = write_corpus(tmp_path, shakespeare, shared_data)
    job, out = prepare(path)  # one worker, this process
    run = tmp_path / "cluster-run"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "prepare_two_nodes.py"), str(path), str(run)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    result_lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result_lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    nodes = set(json.loads(result_lines[0][len("RESULT "):])["nodes"])
    manifest = read_manifest(run / "data" / "pretrain")
    ran = {w["node"]: w["blocks"] for w in manifest["workers"]}
    assert len(nodes) == 2 and set(ran) == nodes and all(ran.values()), (ran, nodes)
    assert manifest["num_workers"] == 2 and manifest["splits"] == out["pretrain"]["splits"]
    assert shard_digests(run / "data" / "pretrain") == shard_digests(job.run_dir() / "data" / "pretrain")
