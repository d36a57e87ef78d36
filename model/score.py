"""Log-likelihoods of continuations given contexts: what multiple-choice benchmarks score.

For a request (context ids, continuation ids) the model reads context + continuation (the
last block_size + 1 tokens of it when longer) and the score is the sum over the
continuation's tokens of log p(token | everything before it), from one forward pass. Requests
are batched longest first and padded on the right, which causal attention never sees. Only
the real vocabulary takes part in the softmax: padding rows of the embedding are not tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def continuation_logprobs(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[float]:
    """The log-likelihood of each request's continuation, in input order."""
    return [logprob for logprob, _ in continuation_scores(model, requests, batch_size)]


@torch.inference_mode()
def continuation_scores(model, requests: list[tuple[list[int], list[int]]], batch_size: int = 16) -> list[tuple[float, bool]]:
    """(log-likelihood, is greedy) of each request's continuation, in input order: is greedy
    when every continuation token is the most likely one at its position (the harness's
    `is_greedy`)."""
    window = model.config.block_size
    vocab = model.config.vocab_size
    device = next(model.parameters()).device
    prepared = []
    for context, continuation in requests:
        if not continuation:
            raise ValueError("a continuation needs at least one token")
        ids = (list(context) + list(continuation))[-(window + 1):]
        if len(ids) < 2:
            raise ValueError("a request needs at least two tokens (give the context an end-of-text)")
        prepared.append((ids, min(len(continuation), len(ids) - 1)))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    scores = [(0.0, False)] * len(prepared)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            longest = max(len(prepared[i][0]) - 1 for i in batch)
            x = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prepared[i][0]
                x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            logits, _ = model(x.to(device))
            logprobs = F.log_softmax(logits[..., :vocab].float(), dim=-1)
            for row, i in enumerate(batch):
                ids, count = prepared[i]
                targets = torch.tensor(ids[-count:], device=device)
                positions = torch.arange(len(ids) - 1 - count, len(ids) - 1, device=device)
                greedy = bool((logprobs[row, positions].argmax(-1) == targets).all())
                scores[i] = (float(logprobs[row, positions, targets].sum()), greedy)
    finally:
        model.train(was_training)
    return scores
