"""Reading the project's YAML files (jobs, sweeps, eval tasks) the one strict way.

`yaml.safe_load` takes the last of two equal keys in a mapping without a word, so a setting
written twice silently loses its first value; here a repeated key is an error naming both
lines. A file that is not UTF-8 text, or is a directory, is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from model.errors import RelayError


def read_yaml(path: str | Path, kind: str) -> tuple[Any, yaml.Node | None]:
    """(data, node tree) of the YAML file at `path`; `kind` ("job file", ...) names it in errors.
    The node tree carries the line of every key, for messages that name file:line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RelayError(f"{path}: {kind} does not exist") from None
    except IsADirectoryError:
        raise RelayError(f"{path}: is a directory; give the {kind} itself") from None
    except UnicodeDecodeError as exc:
        raise RelayError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); a {kind} is YAML in UTF-8") from None
    except OSError as exc:
        raise RelayError(f"{path}: cannot read the {kind} ({exc.strerror})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _refuse_repeated_keys(node, path)
        return yaml.safe_load(text), node
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RelayError(f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc})") from None


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
