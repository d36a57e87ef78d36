"""The GPT cut into DeepSpeed pipeline layers: the same blocks, as LayerSpecs.

Layer order (indices are what DeepSpeed partitions and names parameters by):

    0            token embedding            (TiedLayerSpec "embed" when embeddings are tied)
    1            position embedding + dropout
    2 .. L+1     transformer blocks
    L+2          final norm
    L+3          LM head                    (the tied "embed" module again, used as a matmul)

Between stages a layer passes the hidden states (B, T, C), or, when the documents of packed
rows are kept apart, the tuple (hidden states, document ids (B, T)): the first stage reads
(token ids, document ids) from the batch, and the final norm drops the ids. A (B, T) integer
tensor crosses stages instead of a (B, 1, T, T) mask, and needs no gradient. Each stage builds
the attention mask of its documents once, on entry (`documents_apart_mask`: a FlexAttention
BlockMask on CUDA, the dense mask elsewhere), and passes it to its layers as a third element,
(hidden states, document ids, mask), which it drops again before its output leaves; every
block rebuilds its positions from the ids.

With tied embeddings the first and last stages each hold a copy of the token embedding and
DeepSpeed all-reduces its gradient between them, so they stay one matrix. `gpt_key` maps a
pipeline parameter name to the GPT parameter name, which is how weights move between the two
layouts (tests, checkpoint export). This is the only file in model/ that imports deepspeed.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig
from model.gpt import Block, document_positions, documents_apart_mask, init_weights, lm_loss, make_norm, rope_tables

EMBED_KEY = "embed"


def split_documents(inputs):
    """(tensor, documents) from what a layer receives: a tensor alone, whose documents are (), or
    the tensor followed by its documents: (document ids,) between stages, (document ids, their
    attention mask) within one."""
    return (inputs[0], inputs[1:]) if isinstance(inputs, tuple) else (inputs, ())


def with_documents(x: torch.Tensor, documents: tuple):
    """What a layer passes on: x alone, or x followed by the documents it received."""
    return (x, *documents) if documents else x


def positions_of(x: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Positions (B, T) of hidden states x (B, T, C): restarting per document when ids are given."""
    if document_ids is not None:
        return document_positions(document_ids)
    return torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)


class TokenEmbeddingPipe(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.padded_vocab_size, config.n_embd)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def forward(self, inputs):
        input_ids, documents = split_documents(inputs)
        x = self.wte(input_ids)  # (B, T, C)
        return with_documents(x, documents)


def tied_head(module: TokenEmbeddingPipe, x: torch.Tensor) -> torch.Tensor:
    """The token embedding used as the LM head on the last stage (under tensor parallelism its
    vocabulary slice, a column-parallel layer: the input's gradient is summed over the group)."""
    tp = getattr(module.wte, "tp", None)
    if tp is not None:
        from model.tensor_parallel import copy_to_group

        x = copy_to_group(x, tp)
    return F.linear(x, module.wte.weight)  # (B, T, V) or (B, T, V / tp)


class PositionPipe(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.learned = config.position == "learned"
        if self.learned:
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
            nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, inputs):
        x, documents = split_documents(inputs)
        if self.learned:
            positions = document_positions(documents[0]) if documents else torch.arange(x.size(1), device=x.device)
            x = x + self.wpe(positions)
        x = self.drop(x)
        return with_documents(x, documents)


class BlockPipe(Block):
    """A transformer block that takes hidden states, or hidden states, document ids and their
    attention mask (pipeline stages pass tensors only: rope tables are rebuilt here)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__(config)
        self.config = config
        self.apply(lambda m: init_weights(m, config))

    def forward(self, inputs):
        x, documents = split_documents(inputs)
        document_ids = documents[0] if documents else None
        rope = rope_tables(self.config, positions_of(x, document_ids)) if self.config.position == "rope" else None
        if document_ids is None:
            return super().forward(x, rope)  # plain causal attention
        if len(documents) == 2:
            attn_mask = documents[1]  # built once by the pipeline stage for all its blocks
        else:  # a block called on its own
            attn_mask = documents_apart_mask(document_ids, attention_dropout(self))
        return (super().forward(x, rope, attn_mask), *documents)


def attention_dropout(module: nn.Module) -> float:
    """The attention dropout `module` applies now: its config's in training, none in evaluation."""
    return module.config.dropout if module.training else 0.0


