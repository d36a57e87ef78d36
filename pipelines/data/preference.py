"""Preference data for DPO: (prompt, chosen, rejected) rows -> chat template -> paired rows.

Layouts a source may hold (the format is read from its first record, or set with `format:`):

    pairs   {"prompt": text | [messages], "chosen": text | [messages], "rejected": text | [messages]}
            (TRL's "explicit prompt" layout; a side given as messages is the answer's turn(s), and a
            side that repeats the prompt's messages first has them taken off)
    hh      {"chosen": conversation, "rejected": conversation} (Anthropic HH-RLHF): two whole
            conversations, as "\\n\\nHuman: ...\\n\\nAssistant: ..." text or as message lists, that
            share everything up to their last assistant turn: that turn is the answer

`fields:` maps prompt / chosen / rejected to columns that are named otherwise. Every pair is
rendered by `model.chat.render_chat` (the template SFT and generation use): the prompt, then the
answer as an assistant turn; the loss mask covers the answer's tokens (its content and <|end|>)
only, never an earlier assistant turn of the prompt. Each side is one row of `seq_len + 1`
tokens, padded with end-of-text outside the mask; a longer one is cut at the end (counted), and
a pair left without an answer token on either side is dropped (counted).

A pair with a side missing, identical sides, or a prompt that differs between the two sides (hh)
is refused, naming the file and row. The split is by pair (a seeded hash of its text), with at
least one validation pair when there are two or more.

    data/dpo/  {split}_tokens_NNN_*.bin  (pairs, 2, row_len): chosen then rejected
               {split}_mask_NNN_*.bin    the answer masks, the same shape
               manifest.json             kind "preference", counts, shards with their sha256
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from model.atomic import atomic_dir
from model.chat import render_chat
from model.errors import RelayError
from model.tokenizer import Tokenizer
from pipelines.data.chat_formats import map_columns, to_messages
from pipelines.data.data_plan import DataPlan
from pipelines.data.pretrain import SPLITS, split_draw
from pipelines.data.records import read_records
from pipelines.data.shards import ShardWriter, load_split, read_manifest, token_dtype, write_manifest
from pipelines.data.sources import DEFAULT_BLOCK_BYTES, SourceStats, plan_source, source_label

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
COUNTS = ("truncated", "dropped_no_answer_tokens")
SIDES = ("chosen", "rejected")
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def detect_preference_format(row, where) -> str:
    if isinstance(row, dict) and all(side in row for side in SIDES):
        return "pairs" if "prompt" in row else "hh"
    fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    raise RelayError(f"{where}: not a preference pair (fields: {fields}); a row holds prompt + chosen + rejected, "
                     "or chosen + rejected conversations (HH-RLHF); map other column names with fields:")


def _side_messages(value, where, what: str) -> list[dict]:
    """A side or a prompt as messages: text is one turn (an answer's an assistant turn, a prompt's a user turn)."""
    if isinstance(value, str):
        return [{"role": "assistant" if what in SIDES else "user", "content": value}]
    if isinstance(value, list):
        return to_messages({"messages": value}, "messages", f"{where}: {what}")
    raise RelayError(f"{where}: {what} must be text or a list of messages, got {type(value).__name__}")


def _hh_messages(value, where, what: str) -> list[dict]:
    """An HH-RLHF conversation ("\\n\\nHuman: ...\\n\\nAssistant: ...") or a message list, as messages."""
    if not isinstance(value, str):
        return _side_messages(value, where, what)
    parts = _HH_TURN.split("\n\n" + value.lstrip("\n") if not value.startswith("\n\n") else value)
    if parts[0].strip() or len(parts) < 3:
        raise RelayError(f"{where}: {what} is not an HH-RLHF conversation (\"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def to_pair(row, fmt: str, where) -> tuple[list[dict], dict, dict]:
    """(prompt messages, chosen turn, rejected turn) of one row; a bad pair is refused, naming the row."""
    if not isinstance(row, dict):
        raise RelayError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in (("prompt",) if fmt == "pairs" else ()) + SIDES:
        if row.get(key) is None:
            raise RelayError(f"{where}: no {key!r} in this pair (fields: {', '.join(sorted(row))}); every pair needs a prompt, "
                             "a chosen and a rejected answer")
    if fmt == "pairs":
        prompt = _side_messages(row["prompt"], where, "prompt")
        sides = [_side_messages(row[side], where, side) for side in SIDES]
        sides = [s[len(prompt):] if len(s) > len(prompt) and s[:len(prompt)] == prompt else s for s in sides]
        for side, messages in zip(SIDES, sides):
            if len(messages) != 1 or messages[0]["role"] != "assistant":
                raise RelayError(f"{where}: {side} must be one assistant answer (text, or one assistant message), "
                                 f"got {len(messages)} message(s) ending with {messages[-1]['role'] if messages else 'nothing'}")
        chosen, rejected = sides[0][0], sides[1][0]
    else:
        conversations = [_hh_messages(row[side], where, side) for side in SIDES]
        for side, messages in zip(SIDES, conversations):
            if messages[-1]["role"] != "assistant":
                raise RelayError(f"{where}: the {side} conversation does not end with an assistant turn (its answer)")
        prompt, other = conversations[0][:-1], conversations[1][:-1]
        if prompt != other:
            turn = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
            raise RelayError(f"{where}: the prompt differs between chosen and rejected (from turn {turn}); both sides must "
                             "continue the same conversation and differ only in the last assistant turn")
        chosen, rejected = conversations[0][-1], conversations[1][-1]
    if not any(m["role"] == "user" for m in prompt):
        raise RelayError(f"{where}: the prompt has no user turn; a pair answers a prompt")
    if chosen["content"].strip() == rejected["content"].strip():
        raise RelayError(f"{where}: chosen and rejected are identical ({chosen['content'][:40]!r}); a pair must differ, "
                         "or it teaches nothing: drop the row")
    return prompt, chosen, rejected


def render_side(tokenizer: Tokenizer, prompt: list[dict], answer: dict) -> tuple[list[int], list[int]]:
    """Token ids and the answer mask of one side: the prompt's tokens (assistant turns included) out of it."""
    prompt_ids, _ = render_chat(tokenizer, prompt)
    ids, mask = render_chat(tokenizer, prompt + [answer])
    return ids, [0] * len(prompt_ids) + mask[len(prompt_ids):]


