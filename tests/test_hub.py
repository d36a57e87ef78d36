"""Published Llama-family checkpoints come in: Llama 3.x with its rope_scaling, Mistral,
Qwen2 with its q/k/v biases, saved by transformers itself as sharded safetensors with an
index, and read tensor by tensor (never the whole model on a rank)."""

import json

import numpy as np
import pytest
import torch

from distributed import run_distributed
from helpers import LLAMA3_PATTERN, LLAMA3_TEMPLATE, TEXTS
from dist_workers import hub_import_loss, init_build_memory
from model.export import load_model_dir, open_model_weights
from model.hf import tokenizer_files

FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {
        "rope_theta": 500000.0, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 16}}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64, "tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True, "rope_theta": 1000000.0}),
}


def hub_dir(out, family: str, tokenizer, *, layers=2, width=64, heads=4, kv_heads=2, inner=160, shard="60KB", seed=0):
    """A random model of `family` saved by transformers (sharded at `shard`), with tokenizer files."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(
        vocab_size=tokenizer.n_vocab, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so the comparison covers them
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, max_shard_size=shard)
    for name, text in tokenizer_files(tokenizer, 128).items():
        (out / name).write_text(text, encoding="utf-8")
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_published_family_comes_in_with_transformers_logits(family, tmp_path, trained_tokenizer):
    theirs = hub_dir(tmp_path / family, family, trained_tokenizer)
    assert (tmp_path / family / "model.safetensors.index.json").exists()  # really sharded
    assert len(list((tmp_path / family).glob("model-*-of-*.safetensors"))) > 2
    ours, tokenizer, meta = load_model_dir(tmp_path / family)
    assert meta["format"] == f"hf-{theirs.config.model_type}" and tokenizer.sha256 == trained_tokenizer.sha256
    if family == "llama3":
        assert ours.config.rope_scaling["rope_type"] == "llama3"
    if family == "qwen2":
        assert ours.config.attn_qkv_bias and not ours.config.bias
    # Past llama3's original 16-token context, so the rescaled frequencies matter; within
    # Mistral's 64-token window, the context it imports with.
    ids = torch.randint(0, trained_tokenizer.n_vocab, (2, min(100, ours.config.block_size)))
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)[0][..., : trained_tokenizer.n_vocab]
    assert (got - expected).abs().max().item() < 1e-4


def as_published(config: dict) -> dict:
    """A transformers-5 config.json in the form the hub's Llama 3.1 files have: `rope_theta` and
    `rope_scaling` at the top level (transformers 5 nests both in `rope_parameters`)."""
    params = config.pop("rope_parameters")
    config["rope_theta"] = params.pop("rope_theta")
    config["rope_scaling"] = {**params, "type": params["rope_type"]}
    return config


def test_the_published_config_form_reads_as_the_new_one(tmp_path, trained_tokenizer):
    from model.export import read_model_config

    hub_dir(tmp_path / "l", "llama3", trained_tokenizer)
    new = read_model_config(tmp_path / "l")
    path = tmp_path / "l" / "config.json"
    path.write_text(json.dumps(as_published(json.loads(path.read_text()))))
    assert read_model_config(tmp_path / "l") == new and new.rope_theta == 500000.0


def test_mistral_context_is_its_window(tmp_path, trained_tokenizer):
    """Within its sliding window Mistral's attention is causal attention: the imported context
    stops at the window, where the outputs are the published model's."""
    hub_dir(tmp_path / "m", "mistral", trained_tokenizer)
    config, _, _ = open_model_weights(tmp_path / "m")
    assert config.block_size == 64


def test_weights_read_lazily_match_the_eager_import(tmp_path, trained_tokenizer):
    hub_dir(tmp_path / "q", "qwen2", trained_tokenizer)
    model, _, _ = load_model_dir(tmp_path / "q")
    _, _, weights = open_model_weights(tmp_path / "q")
    state = model.state_dict()
    assert set(weights) == set(state)
    for name in state:
        assert torch.equal(weights[name], state[name]), name


