"""Every shipped job file and sweep point loads, validates and resolves to the plan its numbers
imply (checked against arithmetic done by hand); the cluster configs are valid YAML."""

from pathlib import Path

import pytest
import yaml

from cluster.preflight import check
from jobs.spec import load_job
from pipelines.rundir import RunDir
from pipelines.train.memory import stage_memory

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p for p in (REPO / "jobs").glob("*.yaml") if not p.name.startswith("sweep-"))

# Real tokenizers: the encoding's ids plus relaygpt's four chat tokens (system, user, assistant,
# end of turn); a tokenizer still to be trained counts its target size until it exists.
GPT2_IDS, CL100K_IDS = 50257 + 4, 100277 + 4

# job -> stage -> (vocab, world, pipeline, data-parallel, micro, accum, global batch, seq_len, tokens/step, steps, precision, device)
EXPECTED = {
    "tiny-assistant.yaml": {
        "pretrain": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 1000, "fp32", "cpu"),
        "sft": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 150, "fp32", "cpu")},
    "tiny-assistant-dpo.yaml": {  # DPO: 16 pairs of 2 rows of 64 tokens a step
        "pretrain": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 1000, "fp32", "cpu"),
        "sft": (1024, 2, 1, 2, 8, 1, 16, 128, 2048, 150, "fp32", "cpu"),
        "dpo": (1024, 2, 1, 2, 8, 1, 16, 64, 2048, 150, "fp32", "cpu")},
    "gpt2-124m.yaml": {  # 2e9 tokens / (512 x 1024) = 3814.7 -> 3815 steps
        "pretrain": (GPT2_IDS, 8, 1, 8, 32, 2, 512, 1024, 524288, 3815, "bf16", "cuda"),
        "sft": (GPT2_IDS, 8, 1, 8, 16, 1, 128, 1024, 131072, 1000, "bf16", "cuda")},
    "gpt-1.3b-pp4.yaml": {  # 26e9 / (256 x 2048) = 49591.1 -> 49592
        "pretrain": (CL100K_IDS, 8, 4, 2, 4, 32, 256, 2048, 524288, 49592, "bf16", "cuda")},
    "gpt-6.7b-pp8-dp4.yaml": {  # 1e11 / (512 x 2048) = 95367.4 -> 95368
        "pretrain": (CL100K_IDS, 32, 8, 4, 2, 64, 512, 2048, 1048576, 95368, "bf16", "cuda")},
    "gpt-6.7b-tp8-dp4.yaml": {  # tensor 8 x data 4; the same batch arithmetic as the pipeline version
        "pretrain": (CL100K_IDS, 32, 1, 4, 2, 64, 512, 2048, 1048576, 95368, "bf16", "cuda")},
    "gpt-13b-tp8-pp2.yaml": {  # tensor 8 x pipe 2 x data 2; 2.6e11 / (512 x 2048) = 247955.1 -> 247956
        "pretrain": (CL100K_IDS, 32, 2, 2, 2, 128, 512, 2048, 1048576, 247956, "bf16", "cuda")},
    "llama-1b-sft.yaml": {  # Llama 3.2 1B's own vocabulary (its config.json), 4 x 2 x 8 rows of 2048
        "sft": (128256, 8, 1, 8, 4, 2, 64, 2048, 131072, 120, "bf16", "cuda")},
}
# Llama 3.2 1B's config.json as published (the architecture fields): all `relaygpt plan` reads of the model.
LLAMA32_1B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
              "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
              "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
              "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                        "original_max_position_embeddings": 8192, "rope_type": "llama3"},
              "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}


def _model_dirs(name: str, tmp_path, hub_tokenizer) -> list[str]:
    """--set overrides naming a local model directory, for a job that starts from one: the
    published config.json and a Llama-3-style tokenizer, no weights (the plan reads none)."""
    if name != "llama-1b-sft.yaml":
        return []
    import json
    import shutil

    model = tmp_path / "Llama-3.2-1B-Instruct"
    shutil.copytree(hub_tokenizer, model)
    (model / "config.json").write_text(json.dumps(LLAMA32_1B))
    return [f"tokenizer.dir={model}", f"stages.sft.init={model}"]


def _numbers(run, plan) -> tuple:
    return (plan.model.vocab_size, plan.world_size, plan.pipeline_stages, plan.data_parallel, plan.micro_batch, plan.grad_accum,
            plan.global_batch, plan.seq_len, plan.tokens_per_step, plan.total_steps, plan.precision, plan.device)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_job_resolves_to_the_hand_computed_plan(path, tmp_path, llama3_style_tokenizer):
    job = load_job(path, _model_dirs(path.name, tmp_path, llama3_style_tokenizer))
    run, problems = check(job, RunDir(tmp_path / "run"))
    # Offline (as tests run), the only problems are eval tasks whose data lives on the hub:
    # preflight reads every task's data before anything starts.
    hub = [p for p in problems if p.startswith("stages.eval.tasks[") and "could not be loaded" in p]
    assert problems == hub, problems
    assert len(hub) == len([t for t in (job.stages.eval.tasks if job.stages.eval else []) if t != "synthetic" and not job.path(t).is_file()])
    assert {stage: _numbers(run, plan) for stage, plan in run.training.items()} == EXPECTED[path.name]
    for plan in run.training.values():
        assert plan.deepspeed_config["train_batch_size"] == plan.global_batch
        assert plan.deepspeed_config["gradient_accumulation_steps"] == plan.grad_accum
        assert plan.data_dir == run.run_dir.data(plan.stage) and plan.data_dir.is_absolute()
    assert run.vocab_exact == (job.tokenizer.train is None)


