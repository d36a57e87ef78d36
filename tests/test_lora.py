"""LoRA (model/lora.py): the adapter's arithmetic, merging, the PEFT layout, the stage settings,
and a short SFT from a model directory on real DeepSpeed engines at ZeRO 0 and 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.config import preset
from model.gpt import GPT
from model.lora import TARGETS, adapted_names, adapters, apply_lora, lora_param_count, merge_lora, peft_adapter, projection_shape

GPT2_SHAPED = dict(n_layer=2, n_head=4, n_embd=32, block_size=16)
LLAMA_SHAPED = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, position="rope", norm="rmsnorm",
                    mlp="swiglu", bias=False, tie_embeddings=False)


def tiny(**fields):
    return preset("tiny", 97, **fields)


@pytest.mark.parametrize("fields", [GPT2_SHAPED, LLAMA_SHAPED])
@pytest.mark.parametrize("targets", [list(TARGETS), ["attn.c_attn"], ["mlp.c_fc", "mlp.c_proj"]])
def test_trainable_parameters_are_r_times_in_plus_out_per_projection(fields, targets):
    config, rank = tiny(**fields), 4
    model = GPT(config)
    trainable = apply_lora(model, rank=rank, alpha=8, dropout=0.0, targets=targets)
    by_hand = 0
    for name, module in adapters(model).items():
        linear_in, linear_out = module.in_features, module.out_features
        assert (linear_in, linear_out) == projection_shape(config, name.split(".", 3)[3])
        by_hand += rank * (linear_in + linear_out)
    assert len(adapters(model)) == config.n_layer * len(targets)
    assert trainable == by_hand == lora_param_count(config, rank, targets)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{x}" for name in adapters(model) for x in "AB"}


@pytest.mark.parametrize("fields", [GPT2_SHAPED, LLAMA_SHAPED])
def test_adapted_model_starts_as_its_base_and_merges_to_itself(fields):
    config = tiny(**fields)
    torch.manual_seed(0)
    base = GPT(config).eval()
    x = torch.randint(0, config.vocab_size, (2, 12))
    expected, _ = base(x)
    names = [n for n, _ in base.named_parameters()]
    apply_lora(base, rank=4, alpha=8, dropout=0.1, targets=list(TARGETS), seed=3)
    assert [n for n, _ in base.named_parameters() if "lora_" not in n] == names  # the base keeps its names
    at_init, _ = base(x)
    assert torch.equal(at_init, expected)  # B = 0
    with torch.no_grad():
        for module in adapters(base).values():
            module.lora_B.normal_(0, 0.5)  # as if trained
    adapted, _ = base(x)
    assert (adapted - expected).abs().max() > 1e-2
    merged, _ = merge_lora(base)(x)
    assert not adapters(base) and [n for n, _ in base.named_parameters()] == names
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_adapters_the_same_gradients():
    """Recompute wraps the blocks from outside (pipelines/train/recompute.py): adapters inside them
    are recomputed, dropout included (the RNG state is kept)."""
    from pipelines.train.recompute import checkpoint_blocks

    config = tiny(**GPT2_SHAPED)
    x = torch.randint(0, config.vocab_size, (2, 12))
    grads = []
    for interval in (0, 1):
        torch.manual_seed(0)
        model = GPT(config)
        apply_lora(model, rank=4, alpha=8, dropout=0.2, targets=list(TARGETS), seed=1)
        with torch.no_grad():
            for module in adapters(model).values():
                module.lora_B.normal_()
        if interval:
            checkpoint_blocks(model, interval)
        torch.manual_seed(5)
        model(x, torch.roll(x, -1, dims=1))[1].backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


def test_a_is_the_same_for_the_same_seed():
    one, two = GPT(tiny(**GPT2_SHAPED)), GPT(tiny(**GPT2_SHAPED))
    apply_lora(one, rank=2, alpha=4, dropout=0.0, targets=["attn.c_attn"], seed=5)
    apply_lora(two, rank=2, alpha=4, dropout=0.0, targets=["attn.c_attn"], seed=5)
    a = [m.lora_A for m in adapters(one).values()]
    assert all(torch.equal(x, y.lora_A) for x, y in zip(a, adapters(two).values())) and not torch.equal(a[0], a[1])


def _randomised_adapters(model, rank, targets):
    """Adapters on `model` (alpha 2 rank) with a random B, as if trained."""
    apply_lora(model, rank=rank, alpha=2 * rank, dropout=0.0, targets=targets)
    with torch.no_grad():
        for module in adapters(model).values():
            module.lora_B.normal_()
    return model


def _trained_adapter_weights(config, targets, rank=4):
    model = _randomised_adapters(GPT(config), rank, targets)
    return model, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_peft_layout_for_a_gpt2_base():
    """GPT2LMHeadModel names (ours already), Conv1D: fan_in_fan_out; A (r, in), B (out, r) as PEFT keeps them."""
    config = tiny(**GPT2_SHAPED)
    _, weights = _trained_adapter_weights(config, list(TARGETS))
    adapter_config, tensors = peft_adapter(config, weights, rank=4, alpha=8, dropout=0.0, targets=list(TARGETS))
    assert adapter_config["peft_type"] == "LORA" and adapter_config["fan_in_fan_out"] is True
    assert adapter_config["target_modules"] == list(TARGETS) and adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8
    key = "base_model.model.transformer.h.1.attn.c_attn"
    assert torch.equal(tensors[f"{key}.lora_A.weight"], weights["transformer.h.1.attn.c_attn.lora_A"])
    assert tensors[f"{key}.lora_A.weight"].shape == (4, 32) and tensors[f"{key}.lora_B.weight"].shape == (96, 4)
    assert len(tensors) == 2 * config.n_layer * len(TARGETS)


def test_peft_layout_for_a_llama_base_cuts_fused_projections_exactly():
    """q/k/v and gate/up share A and split B's rows: each part's B A is its rows of our delta."""
    config = tiny(**LLAMA_SHAPED)
    model, weights = _trained_adapter_weights(config, ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])
    adapter_config, tensors = peft_adapter(config, weights, rank=4, alpha=8, dropout=0.0,
                                           targets=["attn.c_attn", "mlp.c_fc", "mlp.c_proj"])
    assert adapter_config["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    assert adapter_config["fan_in_fan_out"] is False
    for i in range(config.n_layer):
        delta = adapters(model)[f"transformer.h.{i}.attn.c_attn"].delta()
        prefix = f"base_model.model.model.layers.{i}.self_attn"
        parts = [tensors[f"{prefix}.{p}_proj.lora_B.weight"] @ tensors[f"{prefix}.{p}_proj.lora_A.weight"] * 2 for p in "qkv"]
        torch.testing.assert_close(torch.cat(parts), delta)
        assert tensors[f"{prefix}.k_proj.lora_B.weight"].shape == (config.kv_heads * config.head_dim, 4)


@pytest.fixture(scope="module")
def small_tokenizer(shakespeare):
    from model.tokenizer import Tokenizer

    return Tokenizer.train([shakespeare[:20_000]], 300, name="shakespeare-300")


@pytest.mark.parametrize("fields", [GPT2_SHAPED, LLAMA_SHAPED, {**LLAMA_SHAPED, "tie_embeddings": True}],
                         ids=["gpt2-tied", "llama", "llama-tied"])
def test_peft_loads_the_adapter_onto_the_hf_export_with_our_logits(tmp_path, small_tokenizer, fields):
    """What a user does with <stage>/adapter/: `peft` puts it on the HF export of the base, and the
    result computes what our adapted model computes (a tied head stays the embedding, untouched)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from model.export import export_hf
    from model.lora import write_peft_adapter

    vocab = small_tokenizer.n_vocab
    config = preset("tiny", vocab, **fields)
    torch.manual_seed(0)
    ours = GPT(config).eval()
    export_hf(ours, small_tokenizer, tmp_path / "base")
    targets = list(TARGETS)
    _randomised_adapters(ours, rank=4, targets=targets)
    weights = {n: p.detach() for n, p in ours.named_parameters() if ".lora_" in n}
    write_peft_adapter(tmp_path / "adapter", config, weights, rank=4, alpha=8, dropout=0.0, targets=targets)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = torch.randint(0, vocab, (2, 12))
    with torch.no_grad():
        expected = ours(ids)[0][..., :vocab]
        got = theirs(ids).logits
        with theirs.disable_adapter():
            without = theirs(ids).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert (without - expected).abs().max().item() > 1e-2  # the adapter is what makes them equal


