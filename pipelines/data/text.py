"""Bytes to text, shared by planning (sources.py) and reading (records.py): decoding with
invalid bytes replaced and counted, and CSV text read as a table of text columns."""

from __future__ import annotations

import codecs
import io
from dataclasses import dataclass, field
from pathlib import Path

from model.errors import RelayError

REPLACEMENT = "\ufffd"


@dataclass
class SourceStats:
    """What reading the sources noticed, reported in the manifest."""

    replaced_bytes: int = 0
    files: list[str] = field(default_factory=list)


def decode_counting(data: bytes, stats: SourceStats, encoding: str = "utf-8") -> str:
    """Text of `data` in `encoding`, any invalid bytes replaced by U+FFFD and counted in `stats`
    (planning has refused files with invalid bytes, so this counts none for a file left alone).

    Cut at a newline, a file decodes piece by piece exactly as it does whole: an ASCII byte
    always ends an invalid sequence, so every piece sees the same replacements."""
    try:
        return data.decode(encoding)
    except UnicodeDecodeError:
        pass
    count = 0

    def handler(exc: UnicodeDecodeError):
        nonlocal count
        count += exc.end - exc.start
        return REPLACEMENT, exc.end

    name = f"relaygpt-count-{id(handler)}"
    codecs.register_error(name, handler)
    text = data.decode(encoding, errors=name)
    stats.replaced_bytes += count
    return text


def read_text(path: Path, stats: SourceStats, encoding: str = "utf-8") -> str:
    """A whole file as text, invalid bytes replaced and counted."""
    return decode_counting(Path(path).read_bytes(), stats, encoding)


def csv_header(path: str | Path, header_end: int, label: str) -> list[str]:
    """The column names of a CSV file (its first record)."""
    with open(path, "rb") as f:
        header = decode_counting(f.read(header_end), SourceStats())
    return read_csv(header, None, label).column_names


def read_csv(text: str, columns: list[str] | None, label: str, names: list[str] | None = None):
    """A table of CSV text (header first). Every column is text: CSV has no types, and a
    column read as numbers in one block and as text in the next would differ by block."""
    import pyarrow as pa
    import pyarrow.csv as pv

    convert = pv.ConvertOptions(column_types={n: pa.string() for n in names or []}, include_columns=columns or [])
    try:
        return pv.read_csv(io.BytesIO(text.encode("utf-8", "surrogatepass")), read_options=pv.ReadOptions(use_threads=False),
                           parse_options=pv.ParseOptions(newlines_in_values=True), convert_options=convert)
    except (OSError, ValueError) as exc:  # pyarrow.lib.ArrowInvalid derives from ValueError
        raise RelayError(f"{label}: cannot read as csv ({type(exc).__name__}: {str(exc)[:160]})") from None