def fit_row(ids: list[int], mask: list[int], row_len: int, pad_id: int, counts: dict) -> tuple[list[int], list[int]]:
    if len(ids) > row_len:
        counts["truncated"] += 1
        ids, mask = ids[:row_len], mask[:row_len]
    pad = row_len - len(ids)
    return ids + [pad_id] * pad, mask + [0] * pad


def source_pairs(plan: DataPlan, index: int, source, stats: SourceStats, found: dict):
    """(prompt, chosen, rejected, where) of every row of a source; its format goes to found["format"]."""
    fields, fmt = source.fields or {}, None
    for block in plan_source(plan, index, source, "dpo", DEFAULT_BLOCK_BYTES, stats):
        for row, where in read_records(block, stats):
            mapped = map_columns(row, fields, where, check=fields) if fields else row
            if fmt is None:
                fmt = found["format"] = source.format if source.format != "auto" else detect_preference_format(mapped, where)
            yield (*to_pair(mapped, fmt, where), where)
    if fmt is None:
        raise RelayError(f"{source_label(source)}: the dataset is empty")


class _SplitWriter:
    def __init__(self, directory: Path, split: str, dtype) -> None:
        self.tokens = ShardWriter(directory, f"{split}_tokens", dtype, 1 << 30)
        self.masks = ShardWriter(directory, f"{split}_mask", np.uint8, 1 << 30)
        self.counts = {"pairs": 0, "tokens": 0, "answer_tokens": 0}

    def add(self, rows: list[list[int]], masks: list[list[int]]) -> None:
        self.tokens.write(np.asarray(rows).reshape(-1))
        self.masks.write(np.asarray(masks, dtype=np.uint8).reshape(-1))
        self.counts["pairs"] += 1
        self.counts["tokens"] += sum(len(r) for r in rows)
        self.counts["answer_tokens"] += sum(sum(m[1:]) for m in masks)

    def close(self) -> list[dict]:
        return [{**t, "mask_file": m["file"], "mask_sha256": m["sha256"]} for t, m in zip(self.tokens.close(), self.masks.close())]


