"""Bad data and bad job files: one line naming file:line or the field, exit 2, nothing half-written."""

import json

import pytest
import yaml

from helpers import assert_one_line_error, relaygpt
from jobs.spec import JobError, load_job
from model.errors import RelayError
from pipelines.data.loader import open_split
from pipelines.data.prepare import prepare_data
from test_data import prepare, write_job


def data_prepare(path, *extra):
    return relaygpt("data", "prepare", path, *extra)


def sft_job(tmp_path, rows=None, raw=None, name="c.jsonl", **source):
    target = tmp_path / name
    if raw is not None:
        target.write_bytes(raw)
    else:
        target.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return write_job(tmp_path, {"sft": {"sources": [{"type": "json", "path": name, **source}]}})


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = sft_job(tmp_path, raw=b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": \n')
    assert_one_line_error(data_prepare(path), "c.jsonl:2", "malformed JSON")
    assert not (tmp_path / "runs" / "t" / "default" / "data" / "sft").exists()


def test_misspelled_text_field_lists_the_fields(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x", "id": 1}\n')
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "json", "path": "d.jsonl", "field": "txt"}]}})
    assert_one_line_error(data_prepare(path), "d.jsonl:1", "no field 'txt'", "fields: body, id")


@pytest.mark.parametrize("content, message", [(b"", "the file is empty"), (b"[]", "the dataset is empty"), (b"   \n", "the file is empty")])
def test_empty_inputs(tmp_path, content, message):
    assert_one_line_error(data_prepare(sft_job(tmp_path, raw=content, name="c.json")), message)


def test_unknown_role_names_the_record(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    assert_one_line_error(data_prepare(sft_job(tmp_path, rows)), "c.jsonl:2", "unknown role 'wizard'")
    rows = [{"conversations": [{"from": "robot", "value": "x"}]}]
    assert_one_line_error(data_prepare(sft_job(tmp_path, rows, name="s.jsonl")), "s.jsonl:1", "unknown role 'robot'")


def test_unknown_format_lists_known_formats(tmp_path):
    assert_one_line_error(data_prepare(sft_job(tmp_path, [{"question": "a", "answer": "b"}])), "c.jsonl:1", "cannot tell the instruction format", "alpaca")


def test_zero_supervised_tokens_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "only a question"}]}]
    assert_one_line_error(data_prepare(sft_job(tmp_path, rows)), "no conversation ends with an assistant turn")


def test_non_utf8_bytes_are_refused_or_read_with_the_sources_encoding(tmp_path):
    """Latin-1 text read as UTF-8 is refused at the first bad byte (it was once replaced and
    counted in the manifest, said nowhere); `encoding: latin-1` reads it as written."""
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait\n\n\xff\xfe good text after")
    source = {"type": "text", "path": "bad.txt", "split_by": "blank_line"}
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.0, "sources": [source]}})
    with pytest.raises(RelayError, match=r"bad.txt: not UTF-8 text \(byte 0xe9 at offset 3\); set encoding:"):
        prepare(path)
    path = write_job(tmp_path, {"pretrain": {"val_fraction": 0.0, "sources": [{**source, "encoding": "latin-1"}]}})
    _, out = prepare(path)
    assert out["pretrain"]["stats"]["replaced_bytes"] == 0
    assert out["pretrain"]["stats"]["documents"] == 2


def test_damaged_shards_and_manifests_are_refused_with_their_names(tmp_path, shared_data):
    """Training starts check sizes and the manifest's digest (no shard is read); a same-size
    change is found by `relaygpt data verify`, which re-hashes every shard."""
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": str(shared_data / "pretrain" / "tinystories_sample.txt")}]}})
    job, out = prepare(path)
    directory = job.run_dir() / "data" / "pretrain"
    shard = directory / out["pretrain"]["splits"]["train"]["shards"][0]["file"]
    original = shard.read_bytes()
    data = bytearray(original)
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_split(directory, "train", seq_len=16)  # the quick check reads no shard
    assert_one_line_error(relaygpt("data", "verify", path), f"{shard.name}: sha256 no longer matches")
    shard.write_bytes(original[:-2])
    with pytest.raises(RelayError, match=f"{shard.name}: {len(original) - 2} bytes, the manifest says"):
        open_split(directory, "train", seq_len=16)
    shard.write_bytes(original)
    assert relaygpt("data", "verify", path).returncode == 0
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"tokens"', '"tokens" ', 1))
    with pytest.raises(RelayError, match="manifest.json: changed since it was written"):
        open_split(directory, "train", seq_len=16)


def test_hub_dataset_offline_says_how_to_use_local_files(tmp_path):
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "hub", "name": "roneneldan/TinyStories", "field": "text"}]}})
    assert_one_line_error(data_prepare(path), "hub dataset 'roneneldan/TinyStories' could not be loaded", "point a json / parquet / csv source")


