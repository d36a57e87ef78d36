"""Configs of a training stage (pretrain or SFT): budget, batch, optimizer, DeepSpeed."""

from __future__ import annotations

import difflib
import math
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from model.lora import TARGETS as LORA_TARGETS
from pipelines.settings import Strict


class OptimizerSpec(Strict):
    """AdamW with decay / no-decay groups; warmup then decay to lr * min_lr_ratio."""

    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the floor of the decay, as a fraction of lr")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="Adam's moment decays, each in [0, 1)")
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 disables clipping")


class DeepSpeedSpec(Strict):
    """Rendered into the DeepSpeed config; `extra` is merged in last for anything not covered."""

    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = Field(False, description="keep optimizer states (and the step) on the CPU")
    pipeline_stages: int = Field(1, ge=1, description="pp: >1 cuts the model into a DeepSpeed PipelineModule")
    tensor_parallel: int = Field(1, ge=1, description="tp: split every layer's heads, MLP width and vocabulary over this many "
                                 "ranks (Megatron-style; keep it within a node); world = pp x tp x sp x data-parallel")
    sequence_parallel: int = Field(1, ge=1, description="sp: split every row's tokens over this many ranks, attention by an all-to-all "
                                   "over heads (DeepSpeed-Ulysses style), for long context; pipeline_stages 1 and tensor_parallel 1")
    partition_method: Literal["compute", "type:BlockPipe", "parameters", "uniform"] = Field(
        "compute", description="how layers are spread over pipeline stages (model/partition.py): compute balances training FLOPs, "
                               "counting the LM head and the loss over the vocabulary; type:BlockPipe the same number of blocks each")
    activation_checkpoint_interval: int = Field(0, ge=0, description="recompute activations every N layers (0: keep them)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPUs that support it, else fp32")
    extra: dict[str, Any] = Field(default_factory=dict)


class LoraSpec(Strict):
    """Low-rank adapters (model/lora.py): the base weights stay frozen and only the adapters train,
    sit in the optimizer and take gradients. The export holds the merged weights (a normal model
    directory) and, in `adapter/`, the adapter alone in PEFT's layout."""

    rank: int = Field(8, description="r, the inner dimension of each adapter; trainable r x (in + out) per projection")
    alpha: float = Field(16.0, description="the adapter's output is scaled by alpha / rank")
    dropout: float = Field(0.0, description="dropout on the adapter's input, in [0, 1)")
    targets: list[str] = Field(default_factory=lambda: list(LORA_TARGETS),
                               description=f"projections of every block to adapt: any of {', '.join(LORA_TARGETS)}")

    @field_validator("rank")
    @classmethod
    def _rank(cls, value):
        if value <= 0:
            raise ValueError(f"{value} is not a rank; give a whole number of at least 1 (8 or 16 are usual)")
        return value

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{value} must be a finite number above 0 (the adapter is scaled by alpha / rank; 2 x rank is usual)")
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, value):
        if not 0 <= value < 1:
            raise ValueError(f"{value} is outside [0, 1)")
        return value

    @field_validator("targets")
    @classmethod
    def _targets(cls, value):
        if not value:
            raise ValueError(f"no projection to adapt; name at least one of {', '.join(LORA_TARGETS)}")
        for target in value:
            if target not in LORA_TARGETS:
                close = [t for t in LORA_TARGETS if t.split(".")[-1] == target] or difflib.get_close_matches(target, LORA_TARGETS, n=1)
                hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
                raise ValueError(f"unknown projection {target!r}{hint}; choose from {', '.join(LORA_TARGETS)}")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names a projection twice")
        return value


