"""One Tokenizer on top of tiktoken: standard encodings, rank files, trained BPE, chat tokens.

Plain text is always encoded with `encode_ordinary`, so special tokens can never be produced
from user text; the chat template places them by id. A Tokenizer pickles by reference (where
it came from + sha256) and re-loads itself in the receiving process, which is what
`datasets.map(num_proc>1)` and Ray need.

A tokenizer directory holds `tokenizer.json` (name, pattern, special tokens, sha256) and the
rank file `ranks.tiktoken`; model directories carry one, so they never need the network.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import tiktoken

from model.bpe import (GPT2_PATTERN, check_text_files, file_text_blocks, ranks_from_gpt2_files, ranks_from_trained,
                       ranks_to_tiktoken_bytes, train_bpe)
from model.errors import RelayError
from model.hf_tokenizer import NORMALIZERS

EOT = "<|endoftext|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END_OF_TURN)
STANDARD_ENCODINGS = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
RANK_FILE, META_FILE = "ranks.tiktoken", "tokenizer.json"
# sha256 of GPT-2's ranks in canonical .tiktoken form (the bytes of r50k_base.tiktoken).
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_rank_file(path: str | Path, expected_sha256: str | None = None) -> tuple[dict[bytes, int], str]:
    """Ranks from a .tiktoken file, refused when its sha256 differs from the expected one."""
    import base64

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RelayError(f"{path}: cannot read tokenizer rank file ({exc.strerror})") from None
    digest = sha256_bytes(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise RelayError(f"{path}: sha256 {digest[:16]}… does not match the expected {expected_sha256[:16]}…; the file is not the tokenizer it claims to be")
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError:
            raise RelayError(f"{path}:{n}: expected 'base64-token rank', got {line[:40]!r}") from None
    return ranks, digest


class Tokenizer:
    """A tiktoken encoding plus end-of-text and chat special tokens above the base ranks."""

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        pat_str: str,
        special_tokens: dict[str, int],
        sha256: str,
        source: tuple[str, str],
    ) -> None:
        self.name = name
        self.pat_str = pat_str
        self.sha256 = sha256
        self.source = source  # ("standard", name) | ("file", path) | ("dir", path): how to re-load
        specials = dict(special_tokens)
        next_id = max([*ranks.values(), *specials.values()]) + 1
        for token in (EOT, *CHAT_TOKENS):
            if token not in specials:
                specials[token] = next_id
                next_id += 1
        self.special_tokens = specials
        self._special_ids = frozenset(specials.values())
        self.encoding = tiktoken.Encoding(name=f"relaygpt:{name}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
        self.eot_id = specials[EOT]
        self.system_id, self.user_id = specials[SYSTEM], specials[USER]
        self.assistant_id, self.end_of_turn_id = specials[ASSISTANT], specials[END_OF_TURN]
        # A published model's own Jinja chat template (model/chat_template.py), used instead of
        # relaygpt's role tokens when set; None for relaygpt's template.
        self.chat_template = None
        # A Unicode normalization form applied to text before it is split ("NFC", from a hub
        # tokenizer.json's normalizer), or None.
        self.normalizer: str | None = None

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def from_name(cls, name: str) -> Tokenizer:
        """A standard tiktoken encoding (honours TIKTOKEN_CACHE_DIR for offline use)."""
        if name not in STANDARD_ENCODINGS:
            raise RelayError(f"tokenizer: unknown encoding {name!r}; valid: {', '.join(STANDARD_ENCODINGS)}, a .tiktoken file or a tokenizer directory")
        try:
            base = tiktoken.get_encoding(name)
        except Exception as exc:  # tiktoken raises plain errors (network, hash) here
            raise RelayError(
                f"tokenizer {name!r} could not be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                "offline, set TIKTOKEN_CACHE_DIR to a folder holding its rank file or pass the .tiktoken file path"
            ) from None
        ranks = base._mergeable_ranks
        return cls(name, ranks, base._pat_str, base._special_tokens, sha256_bytes(ranks_to_tiktoken_bytes(ranks)), ("standard", name))

    @classmethod
    def from_file(cls, path: str | Path, sha256: str | None = None, pat_str: str | None = None, name: str | None = None) -> Tokenizer:
        """A .tiktoken rank file, checked against `sha256` when given."""
        path = Path(path)
        ranks, digest = load_rank_file(path, sha256)
        # A standard encoding's rank file keeps that encoding's pattern and special tokens,
        # so the file and the name give identical ids.
        standard_pat, specials = _standard_meta(path.stem) or (GPT2_PATTERN, {})
        return cls(name or path.stem, ranks, pat_str or standard_pat, specials, digest, ("file", str(path.resolve())))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """A relaygpt tokenizer directory (tokenizer.json naming ranks.tiktoken), or a Hugging
        Face one (a model directory from the hub: its tokenizer.json, or vocab.json + merges.txt)."""
        path = Path(path)
        meta_path = path / META_FILE
        if not (path / RANK_FILE).exists() and (meta_path.exists() or (path / "vocab.json").exists()):
            return cls.from_hf_dir(path, {})
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RelayError(f"{path}: not a tokenizer directory (no {META_FILE})") from None
        except json.JSONDecodeError as exc:
            raise RelayError(f"{meta_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        except (RecursionError, UnicodeDecodeError, NotADirectoryError) as exc:
            what = "nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8 JSON" \
                if isinstance(exc, UnicodeDecodeError) else "not a directory"
            raise RelayError(f"{meta_path}: {what}; a tokenizer directory holds {META_FILE} and {RANK_FILE}") from None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) for k in ("name", "pat_str")):
            raise RelayError(f"{meta_path}: expected a JSON object with the tokenizer's name and pat_str")
        ranks, digest = load_rank_file(path / RANK_FILE, meta.get("sha256"))
        tok = cls(meta["name"], ranks, meta["pat_str"], meta.get("special_tokens", {}), digest, ("dir", str(path.resolve())))
        if meta.get("normalizer") is not None:
            if meta["normalizer"] not in NORMALIZERS:
                raise RelayError(f"{meta_path}: normalizer {meta['normalizer']!r} is not supported (valid: {', '.join(NORMALIZERS)})")
            tok.normalizer = meta["normalizer"]
        if meta.get("chat_template") is not None:
            from model.chat_template import ChatTemplate

            tok.chat_template = ChatTemplate.from_dict(meta["chat_template"], f"{meta_path}: chat_template")
        return tok

    @classmethod
    def from_gpt2_files(cls, path: str | Path, name: str | None = None, pat_str: str | None = None) -> Tokenizer:
        """The tokenizer of a Hugging Face GPT-2 directory (vocab.json + merges.txt).

        `name` / `pat_str` restore what a relaygpt export recorded in config.json.
        """
        path = Path(path)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not vocab.exists() or not merges.exists():
            raise RelayError(f"{path}: a GPT-2 directory needs vocab.json and merges.txt for its tokenizer")
        ranks, specials = ranks_from_gpt2_files(vocab, merges)
        digest = sha256_bytes(ranks_to_tiktoken_bytes(ranks))
        # GPT-2's own ranks get the exact pattern tiktoken uses for them.
        is_gpt2 = digest == GPT2_SHA256
        if pat_str is None:
            pat_str = _standard_meta("r50k_base")[0] if is_gpt2 else GPT2_PATTERN
        name = name or ("gpt2" if is_gpt2 else f"hf:{path.name}")
        return cls(name, ranks, pat_str, specials, digest, ("hf", str(path.resolve())))

    @classmethod
    def from_hf_dir(cls, path: Path, recorded: dict) -> Tokenizer:
        """The tokenizer of a Hugging Face directory: vocab.json + merges.txt, or the byte-level
        BPE of a tokenizer.json (its vocabulary, merges, added tokens, and the split pattern its
        pre-tokenizer applies, so ids are AutoTokenizer's). `recorded`: the name / pat_str a
        relaygpt export wrote."""
        import tempfile

        from model.hf_tokenizer import hub_chat_template, read_tokenizer_json

        spec = path / "tokenizer.json"
        if not spec.exists():
            if (path / "vocab.json").exists() and (path / "merges.txt").exists():
                tokenizer = cls.from_gpt2_files(path, recorded.get("name"), recorded.get("pat_str"))
                tokenizer.chat_template = hub_chat_template(path)
                return tokenizer
            raise RelayError(f"{path}: no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
        vocab, merges, pattern, normalizer = read_tokenizer_json(spec, recorded.get("pat_str"))
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (Path(tmp) / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
            tokenizer = cls.from_gpt2_files(tmp, recorded.get("name") or f"hf:{path.name}", pattern)
        tokenizer.source = ("hf-json", str(path.resolve()))  # re-loaded from here, not the temporary copy
        tokenizer.normalizer = normalizer
        tokenizer.chat_template = hub_chat_template(path)
        return tokenizer

    @classmethod
    def load(cls, spec: str | Path, sha256: str | None = None) -> Tokenizer:
        """A standard name, a .tiktoken file or a tokenizer directory."""
        text = str(spec)
        if text in STANDARD_ENCODINGS:
            tok = cls.from_name(text)
        elif Path(text).is_dir():
            tok = cls.from_dir(text)
        elif Path(text).is_file():
            tok = cls.from_file(text, sha256)
        else:
            raise RelayError(f"tokenizer: {text!r} is neither a standard encoding ({', '.join(STANDARD_ENCODINGS)}) nor an existing file or directory")
        if sha256 is not None and tok.sha256 != sha256:
            raise RelayError(f"tokenizer {text!r}: sha256 {tok.sha256[:16]}… does not match the expected {sha256[:16]}…")
        return tok

    @classmethod
    def train(cls, texts, vocab_size: int, name: str = "bpe", pat_str: str = GPT2_PATTERN) -> Tokenizer:
        """A byte-level BPE trained by `tokenizers` (model/bpe.py; `texts` are read once, as they
        come) whose full vocabulary (ranks + 5 special tokens) is vocab_size."""
        num_special = 1 + len(CHAT_TOKENS)
        ranks = ranks_from_trained(train_bpe(texts, vocab_size - num_special, pat_str))
        return cls(name, ranks, pat_str, {}, sha256_bytes(ranks_to_tiktoken_bytes(ranks)), ("memory", name))

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json + ranks.tiktoken; the directory re-loads to an identical tokenizer."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        data = ranks_to_tiktoken_bytes(self.encoding._mergeable_ranks)
        (path / RANK_FILE).write_bytes(data)
        meta = {"name": self.name, "pat_str": self.pat_str, "sha256": sha256_bytes(data), "special_tokens": self.special_tokens}
        if self.chat_template is not None:
            meta["chat_template"] = self.chat_template.to_dict()
        if self.normalizer is not None:
            meta["normalizer"] = self.normalizer
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if self.source[0] == "memory":
            self.source = ("dir", str(path.resolve()))
        return path

    # ---- identity and pickling ---------------------------------------------------------

    @property
    def identity(self) -> dict[str, str]:
        """Name and sha256 of the ranks; the normalizer too, where there is one (same ranks,
        different ids)."""
        out = {"name": self.name, "sha256": self.sha256}
        return out if self.normalizer is None else {**out, "normalizer": self.normalizer}

    def __reduce__(self):
        if self.source[0] == "memory":
            raise TypeError("a trained Tokenizer must be saved (Tokenizer.save) before it can be pickled")
        return (_restore, (self.source, self.sha256, self.name, self.pat_str))

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.identity == other.identity and self.special_tokens == other.special_tokens \
            and self.chat_template_sha256 == other.chat_template_sha256

    @property
    def chat_template_sha256(self) -> str | None:
        """sha256 of the model's own chat template, None for relaygpt's."""
        return None if self.chat_template is None else self.chat_template.sha256

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_vocab={self.n_vocab}, sha256={self.sha256[:12]}…)"

    # ---- encoding ------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Ids this tokenizer can produce: base ranks and special tokens."""
        return self.encoding.n_vocab

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self.encoding._mergeable_ranks

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(self._normalize(text))

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch([self._normalize(t) for t in texts], num_threads=num_threads)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Encode raw bytes, invalid UTF-8 included (decode_bytes gives them back exactly; a
        normalizer applies to valid UTF-8 only)."""
        if self.normalizer is not None:
            try:
                data = self._normalize(data.decode("utf-8")).encode("utf-8")
            except UnicodeDecodeError:
                pass
        return self.encoding._encode_bytes(data)

    def _normalize(self, text: str) -> str:
        """The published tokenizer's Unicode normalization (Qwen2's NFC), applied before splitting."""
        return text if self.normalizer is None else unicodedata.normalize(self.normalizer, text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids


def _standard_meta(stem: str) -> tuple[str, dict[str, int]] | None:
    """Pattern and special tokens of the standard encoding whose rank file is named `stem`.

    tiktoken keeps the patterns inside its encoding constructors, which also load the rank
    file; the loaders are stubbed for the call so that only the pattern is read.
    """
    from unittest import mock

    try:
        from tiktoken_ext import openai_public
    except ImportError:
        return None
    if stem not in STANDARD_ENCODINGS:
        return None
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: {}), \
            mock.patch.object(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {}):
        spec = openai_public.ENCODING_CONSTRUCTORS[stem]()
    return spec["pat_str"], spec["special_tokens"]


def _restore(source: tuple[str, str], sha256: str, name: str, pat_str: str) -> Tokenizer:
    """Re-load a pickled Tokenizer from where it came from, and check it is the same one."""
    kind, ref = source
    if kind == "standard":
        tok = Tokenizer.from_name(ref)
    elif kind == "file":
        tok = Tokenizer.from_file(ref, sha256, pat_str=pat_str, name=name)
    elif kind == "hf":
        from model.hf_tokenizer import hub_chat_template

        tok = Tokenizer.from_gpt2_files(ref, name, pat_str)
        tok.chat_template = hub_chat_template(Path(ref))
    elif kind == "hf-json":
        tok = Tokenizer.from_hf_dir(Path(ref), {"name": name, "pat_str": pat_str})
    else:
        tok = Tokenizer.from_dir(ref)
    if tok.sha256 != sha256:
        raise RelayError(f"tokenizer {ref}: changed on disk since it was loaded (sha256 {tok.sha256[:16]}… != {sha256[:16]}…)")
    return tok


def train_tokenizer_from_files(paths: list[str | Path], vocab_size: int, out: str | Path, name: str | None = None) -> Tokenizer:
    """`relaygpt tokenizer train`: BPE on the given text files, saved to `out` (a directory of
    its own, marked as relaygpt's: a user's folder there is refused before training)."""
    from model.owned import check_owned, claim

    _check_output_dir(Path(out))
    check_owned(out, "tokenizer", "--out")
    check_text_files(paths)
    if vocab_size < 256 + 1 + len(CHAT_TOKENS) + 1:
        raise RelayError(f"--vocab-size must be at least {256 + 2 + len(CHAT_TOKENS)} (256 bytes, special tokens, one merge), got {vocab_size}")
    tok = Tokenizer.train(file_text_blocks(paths), vocab_size, name=name or Path(out).name)
    tok.save(claim(out, "tokenizer", "--out"))
    return tok


def _check_output_dir(out: Path) -> None:
    """Refuse an output directory that could not be created, before any training."""
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                raise RelayError(f"--out {out}: {place} is a file, not a directory")
            return


def vocabulary_shortfall(tokenizer: Tokenizer, asked: int) -> str | None:
    """A warning when the corpus allowed fewer ids than `asked`, else None.

    BPE stops merging when every word of the corpus is one token, so a small corpus yields a smaller
    (still complete and consistent) vocabulary. That is not an error: the model's vocabulary is
    the tokenizer's real size, and only more text could give more merges. But the size asked
    for was not met, and the user must be told rather than find out from a count later.
    """
    if tokenizer.n_vocab >= asked:
        return None
    return (f"the corpus allowed only {tokenizer.n_vocab} ids, not the {asked} asked for "
            f"(after {tokenizer.n_vocab - 256 - 1 - len(CHAT_TOKENS)} merges every word of it was one token); "
            "train on more text for a larger vocabulary")