# ---- settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("lora, message", [
    ({"rank": 0}, "stages.sft.lora.rank: 0 is not a rank"),
    ({"alpha": 0}, "stages.sft.lora.alpha: 0"),
    ({"alpha": ".inf"}, "stages.sft.lora.alpha: Input should be a finite number"),
    ({"dropout": 1.0}, "stages.sft.lora.dropout: 1.0 is outside [0, 1)"),
    ({"targets": ["c_proj"]}, "did you mean 'attn.c_proj' or 'mlp.c_proj'?"),
    ({"targets": ["attn.c_atn"]}, "did you mean 'attn.c_attn'?"),
    ({"targets": []}, "stages.sft.lora.targets: no projection to adapt"),
    ({"ranks": 8}, "stages.sft.lora.ranks"),
])
def test_bad_lora_settings_are_one_line_naming_the_field(tmp_path, lora, message):
    from jobs.spec import JobError, load_job
    from train_helpers import BASE_JOB

    job = json.loads(json.dumps(BASE_JOB))
    job["stages"]["sft"]["lora"] = lora
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job).replace("'.inf'", ".inf"))
    with pytest.raises(JobError) as error:
        load_job(path)
    assert message in str(error.value) and "\n" not in str(error.value).strip(), str(error.value)


def test_a_pipeline_stage_without_a_block_is_refused_by_the_plan():
    """A uniform cut of 8 pipeline layers over 4 stages leaves stage 0 the embeddings alone: nothing
    to adapt. (`relaygpt plan` lists a plan's ConfigError as a problem and exits 2.)"""
    from model.errors import ConfigError
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    def plan(method):
        settings = TrainStageSpec(steps=4, lora={"rank": 4}, deepspeed={"zero_stage": 1, "pipeline_stages": 4, "partition_method": method})
        return plan_training("sft", settings, tiny(n_layer=4, n_head=4, n_embd=32, block_size=16), world_size=4, seq_len=16,
                             device="cpu", data_dir=Path("."), init_model=None, seed=0)

    assert plan("type:BlockPipe").stage_layers == (0, 3, 4, 5, 8)
    with pytest.raises(ConfigError) as error:
        plan("uniform")
    assert str(error.value).startswith("stages.sft.lora: pipeline stage 0 (layers 0..1) holds no transformer block"), str(error.value)


