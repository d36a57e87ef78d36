"""Data sources, cut into blocks: the units of work of preparation.

Every source (local text / JSON / JSONL / Parquet / CSV files, a hub dataset, the demo world)
becomes a sequence of blocks, in source order. A block is a small JSON-able dict saying what to
read: whole files, byte ranges of a large text / JSONL / CSV file (cut at a document or record
boundary), Parquet row groups, or records carried inline (streamed from the hub, or
generated). Blocks are packed up to `block_bytes` of input. How a source is cut depends only
on its contents and `block_bytes`, never on how many workers read the blocks, so the blocks,
and the shards written from them, are the same on one worker or on a cluster.

The driver plans blocks here, reading only what it must (file sizes, a few KiB around each
cut, Parquet metadata; a CSV is scanned once for its quotes); pipelines/data/records.py reads
a block on whichever worker it lands. A hub dataset is streamed on the driver, a block at a
time: nothing holds a whole source.
"""

from __future__ import annotations

import codecs
import glob
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from model.errors import RelayError
from pipelines.data.data_plan import DataPlan
from pipelines.data.text import SourceStats, csv_header

LOCAL_TYPES = ("text", "json", "parquet", "csv")
DEFAULT_BLOCK_BYTES = 64 << 20  # what the driver-side readers (SFT, tokenizer training) cut sources into
SCAN_CHUNK = 1 << 20
NEWLINE = re.compile(rb"\n")
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # a line holding only spaces: where blank_line documents part


def _files(plan: DataPlan, source) -> list[Path]:
    """The files `source.path` matches, each once: a file reached through several links (a
    link loop makes `**` reach one file dozens of times) is read at its first match only."""
    pattern = str(plan.path(source.path))
    matches, seen = [], set()
    for p in sorted(Path(p) for p in glob.glob(pattern, recursive=True)):
        real = p.resolve()
        if p.is_file() and real not in seen:
            seen.add(real)
            matches.append(p)
    if not matches:
        raise RelayError(f"{source.path}: no file matches (looked for {pattern})")
    return matches


def check_text_file(path: Path, encoding: str | None) -> None:
    """Refuse a file that is not text: a NUL byte (binary data), or bytes that are not valid in
    its encoding (UTF-8 unless the source names another), naming the file and the first bad
    byte's offset. Streams the file, decoding up to the last newline of each chunk (a newline
    byte never lies inside a character of an encoding the source accepts); nothing is replaced."""
    name = encoding or "UTF-8"
    hint = f"the file is not {encoding} either" if encoding else \
        "set encoding: on the source (e.g. encoding: latin-1) if the file uses another encoding"
    pending, base = b"", 0  # bytes not yet decoded, and the file offset where they begin
    with open(path, "rb") as f:
        while True:
            chunk = f.read(SCAN_CHUNK)
            nul = chunk.find(b"\0")
            if nul >= 0:
                at = base + len(pending) + nul
                raise RelayError(f"{path}: a binary file, not text (a NUL byte at offset {at}); point the source at text files")
            data = pending + chunk
            cut = (data.rfind(b"\n") + 1 or max(0, len(data) - 8)) if chunk else len(data)
            try:
                data[:cut].decode(encoding or "utf-8")
            except UnicodeDecodeError as exc:
                raise RelayError(f"{path}: not {name} text (byte 0x{data[exc.start]:02x} at offset {base + exc.start}); {hint}") from None
            base, pending = base + cut, data[cut:]
            if not chunk:
                return


def source_label(source) -> str:
    """How messages name a source."""
    return f"hub dataset {source.name}" if source.type == "hub" else (source.path or source.type)


# ---- planning: sources -> blocks --------------------------------------------------------------

def plan_blocks(plan: DataPlan, sources, role: str, block_bytes: int, stats: SourceStats) -> Iterator[dict]:
    """The blocks of every source, in source order (role: "pretrain" | "sft")."""
    for index, source in enumerate(sources):
        yield from plan_source(plan, index, source, role, block_bytes, stats)


