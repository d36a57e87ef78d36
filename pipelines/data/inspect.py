"""`relaygpt data inspect`: rendered samples with supervised tokens marked, and statistics."""

from __future__ import annotations

from pathlib import Path

from model.tokenizer import Tokenizer
from pipelines.data.loader import open_split
from pipelines.data.shards import read_manifest

OPEN, CLOSE = "⟦", "⟧"  # around text that carries the loss


def render_supervised(tokenizer: Tokenizer, tokens, mask) -> str:
    """Decode a row, wrapping every run of supervised targets in ⟦ ⟧.

    Target t+1 is supervised when mask[t+1] is 1, so the marks sit on the tokens the model
    is trained to produce.
    """
    out, run, inside = [], [], False
    for token, supervised in zip(tokens, mask):
        supervised = bool(supervised)
        if supervised != inside and run:
            text = tokenizer.decode(run)
            out.append(f"{OPEN}{text}{CLOSE}" if inside else text)
            run = []
        inside = supervised
        run.append(int(token))
    if run:
        text = tokenizer.decode(run)
        out.append(f"{OPEN}{text}{CLOSE}" if inside else text)
    return "".join(out)


def describe(directory: Path, tokenizer: Tokenizer, num_samples: int, seq_len: int) -> str:
    manifest = read_manifest(directory)
    lines = [f"{directory} ({manifest['kind']}, tokenizer {manifest['tokenizer']['name']}, {manifest['dtype']})"]
    if manifest["kind"] == "sft":
        rows = open_split(directory, "train")
        for i in range(min(num_samples, rows.num_windows)):
            tokens, mask = rows.window(i)
            lines += [f"--- row {i} ({int(mask[1:].sum())} supervised of {len(tokens)} tokens)", render_supervised(tokenizer, tokens, mask)]
        st = manifest["stats"]
        lines.append("--- statistics")
        for name, split in manifest["splits"].items():
            lines.append(f"{name}: {split['conversations']} conversations, {split['rows']} rows, {split['tokens']} tokens, {split['supervised_tokens']} supervised")
        lines.append(f"supervised fraction {st['supervised_fraction']:.3f}; truncated {st['truncated']}; "
                     f"dropped (no supervised token left) {st['dropped_no_supervised_tokens']}; "
                     f"dropped (no final assistant turn) {st['dropped_no_assistant_turn']}; replaced bytes {st['replaced_bytes']}; "
                     f"formats {', '.join(manifest['formats'])}")
    else:
        windows = open_split(directory, "train", seq_len=seq_len)
        for i in range(min(num_samples, windows.num_windows)):
            tokens, _ = windows.window(i)
            lines += [f"--- window {i} ({len(tokens)} tokens)", tokenizer.decode(tokens)]
        st = manifest["stats"]
        lines.append("--- statistics")
        for name, split in manifest["splits"].items():
            lines.append(f"{name}: {split['documents']} documents, {split['tokens']} tokens in {len(split['shards'])} shard(s)")
        lines.append(f"{st['documents']} documents, {st['text_bytes']} bytes of text, replaced bytes {st['replaced_bytes']}")
    return "\n".join(lines)
