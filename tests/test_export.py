"""Native model directories: exact round trips, clear refusals, nothing half-written."""

import json

import pytest
import torch

from helpers import ARCHITECTURES, tiny_config
from model.errors import RelayError
from model.export import export_hf, load_model_dir, save_model_dir
from model.generate import SamplingParams, generate
from model.gpt import GPT


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_native_round_trip_is_exact(arch, trained_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab, **ARCHITECTURES[arch])).eval()
    save_model_dir(model, trained_tokenizer, tmp_path / "m", provenance={"stage": "test"})
    loaded, tok, meta = load_model_dir(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [".relaygpt-output", "config.json", "model.safetensors", "tokenizer"]  # the marker: relaygpt wrote it
    assert tok == trained_tokenizer and meta["provenance"]["stage"] == "test"
    assert meta["tokenizer"]["sha256"] == trained_tokenizer.sha256
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    if model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    # Generation from the export equals generation from the in-memory model.
    prompts = [trained_tokenizer.encode("ROMEO:"), trained_tokenizer.encode("To be, or not to be")]
    params = SamplingParams(max_new_tokens=20)
    assert [c.tokens for c in generate(loaded, prompts, params)] == [c.tokens for c in generate(model, prompts, params)]


def test_hf_export_refuses_what_is_neither_gpt2_nor_llama(trained_tokenizer, tmp_path):
    model = GPT(tiny_config(trained_tokenizer.n_vocab, position="rope", norm="layernorm", mlp="gelu"))
    with pytest.raises(RelayError, match=r"model\.position is 'rope' \(GPT-2 needs 'learned'\).*model\.norm is 'layernorm' \(Llama needs 'rmsnorm'\)"):
        export_hf(model, trained_tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_loading_refuses_bad_directories(trained_tokenizer, tmp_path):
    with pytest.raises(RelayError, match="does not exist"):
        load_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RelayError, match="no config.json"):
        load_model_dir(tmp_path / "empty")
    model = GPT(tiny_config(trained_tokenizer.n_vocab))
    save_model_dir(model, trained_tokenizer, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RelayError, match="cannot read weights"):
        load_model_dir(tmp_path / "m")
    save_model_dir(model, trained_tokenizer, tmp_path / "m2")
    meta = json.loads((tmp_path / "m2" / "config.json").read_text())
    meta["model"]["n_layer"] = 3
    (tmp_path / "m2" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(RelayError, match="weights do not match the config"):
        load_model_dir(tmp_path / "m2")


def test_failed_export_leaves_no_directory(trained_tokenizer, tmp_path, monkeypatch):
    from model.weights_file import StreamingSafetensors

    model = GPT(tiny_config(trained_tokenizer.n_vocab))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(StreamingSafetensors, "write", boom)  # the weights fail half-way
    with pytest.raises(OSError):
        save_model_dir(model, trained_tokenizer, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_re_export_replaces_the_previous_directory(trained_tokenizer, tmp_path):
    torch.manual_seed(0)
    first = GPT(tiny_config(trained_tokenizer.n_vocab))
    second = GPT(tiny_config(trained_tokenizer.n_vocab))
    save_model_dir(first, trained_tokenizer, tmp_path / "m")
    save_model_dir(second, trained_tokenizer, tmp_path / "m")
    loaded, _, _ = load_model_dir(tmp_path / "m")
    assert torch.equal(loaded.transformer.wte.weight, second.transformer.wte.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_the_streamed_weights_file_is_what_safetensors_writes(trained_tokenizer, tmp_path):
    """save_model_dir streams the weights one tensor at a time (as exports from ZeRO-3 shards and
    pipeline stages do); the file is byte for byte the one safetensors.save_file writes, here
    also with mixed dtypes and a scalar."""
    from safetensors.torch import save_file

    from model.weights_file import StreamingSafetensors

    torch.manual_seed(0)
    model = GPT(tiny_config(trained_tokenizer.n_vocab))
    save_model_dir(model, trained_tokenizer, tmp_path / "m")
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied: stored once
    save_file(state, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    mixed = {"b": torch.randn(3), "a.x": torch.randn(2, 2).half(), "z": torch.randn(4).bfloat16(), "i": torch.arange(5), "s": torch.tensor(2.0)}
    save_file(mixed, str(tmp_path / "mixed-ref.safetensors"))
    with StreamingSafetensors(tmp_path / "mixed.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in mixed.items()}) as out:
        for name in out.order:
            out.write(name, mixed[name])
    assert (tmp_path / "mixed.safetensors").read_bytes() == (tmp_path / "mixed-ref.safetensors").read_bytes()
    with pytest.raises(ValueError, match="expected tensor"), StreamingSafetensors(tmp_path / "bad.safetensors", {"a": (torch.float32, (1,)), "b": (torch.float32, (1,))}) as out:
        out.write("b", torch.zeros(1))


def test_the_reader_reads_what_safetensors_wrote_and_refuses_a_damaged_header(tmp_path):
    """model/weights_file.SafetensorsReader (plain reads, no memory map): every dtype we write, an
    empty tensor, and headers that lie about their byte ranges."""
    import struct

    from safetensors.torch import save_file

    from model.weights_file import SafetensorsReader

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "d": torch.randn(4, generator=g).half(),
               "empty": torch.zeros(0, 4)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    reader = SafetensorsReader(path)
    assert set(reader.specs) == set(tensors)
    for name, tensor in tensors.items():
        assert reader.specs[name] == (tensor.dtype, tuple(tensor.shape))
        assert torch.equal(reader.read(name), tensor), name
    header = b'{"a":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}'
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match="byte range 0-4000"):
        SafetensorsReader(bad)
    bad.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(ValueError, match="header length"):
        SafetensorsReader(bad)