class TrainStageSpec(Strict):
    """One training stage. The run is sized by `steps` or by `tokens` (one of the two)."""

    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1, description="size the run in tokens: steps = ceil(tokens / tokens per step)")
    micro_batch: int = Field(8, ge=1, description="sequences per worker per forward")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    global_batch: int | None = Field(None, ge=1, description="if given, must equal micro_batch x grad_accum x data-parallel size")
    seq_len: int | None = Field(None, ge=8, description="pretraining window length; default the model's block_size (SFT rows come from data.sft.seq_len)")
    optimizer: OptimizerSpec = OptimizerSpec()
    deepspeed: DeepSpeedSpec = DeepSpeedSpec()
    eval_every: int = Field(100, ge=1)
    eval_batches: int = Field(10, ge=1, description="validation micro-batches per rank")
    checkpoint_every: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1, description="checkpoints kept on disk")
    save_checkpoints: bool = Field(True, description="false: no checkpoints at all (sweep points, throwaway runs); no resume")
    export_model: bool = Field(True, description="false: no model directory at the end (sweep points)")
    log_every: int = Field(10, ge=1)
    compile: Literal["auto", "model", "blocks", "off"] = Field(
        "auto", description="torch.compile: model (embeddings, blocks, LM head and loss in one graph; per layer and loss on a "
                            "pipeline stage), blocks (each transformer block), off; auto is model on GPUs and off on CPUs "
                            "(the first steps pay the compile; docs/PERFORMANCE.md has what it gains). true means model, false off")
    peak_tflops: float | None = Field(None, gt=0, description="peak FLOP/s (in TFLOP/s) per device for MFU when the GPU is not in the built-in table")
    init: str | None = Field(None, description="start from a model directory; for sft the default is the pretrain stage's export")
    lora: LoraSpec | None = Field(None, description="train low-rank adapters on a frozen model instead of every weight (meant for sft)")

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_switch(cls, value):
        """`compile: true / false` (the switch this field was before it named a scope)."""
        return {True: "model", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps, tokens")
        if self.steps is not None and self.optimizer.warmup_steps > self.steps:
            raise ValueError(f"optimizer.warmup_steps ({self.optimizer.warmup_steps}) is more than steps ({self.steps}): the "
                             "learning rate would never reach lr; give at most steps")
        return self

    @property
    def rows_per_example(self) -> int:
        """Token rows per training example (micro_batch counts examples): one, a window or a packed row."""
        return 1


class DPOStageSpec(TrainStageSpec):
    """Direct preference optimisation (Rafailov et al. 2023) after SFT: the model learns to give the
    chosen answer of each pair a higher log-probability than the rejected one, relative to the
    reference model (the stage's starting model, frozen). The reference's log-probabilities of every
    prepared pair are computed once, at the start of the stage, and cached in RUN/dpo/reference/.
    `micro_batch` counts pairs (each forward holds 2 x micro_batch rows: chosen and rejected)."""

    beta: float = Field(0.1, description="strength of the pull towards the reference: the implicit reward is "
                        "beta x (log pi(y|x) - log pi_ref(y|x)); 0.1 is usual (TRL, OpenRLHF)")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: -log sigmoid(beta x margin) (DPO); ipo: "
                                            "(margin - 1 / (2 beta))^2 (Azar et al. 2023), margin = the difference of log-ratios")
    label_smoothing: float = Field(0.0, description="sigmoid loss only: the share of pairs assumed mislabelled (conservative "
                                   "DPO), in [0, 0.5)")

    @field_validator("beta")
    @classmethod
    def _beta(cls, value):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{value} must be a finite number above 0 (0.1 is usual; larger stays closer to the reference)")
        return value

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, value):
        if not 0 <= value < 0.5:
            raise ValueError(f"{value} is outside [0, 0.5) (the share of pairs assumed to be labelled the wrong way round)")
        return value

    @model_validator(mode="after")
    def _smoothing_for_sigmoid(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss sigmoid; the {self.loss} loss has none (remove it)")
        return self

    @property
    def rows_per_example(self) -> int:
        """Token rows per training example: a pair is a chosen and a rejected row."""
        return 2