def test_an_invalid_parquet_file_is_one_line(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "parquet", "path": "bad.parquet", "field": "text"}]}})
    proc = data_prepare(path)
    assert_one_line_error(proc, "bad.parquet: cannot read as parquet")
    assert proc.stdout.strip() == "" and len(proc.stderr.strip().splitlines()) == 1


def test_glob_matching_nothing(tmp_path):
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "text", "path": "nothing/*.txt"}]}})
    assert_one_line_error(data_prepare(path), "nothing/*.txt: no file matches")


# ---- job files ----------------------------------------------------------------------------

def test_unknown_key_has_did_you_mean_and_line(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: x\ntokenizer: {encoding: gpt2}\ndata:\n  pretrain:\n    sources:\n      - type: text\n        path: a.txt\n        feild: body\n")
    assert_one_line_error(data_prepare(path), "j.yaml:8", "data.pretrain.sources[0].feild", "did you mean 'field'")


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: x\nmodel: {preset: gpt9, n_layers: 2}\ntokenizer: {encoding: gpt5}\ndata: {num_proc: 0}\n")
    with pytest.raises(JobError) as info:
        load_job(path)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "unknown preset 'gpt9'" in text and "unknown encoding 'gpt5'" in text and "data.num_proc" in text


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text("name: x\ndata: [unclosed\n")
    assert_one_line_error(data_prepare(path), "j.yaml:", "invalid YAML")
    assert_one_line_error(data_prepare(tmp_path / "nope.yaml"), "nope.yaml: job file does not exist")


def test_set_overrides_any_field_and_bad_paths_are_errors(tmp_path):
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "synthetic"}]}})
    job = load_job(path, ["data.num_proc=1", "model.n_layer=3", "data.pretrain.sources.0.weight=2.5"])
    assert job.data.num_proc == 1 and job.model.config(100).n_layer == 3 and job.data.pretrain.sources[0].weight == 2.5
    with pytest.raises(JobError, match="data.pretrain.sources.5 does not exist"):
        load_job(path, ["data.pretrain.sources.5.weight=1"])
    with pytest.raises(JobError, match="expected KEY=VALUE"):
        load_job(path, ["data.num_proc"])
    assert_one_line_error(data_prepare(path, "--set", "model.n_embd=102"), "n_embd (102) must be divisible by n_head (4)")


def test_tokenizer_needs_exactly_one_source(tmp_path):
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "synthetic"}]}}, tokenizer={"encoding": "gpt2", "dir": "x"})
    assert_one_line_error(data_prepare(path), "tokenizer", "exactly one of encoding, file, dir, train")


# ---- column mapping (fields:) ---------------------------------------------------------------

def test_unknown_fields_key_names_the_line_and_the_valid_keys(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "context": "", "response": "b"}\n')
    path = tmp_path / "j.yaml"
    path.write_text("name: x\ntokenizer: {encoding: gpt2}\ndata:\n  sft:\n    sources:\n      - type: json\n        path: d.jsonl\n"
                    "        format: alpaca\n        fields:\n          instruction: instruction\n          context: context\n")
    assert_one_line_error(data_prepare(path), "j.yaml:11", "data.sft.sources[0].fields.context", "unknown key 'context'",
                          "valid for format alpaca: instruction, input, output, system")


def test_fields_of_two_formats_and_fields_on_pretraining_are_refused(tmp_path):
    path = write_job(tmp_path, {"sft": {"sources": [{"type": "json", "path": "d.jsonl", "fields": {"instruction": "q", "response": "a"}}]}})
    assert_one_line_error(data_prepare(path), "data.sft.sources[0].fields", "keys of different formats")
    path = write_job(tmp_path, {"pretrain": {"sources": [{"type": "json", "path": "d.jsonl", "fields": {"prompt": "q"}}]}})
    assert_one_line_error(data_prepare(path), "data.pretrain.sources.0.fields", "named by 'field'")


def test_a_mapped_column_missing_from_the_first_record_names_it(tmp_path):
    rows = [{"instruction": "a", "context": "", "response": "b"}]
    fields = {"instruction": "instruction", "input": "context", "output": "answer"}
    proc = data_prepare(sft_job(tmp_path, rows, fields=fields))
    assert_one_line_error(proc, "c.jsonl:1", "fields.output", "no column 'answer'", "columns: context, instruction, response")
    # An optional field (input) mapped to a column only some records have: the first record must have it.
    fields = {"instruction": "instruction", "input": "ctx", "output": "response"}
    assert_one_line_error(data_prepare(sft_job(tmp_path, rows, name="d.jsonl", fields=fields)), "d.jsonl:1", "fields.input", "no column 'ctx'")
    rows = [{"instruction": "a", "response": "b"}, {"instruction": "c", "reply": "d"}]  # a later record lacks a required one
    fields = {"instruction": "instruction", "output": "response"}
    assert_one_line_error(data_prepare(sft_job(tmp_path, rows, name="e.jsonl", fields=fields)), "e.jsonl:2", "fields.output", "no column 'response'")
