"""A job (or sweep) file's text before validation: the error that lists its problems, the line
of every key (so a problem names file:line), and `--set a.b.c=value` overrides."""

from __future__ import annotations

import difflib
import re

import yaml

from model.errors import RelayError
from pipelines.yaml_file import parse_bounded


class JobError(RelayError):
    """Problems with a job file; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(problems[0] if len(problems) == 1 else f"{len(problems)} problems:\n  " + "\n  ".join(problems))


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def line_map(node, path=(), out=None) -> dict[tuple, int]:
    """YAML path -> 1-based line of every mapping key and sequence item."""
    out = {} if out is None else out
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, key.value)
            out[child] = key.start_mark.line + 1
            line_map(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[(*path, i)] = item.start_mark.line + 1
            line_map(item, (*path, i), out)
    return out


def override_path(assignment: str) -> tuple:
    """The field path `a.b.0.c=value` sets, as a tuple ("a", "b", 0, "c"); a malformed
    assignment (no '=', an empty key or an empty part of one) is an error naming it."""
    key, equals, _ = assignment.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(part.strip() for part in parts):
        raise JobError([f"--set {assignment!r}: expected KEY=VALUE with a dotted field name as KEY, e.g. data.num_proc=4"])
    return tuple(int(p) if re.fullmatch(r"\d+", p) else p for p in (part.strip() for part in parts))


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML; list items by index: sources.0.path)."""
    parts = list(override_path(assignment))
    key, raw = assignment.split("=", 1)
    try:
        value, _ = parse_bounded(raw, f"--set {key}")
    except RelayError as exc:
        if "invalid YAML" not in str(exc):
            raise JobError([str(exc)]) from None
        value = raw
    node = data
    for i, part in enumerate(parts[:-1]):
        try:
            if isinstance(part, int):
                node = node[part]
            else:
                node = node.setdefault(part, {})
        except (IndexError, KeyError, TypeError, AttributeError):
            raise JobError([f"--set {key}: {'.'.join(map(str, parts[: i + 1]))} does not exist in the job"]) from None
        if not isinstance(node, (dict, list)):
            raise JobError([f"--set {key}: {'.'.join(map(str, parts[: i + 1]))} is a value, not a section"])
    try:
        node[parts[-1]] = value
    except (IndexError, TypeError):
        raise JobError([f"--set {key}: {'.'.join(map(str, parts))} does not exist in the job"]) from None