@pytest.mark.parametrize("change, says", [
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type 'yarn' is not supported"),
    (lambda c: c["rope_scaling"].pop("original_max_position_embeddings"), "needs original_max_position_embeddings"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
])
def test_a_setting_we_do_not_implement_is_named(tmp_path, trained_tokenizer, change, says):
    hub_dir(tmp_path / "l", "llama3", trained_tokenizer)
    path = tmp_path / "l" / "config.json"
    config = as_published(json.loads(path.read_text()))
    change(config)
    path.write_text(json.dumps(config))
    from model.errors import RelayError

    with pytest.raises(RelayError, match=says):
        load_model_dir(tmp_path / "l")


def test_an_index_naming_a_file_outside_the_directory_or_a_missing_shard_is_refused(tmp_path, trained_tokenizer):
    from model.errors import RelayError

    hub_dir(tmp_path / "l", "llama3", trained_tokenizer)
    index = tmp_path / "l" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    for bad, says in [("../elsewhere.safetensors", "not a file name inside the directory"),
                      ("model-00099-of-00099.safetensors", "which is missing")]:
        changed = {**data, "weight_map": {**data["weight_map"], name: bad}}
        index.write_text(json.dumps(changed))
        with pytest.raises(RelayError, match=says):
            load_model_dir(tmp_path / "l")


@pytest.mark.slow
def test_zero_3_builds_a_sharded_hub_checkpoint_holding_only_its_shard(tmp_path, trained_tokenizer):
    """A 30M-parameter Qwen2-shaped checkpoint in 4 MB shards, built under ZeRO-3 on 2 ranks as
    SFT starts from it: the weights are the file's bit for bit, and each rank grows by at most
    its shard + the largest tensor + 32 MiB, well under an unsharded build."""
    hub_dir(tmp_path / "q", "qwen2", trained_tokenizer, layers=8, width=512, heads=8, kv_heads=4, inner=1536, shard="4MB")
    whole = run_distributed(init_build_memory, 1, str(tmp_path / "q"), 1, timeout=600)[0]
    for rank, sharded in enumerate(run_distributed(init_build_memory, 2, str(tmp_path / "q"), 3, timeout=600)):
        assert sharded["same"], rank
        assert sharded["increase"] <= 0.7 * whole["increase"], (rank, sharded, whole)
        assert sharded["increase"] <= sharded["shard"] + sharded["largest"] + 32 * 2**20, (rank, sharded)


@pytest.mark.slow
def test_a_hub_checkpoint_in_2_pipeline_stages_gives_transformers_loss(tmp_path, trained_tokenizer):
    """Llama 3.x (rope_scaling, sharded) built by the engine at pipeline_stages 2, each stage
    reading only its own tensors: one batch's loss equals transformers' (their logits with the
    zero padding rows of our vocabulary), and no rank holds the whole model."""
    theirs = hub_dir(tmp_path / "l", "llama3", trained_tokenizer, layers=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, trained_tokenizer.n_vocab, (2, 128), generator=g)
    y = torch.randint(0, trained_tokenizer.n_vocab, (2, 128), generator=g)
    with torch.no_grad():
        logits = theirs(x).logits
    padded = load_model_dir(tmp_path / "l")[0].config.padded_vocab_size
    logits = torch.cat([logits, logits.new_zeros(*logits.shape[:2], padded - logits.size(-1))], -1)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, padded), y.reshape(-1)).item()
    results = run_distributed(hub_import_loss, 2, str(tmp_path / "l"), 2, 5, timeout=600)
    whole = sum(p.numel() for p in theirs.parameters())
    for rank, result in enumerate(results):
        assert abs(result["loss"] - expected) < 1e-4, (rank, result, expected)
        assert result["params"] < whole, (rank, result["params"], whole)  # a stage, never the whole model


def test_a_llama3_style_tokenizer_gives_autotokenizers_ids(llama3_style_tokenizer):
    from transformers import AutoTokenizer

    from model.tokenizer import Tokenizer

    theirs = AutoTokenizer.from_pretrained(llama3_style_tokenizer)
    ours = Tokenizer.from_hf_dir(llama3_style_tokenizer, {})
    assert ours.pat_str == LLAMA3_PATTERN
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == text
    for token in ("<|begin_of_text|>", "<|eot_id|>"):  # the published special tokens keep their ids
        assert ours.special_tokens[token] == theirs.convert_tokens_to_ids(token)


def test_a_hub_tokenizer_survives_the_trip_to_a_worker(llama3_style_tokenizer):
    """Workers receive the tokenizer pickled: it re-loads from the directory it came from."""
    import pickle

    from model.tokenizer import Tokenizer

    ours = Tokenizer.from_hf_dir(llama3_style_tokenizer, {})
    again = pickle.loads(pickle.dumps(ours))
    assert again.sha256 == ours.sha256 and again.encode(TEXTS[1]) == ours.encode(TEXTS[1])


