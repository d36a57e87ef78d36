"""Data pipelines on the real files in ../shared/data: shards, SFT rendering, caching, loader."""

import json

import numpy as np
import pytest
import tiktoken
import torch
import yaml

from jobs.plan import data_plan
from jobs.spec import load_job
from model.chat import render_chat
from pipelines.data.loader import BatchLoader, open_split
from pipelines.data.prepare import prepare_data
from pipelines.data.shards import load_split, read_manifest


def write_job(tmp_path, data, tokenizer=None, name="t", **extra):
    job = {"name": name, "model": {"preset": "tiny", "block_size": 128}, "tokenizer": tokenizer or {"encoding": "gpt2"}, "data": data, **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def prepare(path, *overrides):
    job = load_job(path, list(overrides))
    return job, prepare_data(data_plan(job), job.run_dir())


def test_shakespeare_shards_hold_exactly_the_gpt2_tokens(tmp_path, shared_data, shakespeare):
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.0, "sources": [{"type": "text", "path": str(shared_data / "pretrain" / "tinyshakespeare.txt")}]}})
    job, out = prepare(path)
    m = out["pretrain"]
    expected = tiktoken.get_encoding("gpt2").encode_ordinary(shakespeare)
    assert m["dtype"] == "uint16" and m["splits"]["train"]["documents"] == 1
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == len(expected) + 1  # + one end-of-text
    tokens = np.asarray(load_split(job.run_dir() / "data" / "pretrain", m, "train"))
    assert tokens[-1] == 50256 and list(tokens[:-1]) == expected
    assert out["tokenizer"].decode(tokens[:-1]) == shakespeare


def test_blank_line_documents_split_by_document_and_decode_back(tmp_path, shared_data, shakespeare):
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.1, "shard_tokens": 50_000,
                                             "sources": [{"type": "text", "path": str(shared_data / "pretrain" / "tinyshakespeare.txt"), "split_by": "blank_line"}]}})
    job, out = prepare(path)
    m, tok = out["pretrain"], out["tokenizer"]
    blocks = [b.strip() for b in shakespeare.split("\n\n") if b.strip()]
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(blocks)
    assert m["splits"]["val"]["documents"] > 0 and len(m["splits"]["train"]["shards"]) > 1
    docs = []
    for split in ("train", "val"):
        tokens = np.asarray(load_split(job.run_dir() / "data" / "pretrain", m, split))
        assert tokens[-1] == tok.eot_id
        segments = np.split(tokens, np.flatnonzero(tokens == tok.eot_id) + 1)[:-1]  # each ends with end-of-text
        docs += [tok.decode(seg[:-1]) for seg in segments]
    assert sorted(docs) == sorted(blocks)


def test_second_prepare_does_no_work_and_changes_re_prepare(tmp_path, shared_data):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((shared_data / "pretrain" / "tinystories_sample.txt").read_text())
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": "corpus.txt", "split_by": "blank_line"}]}})
    job, first = prepare(path)
    shard = job.run_dir() / "data" / "pretrain" / first["pretrain"]["splits"]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    _, second = prepare(path)
    assert second["pretrain"]["cached"] and shard.stat().st_mtime_ns == mtime
    corpus.write_text(corpus.read_text() + "\n\nOne more story about a cat.")
    _, third = prepare(path)
    assert not third["pretrain"]["cached"] and third["pretrain"]["stats"]["documents"] == first["pretrain"]["stats"]["documents"] + 1
    _, fourth = prepare(path, "tokenizer.encoding=cl100k_base")
    assert not fourth["pretrain"]["cached"] and fourth["pretrain"]["tokenizer"]["name"] == "cl100k_base"


@pytest.mark.parametrize("file, fmt", [("messages_demo.json", "messages"), ("sharegpt_demo.json", "sharegpt"),
                                       ("alpaca_demo.json", "alpaca"), ("prompt_response_demo.jsonl", "prompt_response")])