def test_the_planner_counts_adapter_gradients_and_optimizer_state_only():
    from pipelines.train.memory import stage_memory
    from pipelines.train.plan import plan_training
    from pipelines.train.settings import TrainStageSpec

    config = preset("gpt2-124m", 50304)

    def memory(**lora):
        settings = TrainStageSpec(steps=10, lora=lora or None, deepspeed={"zero_stage": 2})
        plan = plan_training("sft", settings, config, world_size=1, seq_len=1024, device="cuda", data_dir=Path("."),
                             init_model=None, seed=0)
        return stage_memory(plan)[0]

    full, adapted = memory(), memory(rank=8, targets=list(TARGETS))
    trainable = lora_param_count(config, 8, list(TARGETS))
    assert adapted.params == full.params + trainable
    assert adapted.optimizer == trainable * (4 + 8) and adapted.gradients == trainable * 2  # fp32 master + Adam; bf16 grads
    assert adapted.optimizer < 0.01 * full.optimizer


# ---- a short SFT from a model directory, on DeepSpeed engines --------------------------------

ENGINE_MODEL = dict(n_layer=4, n_embd=64, n_head=4, block_size=32)  # the engine job's model (tests/train_helpers.py)


@pytest.fixture(scope="module")
def init_dir(engine_job, tmp_path_factory):
    """A model directory for the engine job's tokenizer: the base every LoRA run starts from."""
    from model.export import save_model_dir
    from model.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(engine_job[1] / "tokenizer")
    torch.manual_seed(11)
    model = GPT(preset("tiny", tokenizer.n_vocab, **ENGINE_MODEL))
    return save_model_dir(model, tokenizer, tmp_path_factory.mktemp("lora") / "base")