def test_an_nfc_normalizer_gives_autotokenizers_ids_and_goes_out_with_the_export(llama3_style_tokenizer, tmp_path):
    """Qwen2's tokenizer.json normalizes to NFC before splitting: decomposed accents become the
    composed ones AutoTokenizer sees; the normalizer survives RUN/tokenizer and the HF export."""
    import shutil

    from transformers import AutoTokenizer

    from model.tokenizer import Tokenizer

    copy = tmp_path / "nfc"
    shutil.copytree(llama3_style_tokenizer, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "NFC"}
    (copy / "tokenizer.json").write_text(json.dumps(data))
    theirs, ours = AutoTokenizer.from_pretrained(copy), Tokenizer.from_hf_dir(copy, {})
    texts = ["Cafe\u0301 de\u0301ja\u0300 vu, A\u030angstro\u0308m", "한국어 \u1100\u1161\u11a8", *TEXTS]
    assert ours.normalizer == "NFC" and ours.encode(texts[0]) != Tokenizer.from_hf_dir(llama3_style_tokenizer, {}).encode(texts[0])
    for text in texts:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    again = Tokenizer.from_dir(ours.save(tmp_path / "saved"))
    assert again == ours and again.encode(texts[0]) == ours.encode(texts[0]) and again.identity["normalizer"] == "NFC"
    (tmp_path / "hf").mkdir()
    for name, text in tokenizer_files(again, 128).items():
        (tmp_path / "hf" / name).write_text(text, encoding="utf-8")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").encode(texts[0], add_special_tokens=False) == ours.encode(texts[0])