def test_every_instruction_format_renders(tmp_path, shared_data, file, fmt):
    path = write_job(tmp_path, {"sft": {"sources": [{"type": "json", "path": str(shared_data / "instruct" / file)}]}})
    job, out = prepare(path)
    m = out["sft"]
    assert m["formats"] == [fmt]
    st = m["stats"]
    assert st["conversations"] > 0 and 0 < st["supervised_fraction"] < 1
    rows = open_split(job.run_dir() / "data" / "sft", "train")
    tok = out["tokenizer"]
    ends = 0
    for r in range(rows.num_windows):
        tokens, mask = rows.window(r)
        assert tokens[0] in (tok.system_id, tok.user_id) and mask[0] == 0
        # Every supervised run that is not cut by the row's end closes with the end-of-turn token.
        closing = [i for i in range(1, len(mask)) if mask[i - 1] == 1 and mask[i] == 0]
        assert all(tokens[i - 1] == tok.end_of_turn_id for i in closing)
        ends += len(closing)
    assert ends > 0


def test_loss_mask_is_exactly_the_assistant_tokens(gpt2_tokenizer):
    tok = gpt2_tokenizer
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "See you"}]
    ids, mask = render_chat(tok, messages)

    def e(text):  # a turn's content follows its header after one space
        return tok.encode(" " + text)

    expected_ids = [tok.system_id, *e("Be kind."), tok.end_of_turn_id, tok.user_id, *e("Hi there"), tok.end_of_turn_id,
                    tok.assistant_id, *e("Hello!"), tok.end_of_turn_id, tok.user_id, *e("Bye"), tok.end_of_turn_id,
                    tok.assistant_id, *e("See you"), tok.end_of_turn_id]
    expected_mask = [0] * (len(e("Be kind.")) + 2) + [0] * (len(e("Hi there")) + 2) + [0] + [1] * (len(e("Hello!")) + 1) \
        + [0] * (len(e("Bye")) + 2) + [0] + [1] * (len(e("See you")) + 1)
    assert ids == expected_ids and mask == expected_mask


def test_sft_packing_counts_truncation_and_drops(tmp_path):
    long_user = " ".join(["word"] * 400)
    rows = [
        {"messages": [{"role": "user", "content": "short?"}, {"role": "assistant", "content": "yes"}]},
        {"messages": [{"role": "user", "content": long_user}, {"role": "assistant", "content": "too late"}]},  # no target left
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " ".join(["ok"] * 300)}]},  # truncated, kept
        {"messages": [{"role": "user", "content": "no answer"}]},  # ends without an assistant turn
    ]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_job(tmp_path, {"sft": {"val_fraction": 0.0, "sources": [{"type": "json", "path": "c.jsonl"}]}})
    _, out = prepare(path)
    st = out["sft"]["stats"]
    assert (st["truncated"], st["dropped_no_supervised_tokens"], st["dropped_no_assistant_turn"]) == (2, 1, 1)
    assert out["sft"]["splits"]["train"]["rows"] == 2


def test_prepared_sft_rows_part_at_each_conversation(tmp_path):
    from model.errors import RelayError

    chats = [{"messages": [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}"}]}
             for i in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    path = write_job(tmp_path, {"sft": {"val_fraction": 0.0, "sources": [{"type": "json", "path": "c.jsonl"}]}})
    job, out = prepare(path)
    tok, directory = out["tokenizer"], job.run_dir() / "data" / "sft"
    assert job.data.sft.separate_documents and out["sft"]["eot_id"] == tok.eot_id
    assert isinstance(next(BatchLoader(open_split(directory, "train"), 1))[0], torch.Tensor)  # off: plain (x, y)
    (x, document_ids), y = next(BatchLoader(open_split(directory, "train", separate_documents=True), 1))
    starts = [*np.flatnonzero(x[0].numpy() == tok.user_id), int(np.flatnonzero(x[0].numpy() == tok.eot_id)[2]) + 1]
    assert len(starts) == 4  # three conversations in one row, then padding
    for k in range(3):
        assert (document_ids[0, starts[k] : starts[k + 1]] == k).all()
    manifest = read_manifest(directory)
    del manifest["eot_id"]  # as an older relaygpt prepared it
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RelayError, match="re-run relaygpt data prepare"):
        open_split(directory, "train", separate_documents=True)


def test_parquet_csv_and_weights(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha beta", "gamma delta", "epsilon"]}), tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("content,other\nfirst row,1\nsecond row,2\n")
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.0, "sources": [
        {"type": "parquet", "path": "d.parquet", "field": "body", "weight": 2.0},
        {"type": "csv", "path": "d.csv", "field": "content", "weight": 0.5}]}})
    _, out = prepare(path)
    # Preparation keeps every document once whatever the weight (mixtures are drawn by weight when training data is loaded).
    m = out["pretrain"]
    assert m["stats"]["documents"] == 3 + 2
    assert [s["documents"] for s in m["splits"]["train"]["sources"]] == [3, 2]
    assert [s["source"] for s in m["splits"]["train"]["shards"]] == [0, 1]


