"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections of a GPT.

An adapted projection computes y = W x + b + (alpha / r) * B A dropout(x), with A (r, in)
initialised as PEFT does (Kaiming-uniform) and B (out, r) zero, so an adapted model starts out
computing exactly what its base did. The base weight and bias stay the same Parameter objects
under the same names (`transformer.h.0.attn.c_attn.weight`), frozen; only `lora_A` and `lora_B`
train. Merging folds the adapter into the weight (W + (alpha / r) * B A), which gives back a
plain GPT. Like the rest of model/, nothing here reads ranks, devices or the environment.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# The projections an adapter can sit on, named as below each block (`transformer.h.{i}.<target>`).
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter beside its (frozen) weight.

    Built from an existing Linear, whose weight and bias it takes over as they are (no copy), so
    loading, exporting and sharding see the base parameters under their usual names."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))  # (out, r)
        # PEFT's init of A (nn.Linear's default); B = 0 keeps the output unchanged at the start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) then (..., out)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    def delta(self) -> torch.Tensor:
        """What merging adds to the weight: (alpha / r) * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def adapted_names(n_layer: int, targets) -> list[str]:
    """Module names (`transformer.h.{i}.<target>`) of every adapted projection, in layer order."""
    return [f"transformer.h.{i}.{target}" for i in range(n_layer) for target in targets]


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets, seed: int = 0) -> int:
    """Freeze every parameter of `model` (a GPT) and put an adapter on each target projection of
    every block. A's initial values come from `seed` and the block's index alone
    (`lora_generator`), so every data-parallel replica, and every pipeline stage holding the
    block, starts with the same adapters. Returns the number of trainable parameters."""
    for param in model.parameters():
        param.requires_grad_(False)
    for layer, block in enumerate(model.transformer.h):
        adapt_block(block, layer, rank=rank, alpha=alpha, dropout=dropout, targets=targets, seed=seed)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_generator(seed: int, layer: int) -> torch.Generator:
    """The generator of block `layer`'s A matrices: a function of the seed and the block alone,
    so a pipeline stage that builds only some blocks makes exactly the adapters the whole model has."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


def adapt_block(block: nn.Module, layer: int, *, rank: int, alpha: float, dropout: float, targets, seed: int) -> None:
    """Put an adapter on each target projection of one (frozen) transformer block, the `layer`-th."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; choose from {list(TARGETS)}")
    generator = lora_generator(seed, layer)
    for target in targets:
        parent_name, child = target.rsplit(".", 1)
        parent = block.get_submodule(parent_name)
        base = getattr(parent, child)
        assert isinstance(base, nn.Linear) and not isinstance(base, LoRALinear), (layer, target)
        adapter = LoRALinear(base, rank, alpha, dropout, generator=None if base.weight.device.type == "meta" else generator)
        adapter.train(base.training)  # a new module trains by default: follow the model's mode (dropout)
        setattr(parent, child, adapter)


def lora_param_count(config, rank: int, targets) -> int:
    """Trainable parameters of the adapters: r * (in + out) per adapted projection."""
    return config.n_layer * sum(rank * sum(projection_shape(config, target)) for target in targets)


def projection_shape(config, target: str) -> tuple[int, int]:
    """(in_features, out_features) of a target projection of `config`'s blocks."""
    qkv_out = (config.n_head + 2 * config.kv_heads) * config.head_dim
    fc_out = config.mlp_hidden * (2 if config.mlp == "swiglu" else 1)
    return {"attn.c_attn": (config.n_embd, qkv_out), "attn.c_proj": (config.n_embd, config.n_embd),
            "mlp.c_fc": (config.n_embd, fc_out), "mlp.c_proj": (config.mlp_hidden, config.n_embd)}[target]