class FinalNormPipe(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_f = make_norm(config)

    def forward(self, inputs) -> torch.Tensor:
        x, _ = split_documents(inputs)  # the head and the loss need no documents
        return self.ln_f(x)


class LMHeadPipe(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(x)


def layer_specs(config: GPTConfig) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if config.tie_embeddings:
        embed = TiedLayerSpec(EMBED_KEY, TokenEmbeddingPipe, config, tied_weight_attr=["wte.weight"])
        head = TiedLayerSpec(EMBED_KEY, TokenEmbeddingPipe, config, forward_fn=tied_head, tied_weight_attr=["wte.weight"])
    else:
        embed = LayerSpec(TokenEmbeddingPipe, config)
        head = LayerSpec(LMHeadPipe, config)
    blocks = [LayerSpec(BlockPipe, config) for _ in range(config.n_layer)]
    return [embed, LayerSpec(PositionPipe, config), *blocks, LayerSpec(FinalNormPipe, config), head]


def build_pipeline(
    config: GPTConfig,
    num_stages: int,
    *,
    partition_method: str = "compute",
    seq_len: int | None = None,
    parts: tuple[int, ...] | None = None,
    activation_checkpoint_interval: int = 0,
    topology=None,
    seed: int = 1234,
    loss_fn=lm_loss,
):
    """A DeepSpeed PipelineModule of `config` over `num_stages` (needs torch.distributed up).

    The stages are cut at `parts` (a run plan's stage_layers), else where model/partition.py
    says for `partition_method` (by default balancing training FLOPs at `seq_len`), so the
    planner's per-stage figures describe the very partition that runs. Each stage builds only
    its own layers. `loss_fn(logits, labels)` runs on the last stage (model/gpt.py: lm_loss).
    """
    from model.partition import stage_boundaries

    if parts is None:
        parts = stage_boundaries(config, num_stages, partition_method, seq_len)
    return _partitioned_module_class()(
        parts,
        config,
        layers=layer_specs(config),
        num_stages=None if topology is not None else num_stages,
        topology=topology,
        loss_fn=loss_fn,
        activation_checkpoint_interval=activation_checkpoint_interval,
        checkpointable_layers=["BlockPipe"],
        seed_layers=True,  # layer i is initialised under seed + i, whatever stage holds it
        seed_fn=seed_layer,
        base_seed=seed,
    )


def _partitioned_module_class():
    from deepspeed.pipe import PipelineModule

    class PartitionedPipeline(PipelineModule):
        """A PipelineModule cut at given layer boundaries instead of by DeepSpeed's own methods,
        whose stage builds the attention mask of kept-apart documents once for all its blocks."""

        def __init__(self, parts: list[int], config: GPTConfig, **kwargs) -> None:
            self._given_parts = list(parts)
            self.config = config
            super().__init__(**kwargs)
            self.has_blocks = any(isinstance(layer, BlockPipe) for layer in self.forward_funcs)

        def _partition_layers(self, method: str = "uniform") -> None:
            self.parts = list(self._given_parts)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def forward(self, forward_input):
            x, documents = split_documents(forward_input)
            if len(documents) != 1 or not self.has_blocks:
                return super().forward(forward_input)
            # The mask rides along with the ids through the stage's layers (DeepSpeed's
            # activation checkpointing keeps a non-tensor argument such as a BlockMask for the
            # recomputation); only tensors leave a stage, so it is dropped at the end.
            document_ids = documents[0]
            output = super().forward((x, document_ids, documents_apart_mask(document_ids, attention_dropout(self))))
            return output[:2] if isinstance(output, tuple) else output

    return PartitionedPipeline


def seed_layer(seed) -> None:
    """Seed torch before building a layer. (DeepSpeed's default also seeds `random` with the
    layer index as a numpy integer, which Python 3.11's random.seed rejects.)"""
    torch.manual_seed(int(seed))


def layer_classes(config: GPTConfig) -> list[type[nn.Module]]:
    """The module class of every pipeline layer index (the tied head repeats the embedding)."""
    head = TokenEmbeddingPipe if config.tie_embeddings else LMHeadPipe
    return [TokenEmbeddingPipe, PositionPipe, *([BlockPipe] * config.n_layer), FinalNormPipe, head]


@torch.no_grad()
def init_like_pipeline(model: nn.Module, seed: int) -> nn.Module:
    """Initialise a plain GPT exactly as `build_pipeline(seed=seed)` initialises its layers.

    The pipeline seeds layer i with seed + i before building it, so its weights do not depend
    on how layers are spread over stages; doing the same here makes a pp=1 run start from the
    very weights a pp=2 or pp=4 run starts from.
    """
    params = dict(model.named_parameters())  # a tied head is the embedding: one entry
    missing = set(params)
    for name, value in pipeline_initial_weights(model.config, seed):  # one layer at a time
        if name in params:
            params[name].copy_(value)
            missing.discard(name)
    assert not missing, f"no initial weights for {sorted(missing)}"
    return model


def pipeline_initial_weights(config: GPTConfig, seed: int):
    """(GPT name, tensor) of every initial weight a pipeline of `config` starts from, one layer
    built at a time (so a caller that copies them into a sharded model never holds more than a
    layer). A tied head is the embedding again (the pipeline copies the first stage's embedding
    to the last stage), so it is not yielded."""
    for idx, cls in enumerate(layer_classes(config)):
        if idx == config.n_layer + 3 and config.tie_embeddings:
            continue
        torch.manual_seed(seed + idx)
        layer = cls(config)
        for key, value in layer.state_dict().items():
            yield gpt_key(config, f"{idx}.{key}"), value
        del layer


_LAYER_KEY = re.compile(r"^(\d+)\.(.+)$")


def gpt_key(config: GPTConfig, pipe_key: str) -> str:
    """The GPT parameter name of a PipelineModule parameter name."""
    if pipe_key.startswith(f"tied_modules.{EMBED_KEY}."):
        return "transformer." + pipe_key.removeprefix(f"tied_modules.{EMBED_KEY}.")
    match = _LAYER_KEY.match(pipe_key)
    if not match:
        raise KeyError(f"not a pipeline parameter name: {pipe_key}")
    layer, rest = int(match.group(1)), match.group(2)
    if layer == 0 or layer == 1:  # token embedding (untied) / position embedding
        return f"transformer.{rest}"
    if layer < config.n_layer + 2:
        return f"transformer.h.{layer - 2}.{rest}"
    if layer == config.n_layer + 2:
        return f"transformer.{rest}"
    return rest  # lm_head.weight


def load_gpt_state(pipe: nn.Module, config: GPTConfig, gpt_state: dict[str, torch.Tensor]) -> None:
    """Copy GPT weights into the layers this pipeline stage holds."""
    own = pipe.state_dict()
    pipe.load_state_dict({key: gpt_state[gpt_key(config, key)] for key in own}, strict=True)


def gpt_state_of_stage(pipe: nn.Module, config: GPTConfig) -> dict[str, torch.Tensor]:
    """This stage's weights under their GPT names (a union over stages is the full model). An
    adapted projection gives its merged weight (W + (alpha / r) B A), not its adapter."""
    from model.lora import adapters, merged_weight

    state = {gpt_key(config, key): value for key, value in pipe.state_dict().items() if ".lora_" not in key}
    for name, module in adapters(pipe).items():
        state[gpt_key(config, f"{name}.weight")] = merged_weight(module)
    return state


def parallelize_stage(pipe: nn.Module, config: GPTConfig, tp) -> None:
    """Cut this pipeline stage's layers to its tensor-parallel slices, in place, after its whole
    layers were built (and loaded) as at tp 1 (model/tensor_parallel.py); the loss becomes the
    vocab-parallel one. A tied embedding's copy on the last stage is cut like the first's."""
    from model.tensor_parallel import VocabParallelLoss, parallel_embedding, parallel_head, parallelize_block

    for module in list(pipe.modules()):
        if isinstance(module, BlockPipe):
            parallelize_block(module, config, tp)
        elif isinstance(module, TokenEmbeddingPipe):
            # DeepSpeed marks the last stage's copy of a tied embedding so that it counts once
            replicated = getattr(module.wte.weight, "ds_pipe_replicated", False)
            module.wte = parallel_embedding(module.wte, config, tp)
            module.wte.weight.ds_pipe_replicated = replicated
        elif isinstance(module, LMHeadPipe):
            module.lm_head = parallel_head(module.lm_head, config, tp)
    pipe.loss_fn = VocabParallelLoss(tp, config.padded_vocab_size // tp.size)


def adapt_stage(pipe: nn.Module, config: GPTConfig, *, rank: int, alpha: float, dropout: float, targets, seed: int) -> int:
    """LoRA on a pipeline stage: freeze its layers and put adapters on the blocks it holds, each
    made as `model.lora.apply_lora` makes block i's in the whole GPT (the same A for the same
    seed), so a pipeline trains the adapters a pp = 1 run trains. Returns the stage's trainable count."""
    from model.lora import adapt_block

    for param in pipe.parameters():
        param.requires_grad_(False)
    for name, layer in pipe.named_children():
        if isinstance(layer, BlockPipe):
            adapt_block(layer, int(name) - 2, rank=rank, alpha=alpha, dropout=dropout, targets=targets, seed=seed)
    return sum(p.numel() for p in pipe.parameters() if p.requires_grad)