def test_loader_resumes_exactly_and_ranks_are_disjoint(tmp_path, shared_data):
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": str(shared_data / "pretrain" / "tinyshakespeare.txt")}]}})
    job, _ = prepare(path)
    windows = open_split(job.run_dir() / "data" / "pretrain", "train", seq_len=128)
    full = BatchLoader(windows, 4, seed=3)
    reference = [next(full) for _ in range(12)]
    first = BatchLoader(windows, 4, seed=3)
    for _ in range(5):
        next(first)
    saved = json.loads(json.dumps(first.state_dict()))  # through a checkpoint's serialisation
    resumed = BatchLoader(windows, 4, seed=3)
    resumed.load_state_dict(saved)
    for k in range(5, 12):
        x, y = next(resumed)
        assert np.array_equal(x, reference[k][0]) and np.array_equal(y, reference[k][1])
    # Two data-parallel ranks over one epoch: disjoint, and together every window but the remainder.
    ranks = [BatchLoader(windows, 4, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    seen = [set(), set()]
    for _ in range(ranks[0].steps_per_epoch):
        for r in range(2):
            seen[r].update(ranks[r].next_indices().tolist())
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == windows.num_windows - windows.num_windows % 8
    assert ranks[0].next_indices() is not None and ranks[0].state.epoch == 1


def test_synthetic_world_keeps_held_out_facts_out_of_sft(tmp_path):
    from pipelines.data import synthetic

    world = synthetic.build_world(0, 48, 0.25)
    assert world == synthetic.build_world(0, 48, 0.25)
    convs = synthetic.sft_conversations(world, 0)
    sft_text = " ".join(m["content"] for c in convs for m in c["messages"])
    corpus = " ".join(synthetic.pretrain_documents(world, 0, mentions_per_fact=8))
    for person in world.held_out_people:
        assert person.name not in sft_text
        assert corpus.count(person.name) >= 3 * 8
    evals = synthetic.eval_examples(world)
    assert len(evals) == 3 * len(world.held_out_people) and all(e["person"] in world.held_out for e in evals)


DOLLY = [  # the columns of databricks-dolly-15k: instruction, context, response, category
    {"instruction": "When did Virgin Australia start operating?", "category": "closed_qa",
     "context": "Virgin Australia commenced services on 31 August 2000 as Virgin Blue.", "response": "On 31 August 2000."},
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
]


def test_fields_map_dolly_columns_without_conversion(tmp_path):
    (tmp_path / "dolly.jsonl").write_text("".join(json.dumps(r) + "\n" for r in DOLLY))
    fields = {"instruction": "instruction", "input": "context", "output": "response"}
    path = write_job(tmp_path, {"sft": {"val_fraction": 0.0, "sources": [{"type": "json", "path": "dolly.jsonl", "fields": fields}]}})
    job, out = prepare(path)
    assert out["sft"]["formats"] == ["alpaca"] and out["sft"]["stats"]["conversations"] == 2
    tok = out["tokenizer"]
    rows = open_split(job.run_dir() / "data" / "sft", "train")
    tokens, mask = rows.window(0)
    expected = []
    for r in DOLLY:  # what an Alpaca record with the same text renders to
        prompt = r["instruction"] + ("\n\n" + r["context"] if r["context"] else "")
        ids, m = render_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["response"]}])
        expected.append((ids + [tok.eot_id], m + [0]))
    ids = [i for e in expected for i in e[0]]
    assert list(tokens[: len(ids)]) == ids and list(mask[: len(ids)]) == [b for e in expected for b in e[1]]


