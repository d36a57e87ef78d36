"""Tokenizer: standard encodings match tiktoken, rank files are hash-checked, a BPE trained by the
`tokenizers` library encodes through tiktoken exactly as the library does."""

import os
import pickle
import random
import subprocess
import sys

import pytest
import tiktoken

from model.bpe import GPT2_PATTERN, bpe_split, train_bpe
from model.errors import RelayError
from model.tokenizer import CHAT_TOKENS, EOT, Tokenizer


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_standard_encoding_matches_tiktoken_on_all_of_shakespeare(name, shakespeare):
    ours = Tokenizer.from_name(name)
    reference = tiktoken.get_encoding(name)
    assert ours.encode(shakespeare) == reference.encode_ordinary(shakespeare)
    # The batch path used by the data pipeline gives the same ids.
    blocks = shakespeare.split("\n\n")[:500]
    assert ours.encode_batch(blocks) == reference.encode_ordinary_batch(blocks)


@pytest.mark.parametrize("name, file", [("gpt2", "r50k_base.tiktoken"), ("cl100k_base", "cl100k_base.tiktoken")])
def test_explicit_rank_file_gives_the_same_ids(name, file, shared_data, shakespeare):
    import hashlib

    path = shared_data / "tiktoken" / file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    from_file = Tokenizer.from_file(path, sha256=digest)
    assert from_file.encode(shakespeare) == tiktoken.get_encoding(name).encode_ordinary(shakespeare)
    assert from_file.sha256 == Tokenizer.from_name(name).sha256 == digest
    assert from_file.eot_id == Tokenizer.from_name(name).eot_id


def test_rank_file_with_wrong_hash_is_refused(shared_data, tmp_path):
    good = shared_data / "tiktoken" / "r50k_base.tiktoken"
    tampered = tmp_path / "r50k_base.tiktoken"
    data = bytearray(good.read_bytes())
    data[100] ^= 1
    tampered.write_bytes(bytes(data))
    import hashlib

    with pytest.raises(RelayError, match=r"r50k_base\.tiktoken: sha256 .* does not match"):
        Tokenizer.from_file(tampered, sha256=hashlib.sha256(good.read_bytes()).hexdigest())


def test_unknown_encoding_is_a_clear_error():
    with pytest.raises(RelayError, match="neither a standard encoding"):
        Tokenizer.load("gpt7")


def test_special_tokens_sit_above_the_base_vocabulary_and_never_come_from_text(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert tok.eot_id == 50256  # GPT-2's own end-of-text keeps its id
    chat_ids = [tok.special_tokens[t] for t in CHAT_TOKENS]
    assert chat_ids == [50257, 50258, 50259, 50260]
    text = f"{EOT} hi {''.join(CHAT_TOKENS)}"
    ids = tok.encode(text)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == text


def test_pickles_by_reference_and_works_in_datasets_map(gpt2_tokenizer, trained_tokenizer):
    for tok in (gpt2_tokenizer, trained_tokenizer):
        data = pickle.dumps(tok)
        assert len(data) < 1000  # a path and a hash, not the vocabulary
        again = pickle.loads(data)
        assert again == tok and again.encode("To be, or not") == tok.encode("To be, or not")
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["To be, or not to be", "that is the question"] * 8})
    tok = trained_tokenizer
    out = ds.map(lambda batch: {"ids": tok.encode_batch(batch["text"])}, batched=True, num_proc=2)
    assert out["ids"] == [tok.encode(t) for t in ds["text"]]


# Text the equality checks encode: prose, several scripts, code, emoji (with modifiers and ZWJ
# sequences), digits, odd whitespace and contractions.
MIXED_TEXTS = [
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
    "Grüße aus München! Ünïcödé façade naïve — «quotes» and ‘single’ ones; they'll, we've, I'd",
    "Привет, мир! Как дела? Ελληνικά γράμματα. עברית ועוד. العربية هنا.",
    "日本語のテキストと中文文本，还有한국어 문장도 있습니다。数字 12345 and ١٢٣ and ½ ²",
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n\n\tif (a && b) { x[i] += 1; }\r\n",
    "emoji 🤖🎉 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ and tabs\t\t, many   spaces   , trailing  \n\n\n",
    "SELECT name, COUNT(*) FROM users WHERE id >= 10 GROUP BY name; -- sql\n<div class=\"x\">&amp;</div>",
]


