"""Reading a model directory's files: its config.json, its safetensors weights, and weights
assigned into a model built on the meta device (no double allocation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from model.errors import RelayError

if TYPE_CHECKING:
    from model.gpt import GPT


def read_config_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RelayError(f"{path.parent}: not a model directory (no config.json)") from None
    except json.JSONDecodeError as exc:
        raise RelayError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    except RecursionError:
        raise RelayError(f"{path}: nested too deeply to be a model's settings (thousands of levels); is it the right file?") from None
    except UnicodeDecodeError as exc:
        raise RelayError(f"{path}: not UTF-8 text (byte at offset {exc.start}); a config.json is JSON in UTF-8") from None
    if not isinstance(meta, dict):
        raise RelayError(f"{path}: expected a JSON object of model settings, got a JSON {type(meta).__name__}")
    return meta


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RelayError(f"{path}: missing") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise RelayError(f"{path}: cannot read weights ({exc})") from None


def assign_state(model: GPT, state: dict[str, torch.Tensor], where: Path) -> None:
    """Load `state` into a model built on the meta device (no double allocation)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RelayError(f"{where}: weights do not match the config (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise RelayError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}")
    model.load_state_dict(state, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight
