"""Answers: how a generated answer is compared with its target, and where a completion stops."""

from __future__ import annotations

import re


def normalize(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD-style)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """GSM8K's convention: the number after '####', else the last number in the text."""
    if "####" in text:
        text = text.split("####")[-1]
        found = _NUMBER.findall(text)
        return _canonical_number(found[0]) if found else None
    found = _NUMBER.findall(text)
    return _canonical_number(found[-1]) if found else None


def _canonical_number(raw: str) -> str:
    value = raw.replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else str(number)


def score(metric: str, prediction: str, target: str) -> bool:
    if metric == "numeric":
        return extract_number(prediction) is not None and extract_number(prediction) == extract_number(target)
    if metric == "multiple_choice":
        # BBH targets are short: "(B)", "True", "42". The answer is the first line's leading token(s).
        first = prediction.strip().split("\n")[0]
        return normalize(first).startswith(normalize(target)) and normalize(target) != ""
    return normalize(prediction) == normalize(target)


def apply_stops(text: str, stops: list[str]) -> str:
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]
