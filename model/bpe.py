"""Byte-level BPE: training on a corpus (the `tokenizers` library's trainer), tiktoken ranks
from what it learned, and GPT-2 file formats.

A vocabulary here is what tiktoken calls mergeable ranks: `dict[bytes, int]`, the 256 single
bytes (in GPT-2's order: printable ones first), then every merged token in the order it was
learned. Encoding merges, inside each pre-tokenised chunk, the adjacent pair whose
concatenation has the lowest rank — the rule tiktoken applies, which `bpe_split` spells out in
plain Python for one chunk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from model.errors import RelayError

# GPT-2's pre-tokenisation pattern (contractions, letters, digits, punctuation, spaces).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts: Iterable[str], num_ranks: int, pat_str: str = GPT2_PATTERN):
    """A byte-level BPE of `num_ranks` tokens (the 256 bytes + merges) trained by the `tokenizers`
    library on `texts`, which it reads once, as they come (an iterator streams).

    Its pre-tokenizer splits by `pat_str`, the regex the tiktoken encoding applies at run time,
    then maps bytes to GPT-2's printable characters; every byte is in the alphabet whether seen
    or not. No special tokens: the Tokenizer places them above the ranks. Returns the library's
    trained `tokenizers.Tokenizer` (`ranks_from_trained` turns it into tiktoken ranks).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if num_ranks < 256:
        raise RelayError(f"vocab size must leave room for the 256 byte tokens, got {num_ranks} ranks")
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trained.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=num_ranks, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(texts, trainer=trainer)
    return trained


def trainer_identity() -> str:
    """What trains a BPE here, part of a training recipe's fingerprint: a tokenizer trained by
    something else (relaygpt's own trainer before, another `tokenizers` release whose ties could
    fall otherwise) is trained again rather than reused."""
    from importlib.metadata import version

    return f"tokenizers-bpe/{version('tokenizers')}"


def ranks_from_trained(trained) -> dict[bytes, int]:
    """tiktoken's mergeable ranks of a byte-level BPE trained by `train_bpe`: each token's id.

    tiktoken merges, in a chunk, the adjacent pair whose concatenation has the lowest rank;
    `tokenizers` applies its merge rules in the order learned. They give the same ids when every
    learned token's id follows its merge's position and tiktoken's rule splits each token back
    into the very pair it was merged from. Both are checked here, so a library release that
    trained otherwise is refused, not silently encoded differently.
    """
    model = json.loads(trained.to_str())["model"]
    decoder = {ch: b for b, ch in bytes_to_unicode().items()}
    ranks = {bytes(decoder[ch] for ch in token): idx for token, idx in model["vocab"].items()}
    if sorted(ranks.values()) != list(range(len(ranks))) or sum(len(tok) == 1 for tok in ranks) != 256:
        raise RelayError("tokenizers' BPE trainer gave a vocabulary that is not the 256 bytes and merges with ids 0..n-1")
    for position, merge in enumerate(model["merges"]):
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        pair = [bytes(decoder[ch] for ch in left), bytes(decoder[ch] for ch in right)]
        rank = ranks[pair[0] + pair[1]]
        if rank != 256 + position or bpe_split(ranks, pair[0] + pair[1], max_rank=rank) != pair:
            raise RelayError(f"tokenizers' BPE trainer learned merge {position} ({left!r} + {right!r}, id {rank}) in a way "
                             "tiktoken's rank rule does not reproduce; this tokenizers release is not supported for training")
    return ranks


def check_text_files(paths: Sequence[str | Path]) -> None:
    """Refuse, before training, a file that cannot be read, and files holding no text at all
    (each file is opened; read only until a line that is not blank has been seen)."""
    has_text = False
    for path in paths:
        try:
            with open(path, encoding="utf-8", errors="replace", newline="") as f:
                if not has_text:
                    has_text = any(line.strip() for line in f)
        except OSError as exc:
            raise RelayError(f"{path}: cannot read ({exc.strerror})") from None
    if not has_text:
        raise RelayError(f"{', '.join(map(str, paths))}: no text to train a tokenizer on")


def file_text_blocks(paths: Iterable[str | Path], block_chars: int = 1 << 20) -> Iterator[str]:
    """The text of `paths`, read as it is consumed, in blocks of `block_chars` characters carried
    on to the end of their line (a longer line is cut), so memory stays bounded whatever the
    files. Bytes that are not UTF-8 read as U+FFFD; line ends are kept."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            while block := f.read(block_chars):
                yield block + f.readline(block_chars)


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
