"""The chat template: how a conversation becomes token ids, and which ids carry the loss.

    <|system|> You are terse.<|end|><|user|> Hi<|end|><|assistant|> Hello.<|end|>

Role headers and end-of-turn markers are special tokens placed by id, so no user text can
forge them. Content follows its header after one space (SentencePiece's "dummy prefix"): a
byte-level BPE then tokenizes a turn's first word as it does a word inside running text, so
" Paris" in an answer is the same token as " Paris" in the pretraining corpus. For training, the loss mask is 1 exactly on assistant content and the assistant's
<|end|> (the model must learn to stop), 0 on everything else. For generation the prompt ends
with an open <|assistant|> header and decoding stops at <|end|>.

A tokenizer that carries a published model's own chat template (`tokenizer.chat_template`,
read from its tokenizer_config.json) renders with that instead: model/chat_template.py.
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
    if tokenizer.chat_template is not None:
        for i, message in enumerate(messages):
            if message.get("role") not in ROLES:
                raise RelayError(f"message {i}: unknown role {message.get('role')!r}; valid roles: {', '.join(ROLES)}")
            if not isinstance(message.get("content"), str):
                raise RelayError(f"message {i}: content must be text, got {type(message.get('content')).__name__}")
        return tokenizer.chat_template.render(tokenizer, [{"role": m["role"], "content": m["content"]} for m in messages],
                                              add_generation_prompt)
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


def chat_stop_ids(tokenizer: Tokenizer) -> tuple[int, ...]:
    """The ids that end a generated reply: the model's own template's end of turn, or <|end|>;
    and end-of-text."""
    if tokenizer.chat_template is not None:
        return (*tokenizer.chat_template.stop_ids(tokenizer), tokenizer.eot_id)
    return (tokenizer.end_of_turn_id, tokenizer.eot_id)


def chat_info(tokenizer: Tokenizer) -> dict:
    """What a native export's config.json says about the chat template it was trained on."""
    if tokenizer.chat_template is None:
        return TEMPLATE_INFO
    return {"format": "jinja", "source": "the model's own tokenizer_config.json chat_template",
            "sha256": tokenizer.chat_template.sha256, "stored_in": "tokenizer/tokenizer.json"}


def strip_reply(text: str) -> str:
    """The text of a generated reply without the template's separator space."""
    return text[1:] if text.startswith(" ") else text