@pytest.mark.slow
def test_lora_sft_trains_only_adapters_with_equal_losses_at_zero_0_2_and_3(engine_job, init_dir):
    """ZeRO-0 and ZeRO-2 straight through; ZeRO-3 stopped after step 2 and resumed from its
    checkpoint (which holds the adapters only). One start-up of 2 processes for the four calls."""
    from safetensors.torch import load_file

    from dist_workers import train_layouts
    from distributed import run_distributed
    from pipelines.train.checkpoint import load_file as checkpoint_file
    from train_helpers import prepared_run, weights

    job_path, template, root = engine_job
    common = ["cluster.num_workers=2", f"stages.sft.init={init_dir}", "stages.sft.lora.rank=4", "stages.sft.lora.alpha=8",
              "stages.sft.optimizer.lr=0.01", "stages.sft.optimizer.warmup_steps=0", "stages.sft.steps=4", "stages.sft.eval_every=100"]
    run, run_2, resumed, piped = (prepared_run(job_path, template, root / f"lora-{name}") for name in ("z0", "z2", "z3", "pp2"))
    zero_3 = common + ["stages.sft.deepspeed.zero_stage=3", "stages.sft.checkpoint_every=2"]
    pp_2 = common + ["stages.sft.deepspeed.zero_stage=1", "stages.sft.deepspeed.pipeline_stages=2", "stages.sft.checkpoint_every=2",
                     "stages.sft.grad_accum=2"]  # data-parallel 1: the same 8 rows a step
    # The pipeline runs first: its start-up would meet the collectives ZeRO-3 leaves behind in these processes.
    pp_first, pp_rest, z0, z2, first, rest = run_distributed(train_layouts, 2, str(job_path), [
        (pp_2, str(piped), 2), (pp_2, str(piped), None),
        (common + ["stages.sft.deepspeed.zero_stage=0", "stages.sft.save_checkpoints=false"], str(run), None),
        (common + ["stages.sft.deepspeed.zero_stage=2", "stages.sft.checkpoint_every=4"], str(run_2), None),
        (zero_3, str(resumed), 2), (zero_3, str(resumed), None)], "sft")[0]
    assert sorted(z0["losses"]) == [1, 2, 3, 4] and z0["losses"][4] < z0["losses"][1]
    z3, pp = {**first["losses"], **rest["losses"]}, {**pp_first["losses"], **pp_rest["losses"]}
    assert sorted(first["losses"]) == [1, 2] and sorted(rest["losses"]) == [3, 4] and sorted(pp_rest["losses"]) == [3, 4]
    for step, loss in z0["losses"].items():
        others = (z2["losses"][step], z3[step], pp[step])
        assert all(abs(loss - other) < 1e-5 for other in others), (step, loss, others)
    config = preset("tiny", 97, **ENGINE_MODEL)
    expected = lora_param_count(config, 4, list(TARGETS))
    for result in (z0, z2, rest, pp_rest):
        assert result["result"]["trainable_params"] == expected  # the optimizer's parameters
    lora_names = {f"{n}.lora_{x}" for n in adapted_names(config.n_layer, TARGETS) for x in "AB"}
    states = next((run_2 / "sft" / "checkpoints").glob("step_*/*model_states.pt"))
    assert set(checkpoint_file(states)["module"]) == lora_names  # ZeRO-2: the adapters whole; no tied head (the embedding)
    states = next((resumed / "sft" / "checkpoints").glob("step_*/*model_states.pt"))
    module = checkpoint_file(states)["module"]  # as a resume reads it: weights only
    # Under ZeRO-3 the module state holds placeholders, the values are in the optimizer's partitions:
    # none for a base weight, the tied head included (an alias of the frozen embedding).
    assert set(module) <= lora_names
    assert all(t.numel() <= 1 for n, t in module.items() if "lora_" not in n), {n: t.shape for n, t in module.items()}

    layer_files = (piped / "sft" / "checkpoints").glob("step_*/layer_*-model_states.pt")
    layers = {f"{path.parent.name}/{path.name}": checkpoint_file(path) for path in layer_files}
    assert len(layers) == 2 * (config.n_layer + 3)  # two checkpoints (steps 2 and 4), every layer but the tied head
    assert all(key.split(".")[-1] in ("lora_A", "lora_B") for state in layers.values() for key in state), layers  # no base weight
    base = load_file(str(init_dir / "model.safetensors"))
    adapter = load_file(str(run / "sft" / "adapter" / "adapter_model.safetensors"))
    adapter_config = json.loads((run / "sft" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["base_model_name_or_path"] == str(init_dir)
    exported = weights(run, "sft")
    assert exported.keys() == base.keys()
    for name, tensor in base.items():
        module = name.removesuffix(".weight")
        if module.split(".", 3)[-1] in TARGETS and name.endswith(".weight"):
            a, b = adapter[f"base_model.model.{module}.lora_A.weight"], adapter[f"base_model.model.{module}.lora_B.weight"]
            assert b.abs().max() > 0, name  # trained
            torch.testing.assert_close(exported[name], tensor + b @ a * 2, atol=1e-6, rtol=0)
        else:
            assert torch.equal(exported[name], tensor), name  # frozen
    for other in (run_2, resumed, piped):
        torch.testing.assert_close(weights(other, "sft"), exported, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_file(str(other / "sft" / "adapter" / "adapter_model.safetensors")), adapter, atol=1e-5, rtol=0)