@pytest.mark.parametrize("edit, says", [
    (lambda d: d.update(normalizer={"type": "NFKC"}), "normalizer NFKC is not supported"),
    (lambda d: d.update(normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "Lowercase"}]}),
     "normalizer NFC \\+ Lowercase is not supported"),
    (lambda d: d.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer must end in ByteLevel"),
    (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(behavior="Removed"), "behavior Isolated"),
])
def test_a_tokenizer_json_we_cannot_reproduce_is_refused(llama3_style_tokenizer, tmp_path, edit, says):
    import shutil

    from model.errors import RelayError
    from model.tokenizer import Tokenizer

    copy = tmp_path / "tok"
    shutil.copytree(llama3_style_tokenizer, copy)
    data = json.loads((copy / "tokenizer.json").read_text())
    edit(data)
    (copy / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(RelayError, match=says):
        Tokenizer.from_hf_dir(copy, {})


@pytest.mark.parametrize("shape", [
    {"qkv_bias": True, "bias": False},  # Qwen2's layout
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
])
def test_a_sharded_export_loads_in_transformers_with_our_logits_and_comes_back(shape, tmp_path, trained_tokenizer):
    """`relaygpt export --format hf --max-shard-size 100KB`: shards and an index as the hub lays
    them out; from_pretrained loads it with our logits and greedy tokens, and it imports back."""
    from transformers import AutoModelForCausalLM

    from helpers import ARCHITECTURES, relaygpt, tiny_config
    from model.export import save_model_dir
    from model.generate import SamplingParams, generate
    from model.gpt import GPT

    torch.manual_seed(3)
    ours = GPT(tiny_config(trained_tokenizer.n_vocab, block_size=128, **{**ARCHITECTURES["modern"], **shape})).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_model_dir(ours, trained_tokenizer, tmp_path / "native")
    proc = relaygpt("export", tmp_path / "native", "--out", tmp_path / "hf", "--format", "hf", "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / "hf" / "model.safetensors").exists()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert theirs.config.model_type == ("qwen2" if "qkv_bias" in shape else "llama")
    ids = torch.randint(0, trained_tokenizer.n_vocab, (2, 100))
    v = trained_tokenizer.n_vocab
    with torch.no_grad():
        assert (ours(ids)[0][..., :v] - theirs(ids).logits).abs().max().item() < 1e-4
        prompt = ids[0, :8].tolist()
        greedy = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate(ours, [prompt], SamplingParams(max_new_tokens=12))[0].tokens
    assert greedy[0, len(prompt):].tolist()[: len(mine)] == mine
    back, _, _ = load_model_dir(tmp_path / "hf")
    with torch.no_grad():
        assert (back(ids)[0][..., :v] - ours(ids)[0][..., :v]).abs().max().item() < 1e-5


def test_a_bad_shard_size_is_one_line(tmp_path):
    from helpers import relaygpt

    proc = relaygpt("export", tmp_path / "x", "--out", tmp_path / "y", "--format", "hf", "--max-shard-size", "lots")
    assert proc.returncode == 2 and "--max-shard-size" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_of_a_hub_model_under_zero_3_exports_what_transformers_loads(tmp_path, llama3_style_tokenizer):
    """A Llama 3.x-shaped hub directory (sharded, rope_scaling, its own tokenizer.json and chat
    template) named as the job's tokenizer and as stages.sft.init: `relaygpt run` fine-tunes it
    under ZeRO-3 (the local launcher, one worker) on data its template rendered, the tokenizer
    keeps AutoTokenizer's ids, and the export (template included) loads
    with from_pretrained: the same logits and greedy tokens as relaygpt's own load of it."""
    import shutil

    import transformers
    import yaml

    from helpers import relaygpt
    from model.generate import SamplingParams, generate

    hub = tmp_path / "hub"
    vocab = json.loads((llama3_style_tokenizer / "tokenizer.json").read_text())["model"]["vocab"]
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, **{
            k: v for k, v in FAMILIES["llama3"][2].items() if k != "tie_word_embeddings"})
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(hub, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama3_style_tokenizer / name, hub / name)
    job = {"name": "hubsft", "seed": 1, "output_dir": "runs", "tokenizer": {"dir": "hub"},
           "data": {"num_proc": 1, "sft": {"val_fraction": 0.1, "sources": [{"type": "synthetic"}]},
                    "synthetic": {"num_people": 8, "mentions_per_fact": 1, "num_arithmetic": 20}},
           "cluster": {"num_workers": 1, "cpus_per_worker": 1},
           "stages": {"sft": {"init": "hub", "steps": 4, "micro_batch": 2, "log_every": 1, "eval_every": 4,
                              "checkpoint_every": 4, "optimizer": {"lr": 1e-3, "warmup_steps": 1},
                              "deepspeed": {"zero_stage": 3}}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job, sort_keys=False))
    proc = relaygpt("run", tmp_path / "job.yaml", env={"RAY_ADDRESS": ""}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tuned = tmp_path / "runs" / "hubsft" / "default" / "sft" / "model"
    proc = relaygpt("export", tuned, "--out", tmp_path / "out", "--format", "hf", "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    ours, tokenizer, _ = load_model_dir(tuned)
    # The SFT data was rendered with the model's own chat template (not relaygpt's role tokens),
    # and the tuned model and its export carry it.
    data = tmp_path / "runs" / "hubsft" / "default" / "data" / "sft"
    manifest = json.loads((data / "manifest.json").read_text())
    tokens = np.concatenate([np.fromfile(data / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"]["train"]["shards"]])
    assert tokenizer.special_tokens["<|start_header_id|>"] in tokens and tokenizer.user_id not in tokens
    assert tokenizer.chat_template.source == LLAMA3_TEMPLATE
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == LLAMA3_TEMPLATE
    assert tokenizer.encode(TEXTS[1]) == transformers.AutoTokenizer.from_pretrained(hub).encode(TEXTS[1], add_special_tokens=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert theirs.config.rope_scaling["rope_type"] == "llama3" or theirs.config.rope_parameters["rope_type"] == "llama3"
    ids = torch.tensor([tokenizer.encode(TEXTS[0] + TEXTS[2])[:100]])
    with torch.no_grad():
        assert (ours(ids)[0][..., : tokenizer.n_vocab] - theirs(ids).logits).abs().max().item() < 1e-4
        greedy = theirs.generate(ids[:, :10], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    mine = generate(ours, [ids[0, :10].tolist()], SamplingParams(max_new_tokens=12))[0].tokens
    assert greedy[0, 10:].tolist()[: len(mine)] == mine


def test_an_init_model_with_another_tokenizer_is_refused_before_launch(tmp_path, trained_tokenizer, gpt2_tokenizer):
    """Its embedding rows are another tokenizer's ids: `relaygpt run` stops at preflight with one
    line naming stages.sft.init and both tokenizers (before, rank 0 refused it after launch)."""
    import yaml

    from helpers import assert_one_line_error, relaygpt, tiny_config
    from model.export import save_model_dir
    from model.gpt import GPT

    save_model_dir(GPT(tiny_config(trained_tokenizer.n_vocab, block_size=64)), trained_tokenizer, tmp_path / "base")
    job = {"name": "mismatch", "output_dir": "runs", "tokenizer": {"encoding": "gpt2"},
           "data": {"num_proc": 1, "sft": {"sources": [{"type": "synthetic"}]}},
           "stages": {"sft": {"init": "base", "steps": 2, "optimizer": {"warmup_steps": 1}}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    proc = relaygpt("run", tmp_path / "job.yaml", env={"RAY_ADDRESS": ""})
    assert_one_line_error(proc, "stages.sft.init")
    assert trained_tokenizer.sha256[:12] in proc.stderr and gpt2_tokenizer.sha256[:12] in proc.stderr
    assert not (tmp_path / "runs" / "mismatch" / "default" / "sft").exists()
