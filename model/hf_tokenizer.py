"""The byte-level BPE inside a Hugging Face tokenizer.json: its vocabulary (added tokens
included), merges and split pattern, as plain data for `Tokenizer.from_hf_dir`."""

from __future__ import annotations

import json
from pathlib import Path

from model.errors import RelayError

NORMALIZERS = ("NFC",)  # Unicode normalizations a tokenizer may apply before splitting (unicodedata's names)


def read_tokenizer_json(spec: Path, pat_str: str | None = None) -> tuple[dict[str, int], list[str], str | None, str | None]:
    """(vocabulary, merges, split pattern, normalizer) of a tokenizer.json; `pat_str` (recorded
    by a relaygpt export) stands for the pattern its pre-tokenizer would give."""
    try:
        data = json.loads(spec.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise RelayError(f"{spec}: a {model.get('type')} tokenizer; only byte-level BPE tokenizers can be imported")
        vocab = dict(model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = [(token["content"], int(token["id"])) for token in data.get("added_tokens") or []]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise RelayError(f"{spec}: not a readable BPE tokenizer.json ({type(exc).__name__}: {exc})") from None
    normalizer = _normalizer(data, spec)
    pattern = pat_str or _split_pattern(data, spec)
    for content, idx in added:
        vocab[content] = idx
    return vocab, merges, pattern, normalizer


def _normalizer(data: dict, spec: Path) -> str | None:
    """The Unicode normalization a tokenizer.json's normalizer applies (Qwen2's NFC, alone or as a
    one-step Sequence), or None; any other normalizer is refused naming it."""

    normalizer = data.get("normalizer")
    if normalizer is None:
        return None
    steps = normalizer.get("normalizers") if isinstance(normalizer, dict) and normalizer.get("type") == "Sequence" else [normalizer]
    kinds = [step.get("type") if isinstance(step, dict) else step for step in steps or [None]]
    if len(kinds) != 1 or kinds[0] not in NORMALIZERS:
        raise RelayError(f"{spec}: normalizer {' + '.join(map(str, kinds))} is not supported (none, or {', '.join(NORMALIZERS)})")
    return kinds[0]


def _split_pattern(data: dict, spec: Path) -> str | None:
    """The split pattern a tokenizer.json's pre-tokenizer applies before byte-level BPE: a
    `Split` regex followed by `ByteLevel` without its own regex (Llama 3, Qwen2, and relaygpt's
    exports), or None for a lone `ByteLevel` that splits with GPT-2's pattern. Anything else is
    refused naming the key."""
    pre = data.get("pre_tokenizer")
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not steps or not all(isinstance(step, dict) for step in steps):
        raise RelayError(f"{spec}: pre_tokenizer {pre!r:.80} is not supported (a ByteLevel, or a Split regex then ByteLevel)")
    *splits, last = steps
    if last.get("type") != "ByteLevel" or last.get("add_prefix_space") or len(splits) > 1:
        raise RelayError(f"{spec}: pre_tokenizer must end in ByteLevel without add_prefix_space, after at most one Split; "
                         f"got {[step.get('type') for step in steps]}")
    if not splits:
        if last.get("use_regex", True) is False:
            raise RelayError(f"{spec}: pre_tokenizer ByteLevel with use_regex false and no Split does not split words; not supported")
        return None
    split = splits[0]
    pattern = split.get("pattern") if split.get("type") == "Split" else None
    regex = pattern.get("Regex") if isinstance(pattern, dict) else None
    if not isinstance(regex, str) or split.get("behavior") != "Isolated" or split.get("invert") or last.get("use_regex", True):
        raise RelayError(f"{spec}: pre_tokenizer {split.get('type')} must be a Split by a Regex, behavior Isolated, not inverted, "
                         "followed by ByteLevel with use_regex false")
    return regex


def hub_chat_template(path: Path):
    """The model's own chat template (model/chat_template.py) from `chat_template.jinja` or
    tokenizer_config.json's `chat_template` (a string, or named templates: the "default" one),
    with the special-token strings it is rendered with; None when there is none, or when it is
    relaygpt's own (an export of ours renders with model/chat.py, as before)."""
    from model.chat_template import CHAT_TEMPLATE, TEMPLATE_TOKENS, ChatTemplate, token_text

    where = path / "tokenizer_config.json"
    try:
        config = json.loads(where.read_text(encoding="utf-8")) if where.is_file() else {}
        jinja = path / "chat_template.jinja"
        source = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    except (OSError, ValueError, RecursionError) as exc:
        raise RelayError(f"{where}: not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict):
        raise RelayError(f"{where}: expected a JSON object")
    if source is None:
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
    if source is None or source == CHAT_TEMPLATE:
        return None
    if not isinstance(source, str):
        raise RelayError(f"{where}: chat_template must be Jinja text (or a list of named templates with a 'default'), "
                         f"got {type(source).__name__}")
    tokens = {key: token_text(config.get(key)) for key in TEMPLATE_TOKENS}
    return ChatTemplate(source, {k: v for k, v in tokens.items() if v is not None}, f"{where}: chat_template")