def test_sft_starts_from_the_pretrain_export_of_the_same_run(tmp_path):
    run = check(load_job(REPO / "jobs" / "tiny-assistant.yaml"), RunDir(tmp_path / "run"))[0]
    assert run.stage("sft").init_model == (tmp_path / "run" / "pretrain" / "model").resolve()


def test_dpo_starts_from_the_sft_export_and_the_plan_says_how_the_reference_is_kept(tmp_path):
    from cluster.preflight import format_plan

    job = load_job(REPO / "jobs" / "tiny-assistant-dpo.yaml")
    run, problems = check(job, RunDir(tmp_path / "run"))
    assert run.stage("dpo").init_model == (tmp_path / "run" / "sft" / "model").resolve()
    text = format_plan(job, run, problems)
    assert "dpo: loss sigmoid, beta 0.1" in text and "computed once, at the start of the stage" in text, text
    assert run.stage("pretrain").init_model is None and run.stage("sft").model == run.stage("pretrain").model


def test_the_expected_jobs_ship():
    names = {p.name for p in JOBS}
    assert {"tiny-assistant.yaml", "gpt2-124m.yaml", "gpt-1.3b-pp4.yaml", "gpt-6.7b-pp8-dp4.yaml", "llama-1b-sft.yaml"} <= names


def test_the_llama_example_plans_from_a_config_json_alone(tmp_path, llama3_style_tokenizer, capsys):
    """`relaygpt plan` of the shipped ~1B example with the two paths set: the imported
    architecture (16 layers, GQA 32/8, llama3 rope scaling, tied head), ZeRO-3 over 8 GPUs in
    80 GB, rows of data.sft.seq_len; without the paths set, the problem names the missing model.
    (The eval stage is left out: its tasks' data is on the hub, and tests run offline.)"""
    import cluster.cli as cli

    job = REPO / "jobs" / "llama-1b-sft.yaml"
    sets = _model_dirs(job.name, tmp_path, llama3_style_tokenizer) + ["stages.eval=null"]
    plan = check(load_job(job, sets), RunDir(tmp_path / "run"))[0].stage("sft")
    model = plan.model
    assert (model.n_layer, model.n_head, model.kv_heads, model.n_embd, model.block_size) == (16, 32, 8, 2048, 131072)
    assert model.rope_scaling["rope_type"] == "llama3" and model.tie_embeddings and plan.zero_stage == 3
    assert 1.2e9 < model.num_params() < 1.3e9
    problems = check(load_job(job, sets + ["data.sft.seq_len=262144"]), RunDir(tmp_path / "long"))[1]
    assert problems == [f"data.sft.seq_len: 262144 exceeds the block_size 131072 of the model stages.sft.init ({tmp_path}/"
                        "Llama-3.2-1B-Instruct) trains"], problems
    assert cli.main(["plan", str(job), *[a for o in sets for a in ("--set", o)], "--out", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "2048" in out, out
    assert cli.main(["plan", str(job), "--set", "stages.eval=null", "--out", str(tmp_path / "runs")]) == 2
    said = capsys.readouterr()  # `relaygpt plan` lists the problems it found
    assert "stages.sft.init: model directory" in said.out and "does not exist" in said.out and "Traceback" not in said.err, said


def test_the_large_jobs_split_layers_within_a_node(tmp_path):
    """6.7B and 13B: tensor parallel 8 (one 8-GPU node per tensor group), every rank of every stage
    within an 80 GB GPU; and the 13B model on its 2 pipeline stages without tensor parallelism does not."""
    for name, pp in (("gpt-6.7b-tp8-dp4.yaml", 1), ("gpt-13b-tp8-pp2.yaml", 2)):
        plan = check(load_job(REPO / "jobs" / name), RunDir(tmp_path / name))[0].stage("pretrain")
        assert (plan.tensor_parallel, plan.pipeline_stages) == (8, pp)
        assert max(m.total for m in stage_memory(plan)) < 80 * 1024**3
        assert any(note.startswith("tensor parallel 8") for note in plan.engine_notes)
    whole = load_job(REPO / "jobs" / "gpt-13b-tp8-pp2.yaml", ["cluster.num_workers=2", "stages.pretrain.deepspeed.tensor_parallel=1",
                                                             "stages.pretrain.global_batch=null"])
    problems = check(whole, RunDir(tmp_path / "whole"))[1]
    assert problems and "needs ~" in problems[0]
