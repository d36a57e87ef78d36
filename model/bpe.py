"""Byte-level BPE: training on a corpus, a naive reference encoder, and GPT-2 file formats.

A vocabulary here is what tiktoken calls mergeable ranks: `dict[bytes, int]`, the 256 single
bytes first, then every merged token in the order it was learned. Encoding merges, inside
each pre-tokenised chunk, the adjacent pair whose concatenation has the lowest rank — the
rule tiktoken applies, which `reference_encode` spells out in plain Python.
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex

from model.errors import RelayError

# GPT-2's pre-tokenisation pattern (contractions, letters, digits, punctuation, spaces).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts: Iterable[str], num_ranks: int, pat_str: str = GPT2_PATTERN) -> dict[bytes, int]:
    """Learn mergeable ranks (256 bytes + up to num_ranks - 256 merges) from `texts`.

    Pair counts are kept incrementally: a merge only revisits the distinct pre-tokens that
    contain the pair, so 4k merges over tinyshakespeare take seconds, not minutes. Ties
    between equally frequent pairs go to the lexicographically smaller pair of bytes.
    """
    if num_ranks < 256:
        raise RelayError(f"vocab size must leave room for the 256 byte tokens, got {num_ranks} ranks")
    pattern = regex.compile(pat_str)
    chunk_counts: Counter[str] = Counter()
    for text in texts:
        chunk_counts.update(pattern.findall(text))
    token_bytes: list[bytes] = [bytes([b]) for b in range(256)]
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    freqs = list(chunk_counts.values())

    pair_counts: Counter[tuple[int, int]] = Counter()
    pair_words: dict[tuple[int, int], set[int]] = {}
    for w, (ids, freq) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += freq
            pair_words.setdefault(pair, set()).add(w)

    def heap_key(pair):
        return (-pair_counts[pair], token_bytes[pair[0]], token_bytes[pair[1]], pair)

    heap = [heap_key(p) for p in pair_counts]
    heapq.heapify(heap)
    ranks = {tok: i for i, tok in enumerate(token_bytes)}
    while len(ranks) < num_ranks and heap:
        neg_count, _, _, pair = heapq.heappop(heap)
        if pair_counts.get(pair, 0) != -neg_count or neg_count == 0:
            continue  # stale entry: the count changed since it was pushed
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in ranks:  # the same bytes were already learned through another split
            new_id = ranks[merged]
        else:
            new_id = len(token_bytes)
            token_bytes.append(merged)
            ranks[merged] = new_id
        touched: set[tuple[int, int]] = set()
        for w in pair_words.pop(pair, set()):
            ids, freq = words[w], freqs[w]
            for old in zip(ids, ids[1:]):
                pair_counts[old] -= freq
                touched.add(old)
            words[w] = ids = _merge_pair(ids, pair, new_id)
            for new in zip(ids, ids[1:]):
                pair_counts[new] += freq
                pair_words.setdefault(new, set()).add(w)
                touched.add(new)
        pair_counts.pop(pair, None)
        for p in touched:
            if pair_counts.get(p, 0) > 0:
                heapq.heappush(heap, heap_key(p))
    return ranks


def _merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def bpe_split(ranks: dict[bytes, int], piece: bytes, max_rank: int | None = None) -> list[bytes]:
    """Merge the bytes of `piece`, lowest-ranked adjacent pair first, using ranks < max_rank."""
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (max_rank is None or rank < max_rank):
                if best_rank is None or rank < best_rank:
                    best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def reference_encode(ranks: dict[bytes, int], text: str, pat_str: str = GPT2_PATTERN) -> list[int]:
    """Deliberately naive encoder (regex chunks, then merges by rank): the test oracle."""
    ids: list[int] = []
    for chunk in regex.findall(pat_str, text):
        ids.extend(ranks[part] for part in bpe_split(ranks, chunk.encode("utf-8")))
    return ids


# ---- the .tiktoken rank file -------------------------------------------------------------

def ranks_to_tiktoken_bytes(ranks: dict[bytes, int]) -> bytes:
    """The canonical .tiktoken file: `base64(token) rank` per line, in rank order."""
    import base64

    lines = [base64.b64encode(tok) + b" " + str(rank).encode() for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    return b"\n".join(lines) + b"\n"


# ---- GPT-2 / Hugging Face files (vocab.json + merges.txt) --------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters used in vocab.json."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_from_gpt2_files(vocab_json: Path, merges_txt: Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Mergeable ranks and special tokens from a GPT-2 style vocab.json + merges.txt.

    The ids in vocab.json become the ranks, which is only valid when they follow the merge
    order (true for GPT-2 and every tokenizer trained the same way); otherwise a clear error.
    Entries that are neither a single byte nor the result of a merge are special tokens.
    """
    try:
        vocab: dict[str, int] = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RelayError(f"{vocab_json}: cannot read a GPT-2 vocabulary ({exc})") from None
    decoder = {ch: b for b, ch in bytes_to_unicode().items()}
    merges = []
    for n, line in enumerate(Path(merges_txt).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise RelayError(f"{merges_txt}:{n}: expected two tokens separated by a space, got {line!r}")
        merges.append(parts[0] + parts[1])
    mergeable = set(bytes_to_unicode().values()) | set(merges)
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token, idx in vocab.items():
        if token in mergeable:
            try:
                ranks[bytes(decoder[ch] for ch in token)] = idx
            except KeyError:
                raise RelayError(f"{vocab_json}: token {token!r} is not in GPT-2 byte encoding") from None
        else:
            specials[token] = idx
    merge_ids = [vocab.get(m) for m in merges]
    if any(i is None for i in merge_ids) or any(a >= b for a, b in zip(merge_ids, merge_ids[1:])):
        raise RelayError(f"{merges_txt}: merge order does not follow the vocabulary ids; only GPT-2-style BPE files are supported")
    if len(ranks) != 256 + len(merges):
        raise RelayError(f"{vocab_json}: expected {256 + len(merges)} byte and merge tokens, found {len(ranks)}")
    return ranks, specials


def gpt2_files_from_ranks(ranks: dict[bytes, int], specials: dict[str, int]) -> tuple[dict[str, int], list[str]]:
    """vocab.json content and merges.txt lines that reproduce `ranks` in GPT-2 format."""
    enc = bytes_to_unicode()

    def show(tok: bytes) -> str:
        return "".join(enc[b] for b in tok)

    vocab = {show(tok): rank for tok, rank in ranks.items()}
    vocab.update(specials)
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = bpe_split(ranks, tok, max_rank=rank)
        if len(parts) != 2:
            raise RelayError(f"token {tok!r} (rank {rank}) cannot be expressed as a single merge")
        merges.append(f"{show(parts[0])} {show(parts[1])}")
    return vocab, merges