def plan_source(plan: DataPlan, index: int, source, role: str, block_bytes: int, stats: SourceStats) -> Iterator[dict]:
    """The blocks of one source, numbered from 0. Pretraining reads only the text column of
    Parquet and CSV, and carries only the text field of hub records."""
    text_field = source.field or "text"
    columns = [text_field] if role == "pretrain" and source.type in ("parquet", "csv") else None
    base = {"source": index, "type": source.type, "label": source_label(source), "split_by": source.split_by,
            "field": text_field if role == "pretrain" else None, "columns": columns, "encoding": source.encoding or "utf-8"}
    files = _files(plan, source) if source.type in LOCAL_TYPES else []
    for path in files if source.type in ("text", "json", "csv") else []:
        check_text_file(path, source.encoding)
    stats.files += [str(p) for p in files]
    if source.type == "text":
        parts = _text_parts(files, source.split_by, block_bytes)
    elif source.type == "json":
        parts = _json_parts(files, block_bytes)
    elif source.type == "parquet":
        parts = _parquet_parts(files, columns, source.path)
    elif source.type == "csv":
        parts = _csv_parts(files, columns, block_bytes, source.path)
    elif source.type == "hub":
        base["row_label"] = f"hub dataset {source.name} row"
        parts = _hub_parts(source, text_field if role == "pretrain" else None, block_bytes)
    else:
        base["row_label"] = {"pretrain": "synthetic document", "dpo": "synthetic pair"}.get(role, "synthetic conversation")
        parts = _inline_parts(_synthetic_records(plan, role), block_bytes)
    yield from _pack(parts, base, block_bytes)


def _pack(parts: Iterable[tuple[dict, int]], base: dict, block_bytes: int) -> Iterator[dict]:
    """Consecutive parts gathered into blocks of at least `block_bytes` (the last may hold less)."""
    block, size, index = [], 0, 0
    for part, nbytes in parts:
        block.append(part)
        size += nbytes
        if size >= block_bytes:
            yield {**base, "index": index, "parts": block}
            block, size, index = [], 0, index + 1
    if block:
        yield {**base, "index": index, "parts": block}


def _text_parts(files: list[Path], split_by: str, block_bytes: int) -> Iterator[tuple[dict, int]]:
    for path in files:
        size = path.stat().st_size
        if split_by == "file":  # the file is one document: it cannot be cut
            yield {"path": str(path)}, size
            continue
        for start, end in _ranges(path, size, block_bytes, BLANK_LINE):
            yield {"path": str(path), "start": start, "end": end}, end - start


def _json_parts(files: list[Path], block_bytes: int) -> Iterator[tuple[dict, int]]:
    for path in files:
        size = path.stat().st_size
        first = _first_character(path)
        if not first:
            raise RelayError(f"{path}: the file is empty")
        if path.suffix != ".jsonl" and first == "[":  # a JSON array is parsed whole
            yield {"path": str(path), "array": True}, size
            continue
        for start, end in _ranges(path, size, block_bytes, NEWLINE):
            yield {"path": str(path), "start": start, "end": end}, end - start


