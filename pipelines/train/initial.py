"""The weights a training stage starts from: its `init` model directory, read lazily, with the
vocabulary grown to the job tokenizer's (the chat tokens a base model lacks)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.errors import RelayError


def initial_state(plan, tokenizer) -> Mapping | None:
    """The weights the stage starts from (GPT names), or None for a fresh model. Read lazily
    (model/export.py: LazyWeights), with the vocabulary grown to the tokenizer's as each
    embedding is read: a ZeRO-3 rank or a pipeline stage holds one tensor at a time beside
    its own part, never the whole init model."""
    from model.export import open_model_weights

    if plan.init_model is None:
        return None
    config, init_tok, weights = open_model_weights(plan.init_model)
    if init_tok.sha256 != tokenizer.sha256 or init_tok.special_tokens != tokenizer.special_tokens:
        raise RelayError(f"stages.{plan.stage}.init: {plan.init_model} uses tokenizer {init_tok.name} ({init_tok.sha256[:12]}), "
                         f"the job's is {tokenizer.name} ({tokenizer.sha256[:12]})")
    grown = config.replace(vocab_size=max(config.vocab_size, tokenizer.n_vocab))
    if grown != plan.model:
        raise RelayError(f"stages.{plan.stage}.init: {plan.init_model} is not the model the run was planned with "
                         "(it changed since); run the stage again")
    return weights if grown == config else GrownVocabulary(weights, config.vocab_size, grown)


class GrownVocabulary(Mapping):
    """Weights whose vocabulary grows from `old` ids to the config's (e.g. the chat tokens a base
    model lacks): the new embedding and head rows are the mean of the old ones, the padding
    rows zero; every other tensor passes through."""

    ROWS = ("transformer.wte.weight", "lm_head.weight")

    def __init__(self, weights: Mapping, old: int, config) -> None:
        self.weights, self.old, self.config = weights, old, config

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.weights[name]
        if name not in self.ROWS:
            return value
        rows = value.new_zeros((self.config.padded_vocab_size, value.shape[1]))
        rows[:self.old] = value[:self.old]
        rows[self.old:self.config.vocab_size] = value[:self.old].mean(dim=0)
        return rows

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)
