"""The chat template: how a conversation becomes token ids, and which ids carry the loss.

    <|system|> You are terse.<|end|><|user|> Hi<|end|><|assistant|> Hello.<|end|>

Role headers and end-of-turn markers are special tokens placed by id, so no user text can
forge them. Content follows its header after one space (SentencePiece's "dummy prefix"): a
byte-level BPE then tokenizes a turn's first word as it does a word inside running text, so
" Paris" in an answer is the same token as " Paris" in the pretraining corpus. For training, the loss mask is 1 exactly on assistant content and the assistant's
<|end|> (the model must learn to stop), 0 on everything else. For generation the prompt ends
with an open <|assistant|> header and decoding stops at <|end|>.
"""

from __future__ import annotations

from model.errors import RelayError
from model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
TEMPLATE_INFO = {
    "format": "relaygpt-chat-v1",
    "turn": "{role_token} {content}<|end|>",
    "role_tokens": {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"},
    "generation_prompt": "<|assistant|>",
    "stop": "<|end|>",
    "loss": "assistant content and its <|end|>",
}


def render_chat(tokenizer: Tokenizer, messages: list[dict], *, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """input ids and the loss mask (1 on supervised tokens) for a list of {role, content}."""
    headers = {"system": tokenizer.system_id, "user": tokenizer.user_id, "assistant": tokenizer.assistant_id}
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in headers:
            raise RelayError(f"message {i}: unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RelayError(f"message {i}: content must be text, got {type(content).__name__}")
        supervised = 1 if role == "assistant" else 0
        body = tokenizer.encode(" " + content)
        ids += [headers[role], *body, tokenizer.end_of_turn_id]
        mask += [0] + [supervised] * (len(body) + 1)
    if add_generation_prompt:
        ids.append(tokenizer.assistant_id)
        mask.append(0)
    return ids, mask


def strip_reply(text: str) -> str:
    """The text of a generated reply without the template's separator space."""
    return text[1:] if text.startswith(" ") else text