def adapters(model: nn.Module) -> dict[str, LoRALinear]:
    """Module name -> adapted projection, for every adapter in `model`."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


@torch.no_grad()
def merged_weight(module: LoRALinear) -> torch.Tensor:
    """The projection's weight with the adapter folded in, in fp32."""
    return module.weight.float() + module.delta().float()


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear modules back: `model` becomes
    a GPT with the usual parameter names, computing what the adapted model computed (without
    dropout). In place; returns the model."""
    for name, module in adapters(model).items():
        parent_name, child = name.rsplit(".", 1)
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(merged_weight(module).to(module.weight.dtype))
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.detach().clone())
        setattr(model.get_submodule(parent_name), child, plain)
    return model


# Where each of our fused projections lives in a Llama-family checkpoint, and how its output
# rows are cut there (model/hf.py: llama_recipe). A fused projection's adapter is exactly one
# adapter per part: each part shares A and takes its rows of B.
def _llama_parts(config, target: str) -> list[tuple[str, int]]:
    q, kv, hidden = config.n_head * config.head_dim, config.kv_heads * config.head_dim, config.mlp_hidden
    return {"attn.c_attn": [("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)],
            "attn.c_proj": [("self_attn.o_proj", config.n_embd)],
            "mlp.c_fc": [("mlp.gate_proj", hidden), ("mlp.up_proj", hidden)],
            "mlp.c_proj": [("mlp.down_proj", config.n_embd)]}[target]


def peft_adapter(config, weights: dict[str, torch.Tensor], *, rank: int, alpha: float, dropout: float, targets,
                 base_model: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of PEFT's LoRA layout for the base
    that `relaygpt export --format hf` writes from `config`: GPT2LMHeadModel (PEFT targets our own
    module names: `attn.c_attn` matches `transformer.h.{i}.attn.c_attn`; Conv1D, so fan_in_fan_out)
    or a Llama-family model (q/k/v and gate/up cut apart). `weights`: our names
    (`transformer.h.{i}.attn.c_attn.lora_A`) -> tensors. Anything else raises ValueError."""
    from model.export import hf_incompatibilities
    from model.hf import llama_incompatibilities

    tensors: dict[str, torch.Tensor] = {}
    if not hf_incompatibilities(config):
        modules, fan_in_fan_out = list(targets), True
        for name, tensor in weights.items():
            tensors[f"base_model.model.{name}.weight"] = tensor.contiguous()
    elif not llama_incompatibilities(config):
        modules, fan_in_fan_out = [part.split(".")[-1] for t in targets for part, _ in _llama_parts(config, t)], False
        for i in range(config.n_layer):
            for target in targets:
                A, B = weights[f"transformer.h.{i}.{target}.lora_A"], weights[f"transformer.h.{i}.{target}.lora_B"]
                parts = _llama_parts(config, target)
                for (part, _), rows in zip(parts, B.split([size for _, size in parts])):
                    prefix = f"base_model.model.model.layers.{i}.{part}"
                    tensors[f"{prefix}.lora_A.weight"] = A.clone().contiguous()
                    tensors[f"{prefix}.lora_B.weight"] = rows.contiguous()
    else:
        raise ValueError("the model is neither GPT-2- nor Llama-shaped, so Hugging Face has no base for a PEFT adapter: "
                         + "; ".join(hf_incompatibilities(config)))
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "inference_mode": True,
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": modules,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    return adapter_config, tensors


def write_peft_adapter(out, config, weights: dict[str, torch.Tensor], **settings) -> None:
    """`out`/adapter_config.json and `out`/adapter_model.safetensors (fp32), written atomically."""
    import json
    from pathlib import Path

    from model.atomic import atomic_dir
    from model.weights_file import StreamingSafetensors

    adapter_config, tensors = peft_adapter(config, weights, **settings)
    with atomic_dir(Path(out)) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        specs = {name: (torch.float32, tuple(t.shape)) for name, t in tensors.items()}
        with StreamingSafetensors(tmp / "adapter_model.safetensors", specs, {"format": "pt"}) as file:
            for name in file.order:
                file.write(name, tensors[name].float())
