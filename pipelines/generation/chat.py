"""A chat conversation over a model: context-window trimming, streaming, slash commands.

The conversation is re-rendered with the chat template for every reply. When it no longer
fits the context window (with room for the reply), the oldest exchanges are dropped first;
the system prompt is never dropped. A model whose vocabulary has no chat tokens (a base or an
imported GPT-2) gets a plain-text transcript ("User: ... Assistant: ...") instead.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import replace

from model.chat import chat_stop_ids, render_chat
from model.errors import RelayError
from model.generate import SamplingParams, stream
from model.tokenizer import Tokenizer

COMMANDS = "/reset  /system TEXT  /temperature T  /exit"


class ChatSession:
    def __init__(self, model, tokenizer: Tokenizer, *, system: str | None = None, params: SamplingParams | None = None, min_reply_tokens: int = 32) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.system = system
        self.params = params or SamplingParams(max_new_tokens=256, temperature=0.7, top_p=0.95)
        self.turns: list[dict] = []  # user / assistant messages, oldest first
        self.min_reply_tokens = min_reply_tokens
        self.uses_chat_tokens = tokenizer.chat_template is not None or model.config.vocab_size > tokenizer.end_of_turn_id
        self.dropped_turns = 0

    # ---- rendering ---------------------------------------------------------------------

    def _render(self, turns: list[dict]) -> list[int]:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + turns
        if self.uses_chat_tokens:
            return render_chat(self.tokenizer, messages, add_generation_prompt=True)[0]
        names = {"system": "System", "user": "User", "assistant": "Assistant"}
        text = "".join(f"{names[m['role']]}: {m['content']}\n\n" for m in messages) + "Assistant:"
        return self.tokenizer.encode(text)

    def prompt(self) -> list[int]:
        """The prompt for the next reply, dropping the oldest turns until it fits."""
        window = self.model.config.block_size
        while True:
            ids = self._render(self.turns)
            if len(ids) + self.min_reply_tokens <= window or len(self.turns) <= 1:
                break
            drop = 2 if len(self.turns) > 2 and self.turns[0]["role"] == "user" else 1
            del self.turns[:drop]
            self.dropped_turns += drop
        if len(ids) + self.min_reply_tokens > window:
            raise RelayError(f"the message ({len(ids)} tokens with the system prompt) does not fit the {window}-token context window with room for a reply")
        return ids

    # ---- conversation ------------------------------------------------------------------

    def reply(self, text: str) -> Iterator[str]:
        """Stream the assistant's answer to `text` as decoded text pieces."""
        self.turns.append({"role": "user", "content": text})
        try:
            ids = self.prompt()
        except RelayError:
            self.turns.pop()
            raise
        budget = min(self.params.max_new_tokens, self.model.config.block_size - len(ids))
        stops = chat_stop_ids(self.tokenizer) if self.uses_chat_tokens else (self.tokenizer.eot_id,)
        # A reply never contains the markers that open a turn: a model that would produce one (an
        # untrained one, say) must not put "<|assistant|>" text into the conversation.
        roles = (self.tokenizer.system_id, self.tokenizer.user_id, self.tokenizer.assistant_id) \
            if self.uses_chat_tokens and self.tokenizer.chat_template is None else ()
        params = replace(self.params, max_new_tokens=budget, stop_token_ids=stops, suppress_token_ids=roles)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        answer = ""
        for token in stream(self.model, ids, params):
            piece = decoder.decode(self.tokenizer.decode_bytes([token]))
            if not self.uses_chat_tokens and "\nUser:" in answer + piece:
                break  # a plain-text model starts writing the user's next line
            answer += piece
            if piece:
                yield piece
        answer += decoder.decode(b"", final=True)
        self.turns.append({"role": "assistant", "content": answer.strip()})

    def command(self, line: str) -> str | None:
        """Handle a slash command; the text to show, or None for /exit."""
        name, _, arg = line.strip().partition(" ")
        if name == "/exit":
            return None
        if name == "/reset":
            self.turns.clear()
            return "(conversation cleared)"
        if name == "/system":
            self.system = arg.strip() or None
            self.turns.clear()
            return f"(system prompt {'set' if self.system else 'removed'}; conversation cleared)"
        if name == "/temperature":
            try:
                self.params = replace(self.params, temperature=float(arg))
            except ValueError:
                return f"(temperature must be a finite number >= 0, got {arg!r})"
            return f"(temperature {self.params.temperature})"
        return f"(unknown command {name}; commands: {COMMANDS})"