def _write_pairs(plan: DataPlan, tokenizer: Tokenizer, directory: Path, row_len: int, force_val: int | None) -> dict:
    """Every source's pairs into the split writers; the counts, the formats and the smallest draw."""
    spec, counts = plan.data.dpo, dict.fromkeys(COUNTS, 0)
    writers = {split: _SplitWriter(directory, split, token_dtype(tokenizer.n_vocab)) for split in SPLITS}
    number, smallest, formats, files = 0, None, [], []
    for index, source in enumerate(spec.sources):
        stats, found = SourceStats(), {}
        for prompt, chosen, rejected, _ in source_pairs(plan, index, source, stats, found):
            sides = [fit_row(*render_side(tokenizer, prompt, answer), row_len, tokenizer.eot_id, counts) for answer in (chosen, rejected)]
            if not all(sum(mask[1:]) for _, mask in sides):
                counts["dropped_no_answer_tokens"] += 1
                continue
            draw = split_draw("\x00".join([*(m["content"] for m in prompt), chosen["content"], rejected["content"]]), plan.seed)
            if smallest is None or draw < smallest[0]:
                smallest = (draw, number)
            split = "val" if draw < spec.val_fraction or number == force_val else "train"
            writers[split].add([ids for ids, _ in sides], [mask for _, mask in sides])
            number += 1
        formats.append(found.get("format"))
        files += stats.files
    splits = {split: {**writers[split].counts, "shards": writers[split].close()} for split in SPLITS}
    return {"pairs": number, "smallest": smallest, "counts": counts, "formats": formats, "files": files, "splits": splits}


def prepare_preference(plan: DataPlan, tokenizer: Tokenizer, directory: Path, fingerprint: str, seq_len: int) -> dict:
    """Write data/dpo (or reuse it when the fingerprint matches); returns the manifest."""
    existing = read_manifest(directory)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        return {**existing, "cached": True}
    spec, row_len = plan.data.dpo, seq_len + 1
    with atomic_dir(directory, durable=True) as tmp:
        result = _write_pairs(plan, tokenizer, Path(tmp), row_len, None)
        if spec.val_fraction and result["pairs"] >= 2 and not result["splits"]["val"]["pairs"]:
            for part in result["splits"].values():  # no pair drew validation: the smallest draw goes there
                for shard in part["shards"]:
                    (Path(tmp) / shard["file"]).unlink()
                    (Path(tmp) / shard["mask_file"]).unlink()
            result = _write_pairs(plan, tokenizer, Path(tmp), row_len, result["smallest"][1])
        if not result["splits"]["train"]["pairs"]:
            raise RelayError("data.dpo: no preference pair left for training (every pair was dropped or held out for validation)")
        manifest = {"kind": "preference", "fingerprint": fingerprint, "tokenizer": tokenizer.identity,
                    "dtype": token_dtype(tokenizer.n_vocab).name, "eot_id": tokenizer.eot_id, "seq_len": seq_len,
                    "row_len": row_len, "splits": result["splits"], "formats": result["formats"],
                    "sources": [s.model_dump(mode="json") for s in spec.sources],
                    "stats": {"pairs": result["pairs"], **result["counts"], "files": result["files"]}}
        if any(source.type == "synthetic" for source in spec.sources):
            manifest["held_out"] = _write_held_out(plan, Path(tmp))
        write_manifest(tmp, manifest)
    return {**manifest, "cached": False}


HELD_OUT = "held_out_pairs.jsonl"


def _write_held_out(plan: DataPlan, directory: Path) -> str:
    """The demo world's held-out pairs (about people no pair for training mentions), for a
    preference eval: one JSON object a line, {"prompt": [messages], "chosen": text, "rejected": text}."""
    import json

    from pipelines.data import synthetic

    spec = plan.data.synthetic
    world = synthetic.build_world(spec.seed, spec.num_people, spec.held_out_fraction)
    rows = synthetic.held_out_preference_pairs(world, spec.seed, facts=tuple(spec.held_out_preference_facts))
    (directory / HELD_OUT).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return HELD_OUT


class PreferenceRows:
    """The pairs of one split, read in place: `pair(i)` is (tokens, mask), each (2, row_len), chosen first.
    Shaped for the BatchLoader (`num_windows` pairs, no window offsets)."""

    max_offset = 1
    document_end = None

    def __init__(self, directory: str | Path, split: str, verify: bool = True) -> None:
        from pipelines.data.shards import verify_shards

        manifest = read_manifest(Path(directory))
        if manifest is None or manifest.get("kind") != "preference":
            raise RelayError(f"{directory}: no prepared preference data (relaygpt data prepare JOB)")
        if verify:
            verify_shards(Path(directory), manifest)
        self.manifest, self.row_len = manifest, manifest["row_len"]
        self.seq_len = self.row_len - 1
        self.tokens = load_split(Path(directory), manifest, split)
        self.masks = load_split(Path(directory), manifest, split, key="mask_file")
        self.num_windows = manifest["splits"][split]["pairs"]

    def __len__(self) -> int:
        return self.num_windows

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        size = 2 * self.row_len
        return (np.asarray(self.tokens[i * size:(i + 1) * size]).reshape(2, self.row_len),
                np.asarray(self.masks[i * size:(i + 1) * size]).reshape(2, self.row_len))
