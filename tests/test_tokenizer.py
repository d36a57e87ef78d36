"""Tokenizer: standard encodings match tiktoken, rank files are hash-checked, trained BPE is exact."""

import os
import pickle
import random
import subprocess
import sys

import pytest
import tiktoken

from model.bpe import bpe_split, reference_encode
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


def test_trained_bpe_matches_naive_reference(trained_tokenizer, shakespeare):
    tok = trained_tokenizer
    assert tok.n_vocab == 1024
    sample = shakespeare[400_000:430_000] + " Ünïcödé, emoji 🤖🎉 and 数字 12345 "
    assert tok.encode(sample) == reference_encode(tok.mergeable_ranks, sample, tok.pat_str)


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


def test_cli_trains_4096_vocab_on_shakespeare(shared_data, tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tokenizer", "train", "--input", str(shared_data / "pretrain" / "tinyshakespeare.txt"),
         "--vocab-size", "4096", "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tok = Tokenizer.load(out)
    assert tok.n_vocab == 4096
    text = (shared_data / "pretrain" / "tinyshakespeare.txt").read_text()[:5000]
    assert tok.encode(text) == reference_encode(tok.mergeable_ranks, text, tok.pat_str)
    assert len(tok.encode(text)) < len(text) / 2.5  # it actually compresses


def test_cli_train_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "tokenizer", "train", "--input", str(tmp_path / "nope.txt"),
                           "--vocab-size", "512", "--out", str(tmp_path / "t")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