def test_fields_map_a_messages_column(tmp_path, shared_data):
    records = json.loads((shared_data / "instruct" / "messages_demo.json").read_text())[:20]
    (tmp_path / "dialogs.jsonl").write_text("".join(json.dumps({"dialog": r["messages"], "id": i}) + "\n" for i, r in enumerate(records)))
    plain = write_job(tmp_path, {"sft": {"val_fraction": 0.0, "sources": [{"type": "json", "path": str(shared_data / "instruct" / "messages_demo.json")}]}},
                      name="plain")
    mapped = write_job(tmp_path, {"sft": {"val_fraction": 0.0, "sources": [{"type": "json", "path": "dialogs.jsonl", "fields": {"messages": "dialog"}}]}},
                       name="mapped")
    job, out = prepare(mapped)
    assert out["sft"]["formats"] == ["messages"] and out["sft"]["stats"]["conversations"] == 20
    reference_job, _ = prepare(plain)
    ours = open_split(job.run_dir() / "data" / "sft", "train").window(0)
    theirs = open_split(reference_job.run_dir() / "data" / "sft", "train").window(0)  # the same first records
    assert np.array_equal(ours[0], theirs[0]) and np.array_equal(ours[1], theirs[1])


def test_a_changed_tokenizer_directory_re_prepares(tmp_path, shared_data):
    from model.tokenizer import Tokenizer

    tok_dir = tmp_path / "tok"
    Tokenizer.from_name("gpt2").save(tok_dir)
    (tmp_path / "corpus.txt").write_text((shared_data / "pretrain" / "tinystories_sample.txt").read_text())
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": "corpus.txt"}]}}, tokenizer={"dir": "tok"})
    _, first = prepare(path)
    _, again = prepare(path)
    assert first["tokenizer"].name == "gpt2" and again["pretrain"]["cached"]
    Tokenizer.from_name("p50k_base").save(tok_dir)  # the same path, other contents
    _, changed = prepare(path)
    assert changed["tokenizer"].name == "p50k_base" and not changed["pretrain"]["cached"]
    assert changed["pretrain"]["tokenizer"]["sha256"] != first["pretrain"]["tokenizer"]["sha256"]


def test_a_trained_tokenizer_is_trained_again_when_its_trainer_changes(tmp_path, shared_data, monkeypatch):
    """The training recipe's fingerprint names what trains (the `tokenizers` release): a run's
    tokenizer trained by anything else (relaygpt's earlier hand-written trainer included) is
    trained again, not reused; with the same trainer it is reused and the data stays cached."""
    import model.bpe

    (tmp_path / "corpus.txt").write_text((shared_data / "pretrain" / "tinystories_sample.txt").read_text()[:30_000])
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": "corpus.txt"}]}},
                     tokenizer={"train": {"vocab_size": 512}})
    job, first = prepare(path)
    marker, ranks = job.run_dir() / "tokenizer" / "source.json", job.run_dir() / "tokenizer" / "ranks.tiktoken"
    recorded, mtime = json.loads(marker.read_text())["fingerprint"], ranks.stat().st_mtime_ns
    _, again = prepare(path)
    assert again["pretrain"]["cached"] and ranks.stat().st_mtime_ns == mtime and again["tokenizer"] == first["tokenizer"]
    monkeypatch.setattr(model.bpe, "trainer_identity", lambda: "another-trainer/1")
    _, retrained = prepare(path)
    assert json.loads(marker.read_text())["fingerprint"] != recorded and ranks.stat().st_mtime_ns != mtime
    # The same trainer gave the same ids, so the shards made with them stay valid.
    assert retrained["tokenizer"] == first["tokenizer"] and retrained["pretrain"]["cached"]


def test_a_validation_split_taking_most_tokens_is_reported(tmp_path, shared_data):
    from helpers import relaygpt
    from pipelines.data.prepare import validation_warning

    (tmp_path / "two.txt").write_text("The first of two short documents.\n\nThe second one, which is a little longer than the first.")
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.05, "sources": [{"type": "text", "path": "two.txt", "split_by": "blank_line"}]}})
    proc = relaygpt("data", "prepare", path)
    assert proc.returncode == 0, proc.stderr
    manifest = read_manifest(tmp_path / "runs" / "t" / "default" / "data" / "pretrain")
    train, val = (manifest["splits"][s]["tokens"] for s in ("train", "val"))
    assert manifest["splits"]["val"]["documents"] == 1 and val > 0.25 * (train + val)
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {validation_warning('pretrain', train, val)}"], proc.stdout
    assert f"validation got {val} of {train + val} tokens" in warnings[0] and f"training {train}" in warnings[0]
    assert "data.pretrain.val_fraction" in warnings[0] and "more than 25%" in warnings[0]
    assert validation_warning("pretrain", 900, 100) is None and validation_warning("sft", 0, 0) is None
