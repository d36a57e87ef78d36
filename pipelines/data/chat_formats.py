"""Instruction data formats, detected per dataset and converted to {role, content} messages.

    messages         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    sharegpt         {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...]}
    alpaca           {"instruction", "input" (optional), "output"}
    prompt_response  {"prompt", "response"}

Extra fields are ignored. A role the format does not know is an error naming file:line.
A source's `fields:` maps these names to the columns of data that spells them differently
(Dolly: `{instruction: instruction, input: context, output: response}`).
"""

from __future__ import annotations

from model.errors import RelayError

FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_response": ("prompt", "response"),
}
# Every field a format reads (FORMAT_KEYS are the ones it needs): what `fields:` may map.
FORMAT_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_response": ("prompt", "response"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "system": "system"}
MESSAGE_ROLES = ("system", "user", "assistant")


def detect_format(row, where: str) -> str:
    if isinstance(row, dict):
        for name, keys in FORMAT_KEYS.items():
            if all(k in row for k in keys):
                return name
    fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    known = "; ".join(f"{n}: {' + '.join(k)}" for n, k in FORMAT_KEYS.items())
    raise RelayError(f"{where}: cannot tell the instruction format from the fields ({fields}); known formats: {known}")


def mapping_problem(fields: dict[str, str], fmt: str) -> str | None:
    """What is wrong with a source's `fields:` mapping for format `fmt` ('auto' allowed), or None."""
    formats = FORMAT_FIELDS if fmt == "auto" else {fmt: FORMAT_FIELDS[fmt]}
    known = {key for keys in formats.values() for key in keys}
    unknown = sorted(set(fields) - known)
    if unknown:
        valid = "; ".join(f"{', '.join(keys)} ({name})" for name, keys in formats.items())
        return f"unknown key {unknown[0]!r}; {'valid' if fmt == 'auto' else f'valid for format {fmt}'}: {valid}"
    if not any(set(fields) <= set(keys) for keys in formats.values()):
        return f"keys of different formats ({', '.join(sorted(fields))}); map the fields of one format"
    return None


def map_columns(row, fields: dict[str, str], where: str, check) -> dict:
    """The record with its `fields:` columns under the format's names. A mapped column named in
    `check` that the record lacks is an error naming the field, the record and its columns."""
    if not isinstance(row, dict):
        raise RelayError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [key for key in check if key in fields and fields[key] not in row]
    if missing:
        key = missing[0]
        raise RelayError(f"{where}: fields.{key}: no column {fields[key]!r} in this record (columns: {', '.join(sorted(row))})")
    return {**row, **{key: row[column] for key, column in fields.items() if column in row}}


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise RelayError(f"{where}: {what} must be text, got {type(value).__name__}")
    return value


def to_messages(row, fmt: str, where: str) -> list[dict]:
    """The conversation of one row as messages (fmt already resolved, not 'auto'); a user or
    assistant turn with no text is refused, naming the row and the turn."""
    messages = _messages(row, fmt, where)
    for i, m in enumerate(messages):
        if m["role"] in ("user", "assistant") and not m["content"].strip():
            raise RelayError(f"{where}: the {m['role']} turn (turn {i}) is empty; an empty turn teaches nothing: fill it in or "
                             "drop the row")
    return messages


def _messages(row, fmt: str, where: str) -> list[dict]:
    if not isinstance(row, dict):
        raise RelayError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in FORMAT_KEYS[fmt] if k not in row]
    if missing:
        raise RelayError(f"{where}: format {fmt} needs field(s) {', '.join(missing)} (fields: {', '.join(sorted(row))})")
    if fmt == "messages":
        out = []
        for i, m in enumerate(row["messages"] or []):
            role = m.get("role") if isinstance(m, dict) else None
            if role not in MESSAGE_ROLES:
                raise RelayError(f"{where}: message {i} has unknown role {role!r}; valid roles: {', '.join(MESSAGE_ROLES)}")
            out.append({"role": role, "content": _text(m.get("content"), where, f"message {i} content")})
        return out
    if fmt == "sharegpt":
        out = []
        for i, turn in enumerate(row["conversations"] or []):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in SHAREGPT_ROLES:
                raise RelayError(f"{where}: turn {i} has unknown role {speaker!r}; valid for sharegpt: {', '.join(SHAREGPT_ROLES)}")
            out.append({"role": SHAREGPT_ROLES[speaker], "content": _text(turn.get("value"), where, f"turn {i} value")})
        return out
    if fmt == "alpaca":
        prompt = _text(row["instruction"], where, "instruction")
        extra = row.get("input") or ""
        if extra:
            prompt += "\n\n" + _text(extra, where, "input")
        system = [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) and row["system"] else []
        return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row["output"], where, "output")}]
    return [{"role": "user", "content": _text(row["prompt"], where, "prompt")},
            {"role": "assistant", "content": _text(row["response"], where, "response")}]
