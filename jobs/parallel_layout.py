"""Job checks of the split layouts (tensor and sequence parallelism): what each cannot be
combined with yet, and a model it cannot split; one line per problem, naming the field."""

from __future__ import annotations

from pipelines.train.settings import TrainStageSpec


def sequence_parallel_problems(where: str, stage: TrainStageSpec, model) -> list[str]:
    """What sequence parallelism cannot be combined with (yet), and heads it cannot split; one
    line each. (The sequence length is checked by the plan, which resolves it.)"""
    from model.sequence_parallel import sequence_parallel_problems as model_problems

    ds, sp = stage.deepspeed, stage.deepspeed.sequence_parallel
    if sp == 1:
        return []
    field = f"{where}.deepspeed.sequence_parallel"
    problems = [f"{field}: {line}" for line in model_problems(model, sp, sp)]
    if ds.pipeline_stages > 1 or ds.tensor_parallel > 1:
        problems.append(f"{field}: {sp} runs with pipeline_stages 1 and tensor_parallel 1 only (not implemented with them)")
    if ds.zero_stage > 1:
        problems.append(f"{where}.deepspeed.zero_stage: ZeRO-{ds.zero_stage} is not verified with sequence_parallel {sp}; "
                        "use zero_stage 0 or 1")
    if stage.lora is not None:
        problems.append(f"{where}.lora: adapters are not implemented with sequence_parallel {sp}; use sequence_parallel 1")
    if stage.compile not in ("auto", "off"):
        problems.append(f"{where}.compile: {stage.compile!r} is not supported with sequence_parallel {sp} (its all-to-alls run "
                        "eagerly); use off or auto")
    if ds.activation_checkpoint_interval:
        problems.append(f"{where}.deepspeed.activation_checkpoint_interval: not verified with sequence_parallel {sp}; use 0")
    return problems


def tensor_parallel_problems(where: str, stage: TrainStageSpec, model) -> list[str]:
    """What tensor parallelism cannot be combined with (yet), and a model it cannot split; one line
    each. (The vocabulary is checked by the plan, once the tokenizer's size is known.)"""
    from model.tensor_parallel import tensor_parallel_problems as model_problems

    ds, tp = stage.deepspeed, stage.deepspeed.tensor_parallel
    if tp == 1:
        return []
    field = f"{where}.deepspeed.tensor_parallel"
    problems = [f"{field}: {line}" for line in model_problems(model, tp) if not line.startswith("padded_vocab_size")]
    if ds.zero_stage > 1:
        problems.append(f"{where}.deepspeed.zero_stage: ZeRO-{ds.zero_stage} is not supported with tensor_parallel {tp} "
                        "(only ZeRO 0 and 1 are verified to shard over the data-parallel ranks alone); use zero_stage 0 or 1")
    if stage.lora is not None:
        problems.append(f"{where}.lora: adapters are not implemented with tensor_parallel {tp}; use tensor_parallel 1")
    if stage.compile not in ("auto", "off"):
        problems.append(f"{where}.compile: {stage.compile!r} is not supported with tensor_parallel {tp} (its all-reduces run "
                        "eagerly); use off or auto (which runs eagerly with tensor parallelism)")
    if ds.offload_optimizer:
        problems.append(f"{where}.deepspeed.offload_optimizer: not verified with tensor_parallel {tp}; use one of the two")
    return problems