def _first_character(path: Path) -> str:
    """The first character that is not whitespace ('' for a blank file)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            text = decoder.decode(chunk).lstrip()
            if text:
                return text[0]
    return decoder.decode(b"", final=True).lstrip()[:1]


def _ranges(path: Path, size: int, block_bytes: int, boundary: re.Pattern) -> Iterator[tuple[int, int]]:
    """[start, end) byte ranges of about `block_bytes` covering the file, each cut just after
    the first match of `boundary` at or past its target size (a newline, or a blank line)."""
    start = 0
    with open(path, "rb") as f:
        while size - start > block_bytes:
            cut = _next_boundary(f, start + block_bytes, boundary)
            if cut is None or cut >= size:
                break
            yield start, cut
            start = cut
    yield start, size


def _next_boundary(f, offset: int, boundary: re.Pattern) -> int | None:
    """The end of the first match of `boundary` (which begins with a newline) at or after `offset`."""
    f.seek(offset)
    buffer, base = b"", offset
    while chunk := f.read(SCAN_CHUNK):
        buffer += chunk
        match = boundary.search(buffer)
        if match:
            return base + match.end()
        keep = buffer.rfind(b"\n")  # a match can only begin at the last newline seen
        keep = len(buffer) if keep < 0 else keep
        base, buffer = base + keep, buffer[keep:]
    return None


def _parquet_parts(files: list[Path], columns: list[str] | None, label: str) -> Iterator[tuple[dict, int]]:
    import pyarrow.parquet as pq

    for path in files:
        try:
            meta = pq.ParquetFile(path).metadata
            names = meta.schema.to_arrow_schema().names
        except Exception as exc:
            raise RelayError(f"{label}: cannot read as parquet ({type(exc).__name__}: {str(exc)[:160]})") from None
        _check_columns(columns, names, f"{path} row 0")
        first_row = 0
        for group in range(meta.num_row_groups):
            rows = meta.row_group(group)
            if rows.num_rows:
                yield {"path": str(path), "row_group": group, "first_row": first_row}, rows.total_byte_size
            first_row += rows.num_rows


def _check_columns(columns: list[str] | None, names: list[str], where: str) -> None:
    for name in columns or []:
        if name not in names:
            raise RelayError(f"{where}: no field {name!r} (fields: {', '.join(sorted(names))}); set 'field:' on the source")


def _csv_parts(files: list[Path], columns: list[str] | None, block_bytes: int, label: str) -> Iterator[tuple[dict, int]]:
    for path in files:
        header_end, ranges = csv_record_ranges(path, block_bytes)
        if header_end == 0:
            continue  # no complete header line: no rows
        _check_columns(columns, csv_header(path, header_end, label), f"{path} row 0")
        for start, end, first_row in ranges:
            yield {"path": str(path), "header_end": header_end, "start": start, "end": end, "first_row": first_row}, end - start


def csv_record_ranges(path: Path, block_bytes: int) -> tuple[int, list[tuple[int, int, int]]]:
    """(end of the header line, [(start, end, first row)]): byte ranges of whole records.

    A record ends at a newline outside double quotes: one preceded by an even number of
    quote characters (an escaped quote is two of them). The file is scanned once, a chunk at a
    time, with numpy."""
    size = path.stat().st_size
    header_end, ranges, start, first_row, records, quotes, offset = 0, [], 0, 0, 0, 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK):
            data = np.frombuffer(chunk, dtype=np.uint8)
            parity = (np.cumsum(data == ord('"')) + quotes) % 2
            ends = np.flatnonzero((data == ord("\n")) & (parity == 0)) + offset + 1  # just past each record
            quotes, offset = int(parity[-1]), offset + len(chunk)
            if not header_end and len(ends):
                header_end = start = int(ends[0])
                ends = ends[1:]
            while len(ends) and ends[-1] >= start + block_bytes:
                k = int(np.searchsorted(ends, start + block_bytes))  # the first record ending past the target
                ranges.append((start, int(ends[k]), first_row))
                records += k + 1
                first_row, start, ends = records, int(ends[k]), ends[k + 1:]
            records += len(ends)
    if header_end and start < size:
        ranges.append((start, size, first_row))
    return header_end, ranges


def _hub_parts(source, text_field: str | None, block_bytes: int) -> Iterator[tuple[dict, int]]:
    """Records streamed from the hub, a block's worth at a time (pretraining keeps only the text field)."""
    import datasets

    datasets.disable_progress_bars()
    label = source_label(source)
    try:
        stream = iter(datasets.load_dataset(source.name, source.config, split=source.split, streaming=True))
        records, size, first_row, row = [], 0, 0, 0
        for record in stream:
            if text_field is not None:
                record = {text_field: _hub_text(record, text_field, f"{label} row {row}")}
                size += len(record[text_field] or "")
            else:
                size += len(json.dumps(record, default=str))
            records.append(record)
            row += 1
            if size >= block_bytes:
                yield {"records": records, "first_row": first_row}, size
                records, size, first_row = [], 0, row
        if records:
            yield {"records": records, "first_row": first_row}, size
    except RelayError:
        raise
    except Exception as exc:
        raise RelayError(f"hub dataset {source.name!r} could not be loaded ({type(exc).__name__}); offline, download it where "
                         "there is a network and point a json / parquet / csv source at the files (path: ...)") from None


def _hub_text(record, name: str, where: str):
    if not isinstance(record, dict) or name not in record:
        fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise RelayError(f"{where}: no field {name!r} (fields: {fields}); set 'field:' on the source")
    value = record[name]
    if value is not None and not isinstance(value, str):
        raise RelayError(f"{where}: field {name!r} must be text, got {type(value).__name__}")
    return value


def _synthetic_records(plan: DataPlan, role: str) -> list:
    from pipelines.data import synthetic

    spec = plan.data.synthetic
    world = synthetic.build_world(spec.seed, spec.num_people, spec.held_out_fraction)
    if role == "pretrain":
        return [{"text": d} for d in synthetic.pretrain_documents(world, spec.seed, spec.mentions_per_fact, spec.num_arithmetic,
                                                                    facts=tuple(spec.facts))]
    if role == "dpo":
        return synthetic.preference_pairs(world, spec.seed, facts=tuple(spec.preference_facts))
    return synthetic.sft_conversations(world, spec.seed, facts=tuple(spec.sft_facts))


def _inline_parts(records: list, block_bytes: int) -> Iterator[tuple[dict, int]]:
    chunk, size, first_row = [], 0, 0
    for row, record in enumerate(records):
        chunk.append(record)
        size += len(json.dumps(record))
        if size >= block_bytes:
            yield {"records": chunk, "first_row": first_row}, size
            chunk, size, first_row = [], 0, row + 1
    if chunk:
        yield {"records": chunk, "first_row": first_row}, size
