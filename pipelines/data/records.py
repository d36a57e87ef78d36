"""Reading one block (pipelines/data/sources.py): its records, streamed, wherever it runs.

A block is read a piece at a time (a few MiB of a byte range, a Parquet batch), so what a
reader holds does not depend on the block's size, except for a document that is a whole
file and a JSON array, which must be read whole. Every record comes with where it came from,
for messages: `file:line` for JSON lines (the line is counted only when a message needs it,
so a worker reading the middle of a large file never counts the lines before it), `file row
N` for Parquet and CSV, `file record N` for a JSON array.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterator

from model.errors import RelayError
from pipelines.data.text import SourceStats, decode_counting, read_csv, read_text

READ_CHUNK = 1 << 20
PARQUET_BATCH = 4096


class Line:
    """`file:line` of a line of a byte range, its number counted when first shown."""

    __slots__ = ("path", "start", "line")

    def __init__(self, path: str, start: int, line: int) -> None:
        self.path, self.start, self.line = path, start, line

    def __str__(self) -> str:
        return f"{self.path}:{lines_before(self.path, self.start) + self.line}"


class Row:
    """`<label> N`: a row of a table, a record of a JSON array or of an inline block."""

    __slots__ = ("label", "row")

    def __init__(self, label: str, row: int) -> None:
        self.label, self.row = label, row

    def __str__(self) -> str:
        return f"{self.label} {self.row}"


@functools.lru_cache(maxsize=64)
def lines_before(path: str, offset: int) -> int:
    """Newlines in the first `offset` bytes of a file."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0 and (chunk := f.read(min(READ_CHUNK, offset))):
            count += chunk.count(b"\n")
            offset -= len(chunk)
    return count


def read_records(block: dict, stats: SourceStats) -> Iterator[tuple[object, object]]:
    """(record, where) for every record of a block, in order. Text sources give documents."""
    reader = {"text": _text, "json": _json, "parquet": _parquet, "csv": _csv}.get(block["type"], _inline)
    for part in block["parts"]:
        yield from reader(block, part, stats)


def block_documents(block: dict, stats: SourceStats, counts: dict) -> Iterator[str]:
    """The pretraining documents of a block: text, or the `field` of every record; counts
    the records read ("rows") in `counts`."""
    name = block["field"] or "text"
    for record, where in read_records(block, stats):
        counts["rows"] += 1
        if block["type"] == "text":
            yield record
            continue
        if not isinstance(record, dict) or name not in record:
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise RelayError(f"{where}: no field {name!r} (fields: {fields}); set 'field:' on the source")
        value = record[name]
        if value is None:
            continue
        if not isinstance(value, str):
            raise RelayError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
        if value.strip():
            yield value


def lines(path: str, start: int, end: int, stats: SourceStats, encoding: str = "utf-8") -> Iterator[str]:
    """The lines of bytes [start, end) of a file, as `text.split("\\n")` gives them, decoded a
    chunk at a time (each chunk cut after a newline)."""
    with open(path, "rb") as f:
        f.seek(start)
        left, pending = end - start, []
        while left > 0 and (chunk := f.read(min(READ_CHUNK, left))):
            left -= len(chunk)
            cut = chunk.rfind(b"\n") + 1 if left > 0 else len(chunk)
            if not cut:
                pending.append(chunk)  # a line longer than a chunk: joined once it ends
                continue
            pieces = decode_counting(b"".join(pending) + chunk[:cut], stats, encoding).split("\n")
            pending = [chunk[cut:]]
            if left > 0:
                pieces.pop()  # the empty string after the chunk's last newline
            yield from pieces
        rest = b"".join(pending)
        if rest:  # the file was shorter than planned
            yield from decode_counting(rest, stats, encoding).split("\n")


def _text(block: dict, part: dict, stats: SourceStats) -> Iterator[tuple[str, str]]:
    path = part["path"]
    if "start" not in part:  # split_by: file
        text = read_text(Path(path), stats, block.get("encoding", "utf-8"))
        if text.strip():
            yield text, path
        return
    # split_by: blank_line. A document is a run of lines that are not blank (spaces only),
    # stripped: exactly the pieces re.split(r"\n[ \t\r\f\v]*\n", text) gives once stripped,
    # and blocks are cut after a blank line, so no document straddles two.
    run: list[str] = []
    for line in lines(path, part["start"], part["end"], stats, block.get("encoding", "utf-8")):
        if line.strip(" \t\r\f\v"):
            run.append(line)
        elif run:
            doc = "\n".join(run).strip()
            run = []
            if doc:
                yield doc, path
    doc = "\n".join(run).strip()
    if doc:
        yield doc, path


def _json(block: dict, part: dict, stats: SourceStats) -> Iterator[tuple[object, object]]:
    path = part["path"]
    if part.get("array"):
        text = read_text(Path(path), stats, block.get("encoding", "utf-8"))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RelayError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list):
            raise RelayError(f"{path}: expected a JSON array of records (or JSONL, one record per line)")
        for i, record in enumerate(data):
            yield record, Row(f"{path} record", i)
        return
    for n, line in enumerate(lines(path, part["start"], part["end"], stats, block.get("encoding", "utf-8")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RelayError(f"{Line(path, part['start'], n)}: malformed JSON line ({exc.msg} at column {exc.colno})") from None
        yield record, Line(path, part["start"], n)


def _parquet(block: dict, part: dict, stats: SourceStats) -> Iterator[tuple[object, object]]:
    import pyarrow.parquet as pq

    path, row = part["path"], part["first_row"]
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH, row_groups=[part["row_group"]], columns=block["columns"])
        for batch in batches:
            for record in batch.to_pylist():
                yield record, Row(f"{path} row", row)
                row += 1
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise RelayError(f"{block['label']}: cannot read as parquet ({type(exc).__name__}: {str(exc)[:160]})") from None


def _csv(block: dict, part: dict, stats: SourceStats) -> Iterator[tuple[object, object]]:
    path = part["path"]
    with open(path, "rb") as f:
        header = f.read(part["header_end"])
        f.seek(part["start"])
        data = f.read(part["end"] - part["start"])
    # The header's replaced bytes count once, with the file's first block.
    encoding = block.get("encoding", "utf-8")
    header_text = decode_counting(header, stats if part["start"] == part["header_end"] else SourceStats(), encoding)
    names = read_csv(header_text, None, block["label"]).column_names
    table = read_csv(header_text + decode_counting(data, stats, encoding), block["columns"], block["label"], names)
    row = part["first_row"]
    for batch in table.to_batches(max_chunksize=PARQUET_BATCH):
        for record in batch.to_pylist():
            yield record, Row(f"{path} row", row)
            row += 1


def _inline(block: dict, part: dict, stats: SourceStats) -> Iterator[tuple[object, object]]:
    for i, record in enumerate(part["records"]):
        yield record, Row(block["row_label"], part["first_row"] + i)
