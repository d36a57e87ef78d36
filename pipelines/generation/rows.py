"""Generation over files of prompts: read JSONL, generate in batches, write JSONL in order.

Input lines hold `prompt` (text), `messages` (a chat, rendered with the chat template) or
`prompt_tokens` (ids). Each output line is the input object plus `completion`,
`prompt_tokens`, `completion_tokens` and `finish_reason` (DESIGN.md, "Generation output").
"""

from __future__ import annotations

import json
from pathlib import Path

from model.chat import chat_stop_ids, render_chat
from model.errors import RelayError
from model.generate import SamplingParams, generate
from model.tokenizer import Tokenizer


def read_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts file; a malformed line is an error naming file:line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise RelayError(f"{path}: prompts file does not exist") from None
    except UnicodeDecodeError as exc:
        raise RelayError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RelayError(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict) or not ({"prompt", "messages", "prompt_tokens"} & row.keys()):
            raise RelayError(f"{path}:{n}: each line needs one of 'prompt', 'messages' or 'prompt_tokens'")
        row["_line"] = n
        rows.append(row)
    if not rows:
        raise RelayError(f"{path}: no prompts in the file")
    return rows


def prompt_ids(row: dict, tokenizer: Tokenizer, chat: bool, where: str, context: int | None = None) -> list[int]:
    """Token ids of one prompt row; with `chat`, rendered with the template + open assistant turn.
    With `context` (the model's block size), a prompt that leaves no room for one generated
    token is refused here, naming its row, rather than deep inside generation."""
    ids = _row_ids(row, tokenizer, chat, where)
    if not ids:
        raise RelayError(f"{where}: the prompt is empty; give at least one token of text or ids")
    if context is not None and len(ids) >= context:
        raise RelayError(f"{where}: the prompt is {len(ids)} tokens; the model's {context}-token context "
                         f"takes prompts of at most {context - 1} tokens (one is left to generate)")
    return ids


def _row_ids(row: dict, tokenizer: Tokenizer, chat: bool, where: str) -> list[int]:
    if "prompt_tokens" in row:
        ids = row["prompt_tokens"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.n_vocab for i in ids):
            raise RelayError(f"{where}: prompt_tokens must be a list of ids in [0, {tokenizer.n_vocab})")
        return ids
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise RelayError(f"{where}: 'prompt' must be text, got {json.dumps(row['prompt'])[:40]}")
    if chat:
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise RelayError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects, "
                                 f"got {json.dumps(messages)[:40]}")
        else:
            messages = [{"role": "user", "content": row["prompt"]}]
        try:
            return render_chat(tokenizer, messages, add_generation_prompt=True)[0]
        except RelayError as exc:
            raise RelayError(f"{where}: {exc}") from None
    if "prompt" not in row:
        raise RelayError(f"{where}: 'messages' needs --chat; without it give 'prompt' text")
    return tokenizer.encode(row["prompt"])


def complete_rows(model, tokenizer: Tokenizer, rows: list[dict], params: SamplingParams, *, chat: bool, batch_size: int, where: str = "") -> list[dict]:
    """Generate for `rows` (batched, sorted by length to limit padding); results in input order."""
    if chat:
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": (*params.stop_token_ids, *chat_stop_ids(tokenizer))})
    elif not params.stop_token_ids:
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": (tokenizer.eot_id,)})
    prompts = [prompt_ids(row, tokenizer, chat, f"{where}:{row.get('_line', i + 1)}", model.config.block_size)
               for i, row in enumerate(rows)]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    results: list[dict | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        completions = generate(model, [prompts[i] for i in batch], params)
        for i, completion in zip(batch, completions):
            row = {k: v for k, v in rows[i].items() if k != "_line"}
            row.update(
                completion=tokenizer.decode(completion.tokens),
                prompt_tokens=prompts[i],
                completion_tokens=completion.tokens,
                finish_reason=completion.finish_reason,
            )
            results[i] = row
    return results  # type: ignore[return-value]


def choice_requests(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them: a space that ends
    the context moves to the continuation, the continuation's ids are those of the whole
    string after the context's, and an empty context is the end-of-text token."""
    if context.endswith(" ") and not continuation.startswith(" "):
        context, continuation = context[:-1], " " + continuation
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


def score_rows(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int) -> list[dict]:
    """Rows of {"context", "continuations"} (text), or {"context_tokens", "continuation_tokens"}
    (ids, already rendered) -> the same rows with per continuation `loglikelihoods`, `num_tokens`
    and `greedy` (every token the most likely: model/score.py), in input order."""
    from model.score import continuation_scores

    requests, owners = [], []
    for i, row in enumerate(rows):
        if "continuation_tokens" in row:
            requests += [(row["context_tokens"], ids) for ids in row["continuation_tokens"]]
            owners += [i] * len(row["continuation_tokens"])
            continue
        for continuation in row["continuations"]:
            requests.append(choice_requests(tokenizer, row["context"], continuation))
            owners.append(i)
    scores = continuation_scores(model, requests, batch_size=batch_size)
    results = [{**row, "loglikelihoods": [], "num_tokens": [], "greedy": []} for row in rows]
    for (_, continuation), owner, (value, greedy) in zip(requests, owners, scores):
        results[owner]["loglikelihoods"].append(value)
        results[owner]["num_tokens"].append(len(continuation))
        results[owner]["greedy"].append(greedy)
    return results


def score_rolling(model, tokenizer: Tokenizer, rows: list[dict], *, batch_size: int) -> list[dict]:
    """Rows of {"rolling_text"} -> {"loglikelihood"}: the log-likelihood of the whole text as
    lm-evaluation-harness's loglikelihood_rolling reads it: end-of-text first, the tokens
    predicted in disjoint windows of the context length, each from the tokens before it within
    the window, the last window filled out to its length with earlier tokens as context."""
    from model.score import continuation_scores

    window = model.config.block_size
    requests, owners = [], []
    for i, row in enumerate(rows):
        ids = [tokenizer.eot_id] + tokenizer.encode(row["rolling_text"])
        for start in range(1, len(ids), window):
            requests.append((ids[:start], ids[start : start + window]))  # the scorer keeps the last window + 1 ids
            owners.append(i)
    totals = [0.0] * len(rows)
    for owner, (value, _) in zip(owners, continuation_scores(model, requests, batch_size=batch_size)):
        totals[owner] += value
    return [{"loglikelihood": total} for total in totals]


def text_nats(model, tokenizer: Tokenizer, text: str) -> tuple[float, int]:
    """(negative log-likelihood in nats, UTF-8 bytes) of a text on its own: end-of-text stands
    for the document start, and the text is read in windows of the context length, every
    token predicted from the tokens before it in its window."""
    import torch

    from model.gpt import lm_loss

    window = model.config.block_size
    device = next(model.parameters()).device
    ids = [tokenizer.eot_id] + tokenizer.encode(text)
    nats = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start : start + window + 1], device=device)[None]
            if chunk.size(1) < 2:
                break
            logits, _ = model(chunk[:, :-1])
            nats += float(lm_loss(logits, chunk[:, 1:])) * (chunk.size(1) - 1)
    return nats, len(text.encode("utf-8"))


def score_texts(model, tokenizer: Tokenizer, rows: list[dict]) -> list[dict]:
    """Rows of {"score_text"} -> {"nats", "bytes"} each (bits per byte, summed by the caller)."""
    was_training = model.training
    model.eval()
    try:
        return [dict(zip(("nats", "bytes"), text_nats(model, tokenizer, row["score_text"]))) for row in rows]
    finally:
        model.train(was_training)
