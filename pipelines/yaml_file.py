"""Reading the project's YAML files (jobs, sweeps, eval tasks) the one strict way.

`yaml.safe_load` takes the last of two equal keys in a mapping without a word, so a setting
written twice silently loses its first value; here a repeated key is an error naming both
lines. A file that is not UTF-8 text, or is a directory, is an error naming the file.

Parsing is bounded, so a hostile file is refused in milliseconds instead of hanging every
command that reads it: at most `MAX_BYTES` of text, `MAX_DEPTH` levels of nesting, and
`MAX_NODES` values once every alias is expanded (an "alias bomb" of a few lines expands to a
billion values; a real job file has a few hundred).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model.errors import RelayError

MAX_BYTES = 4 << 20
MAX_DEPTH = 64
MAX_NODES = 100_000


def read_yaml(path: str | Path, kind: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of the YAML file at `path`; `kind` ("job file", ...) names it in errors.
    The node tree carries the line of every key, for messages that name file:line."""
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_BYTES:
            raise RelayError(f"{path}: {path.stat().st_size} bytes is more than a {kind} may hold ({MAX_BYTES}); is it the right file?")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RelayError(f"{path}: {kind} does not exist") from None
    except IsADirectoryError:
        raise RelayError(f"{path}: is a directory; give the {kind} itself") from None
    except UnicodeDecodeError as exc:
        raise RelayError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a {kind} is YAML in UTF-8") from None
    except OSError as exc:
        raise RelayError(f"{path}: cannot read the {kind} ({exc.strerror})") from None
    return parse_bounded(text, str(path))


def parse_bounded(text: str, where: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of YAML `text`, refused (RelayError naming `where`) when nested deeper
    than MAX_DEPTH or holding more than MAX_NODES values with its aliases expanded."""
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events: no recursion, no expansion
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise RelayError(f"{where}:{event.start_mark.line + 1}: nested more than {MAX_DEPTH} levels deep; "
                                     "a job, sweep or task file is a few levels of sections")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is None:
            return yaml.safe_load(text), None
        _count_expanded(node, where, {})
        _refuse_repeated_keys(node, Path(where))
        return yaml.safe_load(text), node
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        spot = f"{where}:{mark.line + 1}" if mark else where
        raise RelayError(f"{spot}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


def _count_expanded(node: yaml.Node, where: str, sizes: dict[int, int]) -> int:
    """Values under `node` with every alias expanded; an alias is the same node object, so
    each node is counted once (memoized) and the total still reflects the expansion."""
    if id(node) in sizes:
        return sizes[id(node)]
    total = 1
    if isinstance(node, yaml.MappingNode):
        total += sum(_count_expanded(k, where, sizes) + _count_expanded(v, where, sizes) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        total += sum(_count_expanded(item, where, sizes) for item in node.value)
    if total > MAX_NODES:
        raise RelayError(f"{where}:{node.start_mark.line + 1}: expands to more than {MAX_NODES} values (YAML aliases "
                         "repeating aliases); write the values out, or use fewer aliases")
    sizes[id(node)] = total
    return total


def _refuse_repeated_keys(node: yaml.Node, path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise RelayError(f"{path}:{line}: key {key.value!r} is repeated (first at line {seen[key.tag, key.value]}); "
                                     "each key may appear once in a mapping")
                seen[key.tag, key.value] = line
            _refuse_repeated_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_repeated_keys(item, path)