def test_trained_bpe_gives_the_tokenizers_librarys_ids(shakespeare):
    """The ranks converted from what `tokenizers` trained encode, through tiktoken, to the
    library's own ids on mixed text (text it was trained on and text it was not)."""
    corpus = [shakespeare[:60_000], *(MIXED_TEXTS[:-1] * 8)]
    library = train_bpe(iter(corpus), 500, GPT2_PATTERN)
    ours = Tokenizer.train(iter(corpus), 505, name="mixed")
    assert ours.n_vocab == 505 and max(ours.mergeable_ranks.values()) == 499
    assert any(len(t) > 1 and t[0] >= 0x80 for t in ours.mergeable_ranks)  # multi-byte characters were merged
    for text in [*MIXED_TEXTS, shakespeare[400_000:420_000], "".join(MIXED_TEXTS)]:
        ids = ours.encode(text)
        assert ids == library.encode(text).ids, text[:40]
        assert ours.decode(ids) == library.decode(ids) == text
    assert [ours.special_tokens[t] for t in (EOT, *CHAT_TOKENS)] == [500, 501, 502, 503, 504]


def test_training_is_deterministic_and_streams(tmp_path, shakespeare):
    """Two trainings on the same text, one fed document by document from a generator, write
    identical files."""
    docs = [shakespeare[:40_000], *MIXED_TEXTS]
    first = Tokenizer.train(docs, 400, name="det").save(tmp_path / "a")
    second = Tokenizer.train((doc for doc in docs), 400, name="det").save(tmp_path / "b")
    for name in ("ranks.tiktoken", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_trained_bpe_round_trips_any_bytes(trained_tokenizer):
    tok = trained_tokenizer
    rng = random.Random(0)
    cases = [b"\xff\xfe\x80 invalid utf-8 \xc3", "emoji 🤖 mixed".encode(), b"", bytes(range(256))]
    cases += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(200)]
    for data in cases:
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_every_merge_is_reachable(trained_tokenizer):
    ranks = trained_tokenizer.mergeable_ranks
    for token, rank in ranks.items():
        if len(token) > 1:
            assert len(bpe_split(ranks, token, max_rank=rank)) == 2, token


def test_saved_directory_reloads_identically(trained_tokenizer, tmp_path):
    path = trained_tokenizer.save(tmp_path / "tok")
    again = Tokenizer.load(path)
    assert again == trained_tokenizer
    assert again.special_tokens == trained_tokenizer.special_tokens


def test_cli_trains_a_bpe_on_shakespeare(shared_data, tmp_path):
    from model.tokenizer import train_tokenizer_from_files

    corpus = shared_data / "pretrain" / "tinyshakespeare.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tokenizer", "train", "--input", str(corpus), "--vocab-size", "512",
         "--out", str(tmp_path / "cli" / "tok")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(tmp_path / "cli" / "tok")
    assert tok.n_vocab == 512
    text = corpus.read_text()[:5000]
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 1.8  # it actually compresses
    # Another process, the same files: training does not depend on hash seeds or threads.
    train_tokenizer_from_files([corpus], 512, tmp_path / "here" / "tok")
    for name in ("ranks.tiktoken", "tokenizer.json"):
        assert (tmp_path / "cli" / "tok" / name).read_bytes() == (tmp_path / "here" / "tok" / name).read_bytes()


def test_merges_tiktoken_cannot_reproduce_are_refused():
    """The conversion checks what it assumes of the trainer: here a learned token whose id does
    not follow its merge's position (tiktoken would apply that merge too early)."""
    from tokenizers import Tokenizer as Library
    from tokenizers import models

    from model.bpe import bytes_to_unicode, ranks_from_trained

    alphabet = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab = {**alphabet, "ab": 257, "bc": 256}  # merged first, but with the later id
    with pytest.raises(RelayError, match=r"merge 0 \('a' \+ 'b', id 257\).*not supported for training"):
        ranks_from_trained(Library(models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c")])))


def test_files_stream_in_bounded_blocks_that_add_up_to_them(tmp_path):
    from model.bpe import file_text_blocks

    (tmp_path / "a.txt").write_bytes(b"one\ntwo lines\r\nthree" * 40 + b"x" * 300)
    (tmp_path / "b.txt").write_bytes(b"\xff not utf-8\n")
    blocks = list(file_text_blocks([tmp_path / "a.txt", tmp_path / "b.txt"], block_chars=64))
    assert "".join(blocks) == (tmp_path / "a.txt").read_bytes().decode() + "\ufffd not utf-8\n"
    assert max(map(len, blocks)) <= 128 and sum(b.endswith("\n") for b in blocks) > len(blocks) // 2


def test_tokenizer_train_on_blank_files_is_refused_before_writing(tmp_path):
    from model.tokenizer import train_tokenizer_from_files

    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(RelayError, match=r"blank\.txt: no text to train a tokenizer on"):
        train_tokenizer_from_files([tmp_path / "blank.txt"], 512, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_cli_train_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "tokenizer", "train", "--input", str(tmp_path / "nope.txt"),
                           "--vocab-size", "512", "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
