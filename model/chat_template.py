"""A published model's own chat template: the Jinja `chat_template` of its tokenizer_config.json.

An imported hub model was instruction-tuned (or will be) on its own template, not relaygpt's
role tokens: fine-tuning it, prompting it and exporting it use that template. It is rendered
as `transformers.apply_chat_template` renders it: Jinja's immutable sandbox (a hub template is
untrusted code: no attribute access to Python internals, no mutation of what it is given),
trim_blocks and lstrip_blocks, the loop-control extension, `raise_exception`, `strftime_now`,
a `tojson` that keeps non-ASCII text, and the tokenizer's bos/eos/unk/pad token strings as
variables. The rendered text is then tokenized at once, special tokens by id, so the ids are
AutoTokenizer's (`apply_chat_template(..., tokenize=True)`).

Two choices of our own:
- Message text that spells a special token (say "<|eot_id|>") stays text: it is encoded as
  ordinary characters, never as the token (transformers would emit the token there), so data
  and users cannot forge a turn boundary.
- The loss mask (1 on supervised tokens) is found by rendering prefixes of the conversation:
  an assistant turn's supervised text is what `messages[:i+1]` renders beyond
  `messages[:i]` with the generation prompt (Llama 3: its content and <|eot_id|>). A template
  whose renderings are not prefixes of one another (one that rewrites earlier turns) cannot be
  masked that way and is refused, naming the turn. `{% generation %}` blocks render their body.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime

from model.errors import RelayError

# model/chat.py's template as Jinja: a role token, one space, the content, <|end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# The tokenizer_config.json keys passed to the template as variables (transformers passes its
# special_tokens_map under these names).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
_HIDE = 0xF0000  # private-use code points standing for special-token text inside messages


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers): the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        import json

        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def token_text(value) -> str | None:
    """A tokenizer_config.json token entry as text: a string, or an AddedToken object's content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A Jinja chat template and the special-token strings it is rendered with."""

    def __init__(self, source: str, tokens: dict[str, str], where: str = "chat_template") -> None:
        import jinja2

        self.source, self.tokens, self.where = source, dict(tokens), where
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise RelayError(f"{where}: the chat template does not parse ({type(exc).__name__}: {exc})") from None
        self._stops: dict[int, tuple[int, ...]] = {}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def to_dict(self) -> dict:
        return {"template": self.source, "tokens": self.tokens}

    @classmethod
    def from_dict(cls, data, where: str) -> ChatTemplate:
        if not isinstance(data, dict) or not isinstance(data.get("template"), str) or not isinstance(data.get("tokens", {}), dict):
            raise RelayError(f"{where}: chat_template must be an object with the Jinja 'template' text and its 'tokens'")
        return cls(data["template"], data.get("tokens", {}), where)

    # ---- text --------------------------------------------------------------------------

    def render_text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.tokens)
        except jinja2.TemplateError as exc:
            raise RelayError(f"{self.where}: the model's chat template refused the conversation ({exc})") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise RelayError(f"{self.where}: the model's chat template failed ({type(exc).__name__}: {exc})") from None

    # ---- ids ---------------------------------------------------------------------------

    def render(self, tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of `messages`: the template's text tokenized at once, the mask 1 on
        the tokens of every assistant turn's supervised text (see the module's docstring)."""
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        hidden = [{**m, "content": _hide(m["content"], specials)} for m in messages]
        text = self.render_text(hidden, add_generation_prompt)
        spans = []
        for i, message in enumerate(hidden):
            if message["role"] != "assistant":
                continue
            before = self.render_text(hidden[:i], True)
            through = self.render_text(hidden[: i + 1], False)
            if not through.startswith(before) or not text.startswith(through):
                raise RelayError(f"{self.where}: turn {i}: the template does not render this conversation's turns as prefixes "
                                 "of one another, so relaygpt cannot tell the assistant's tokens from the rest")
            spans.append((_byte_len(before, specials), _byte_len(through, specials)))
        ids, mask, at = [], [], 0
        for token, size in _tokens(tokenizer, text, specials):
            ids.append(token)
            mask.append(int(any(start < at + size and at < end for start, end in spans)))
            at += size
        return ids, mask

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        """Ids that end an assistant turn: the special tokens the template writes after a reply,
        and the tokenizer's eos token."""
        if tokenizer.sha256 not in self._stops:
            found = []
            try:
                user = [{"role": "user", "content": "x"}]
                before = self.render_text(user, True)
                after = self.render_text(user + [{"role": "assistant", "content": "y"}], False)
                tail = after[len(before):] if after.startswith(before) else ""
            except RelayError:
                tail = ""
            for token in re.findall("|".join(map(re.escape, sorted(tokenizer.special_tokens, key=len, reverse=True))), tail):
                found.append(tokenizer.special_tokens[token])
            eos = self.tokens.get("eos_token")
            if eos in tokenizer.special_tokens:
                found.append(tokenizer.special_tokens[eos])
            self._stops[tokenizer.sha256] = tuple(dict.fromkeys(found))
        return self._stops[tokenizer.sha256]


def _hide(content, specials: list[str]):
    """Message text with every special token's spelling replaced by a private-use character."""
    if not isinstance(content, str) or not any(s in content for s in specials):
        return content
    for k, special in enumerate(specials):
        content = content.replace(special, chr(_HIDE + k))
    return content


def _restore(text: str, specials: list[str]) -> str:
    return re.sub(f"[{chr(_HIDE)}-{chr(_HIDE + len(specials) - 1)}]", lambda m: specials[ord(m.group()) - _HIDE], text) \
        if specials else text


def _byte_len(text: str, specials: list[str]) -> int:
    return len(_restore(text, specials).encode("utf-8"))


def _tokens(tokenizer, text: str, specials: list[str]):
    """(id, its length in bytes) of the rendered `text`: special tokens the template wrote by
    id, the text between them (hidden specials restored) with the ordinary encoder."""
    splitter = re.compile("|".join(map(re.escape, specials)))
    at = 0
    for match in [*splitter.finditer(text), None]:
        end = match.start() if match else len(text)
        if end > at:
            for token in tokenizer.encode(_restore(text[at:end], specials)):
                yield token, len(tokenizer.decode_bytes([token]))
        if match:
            yield tokenizer.special_tokens[match.group()], len(match.group().encode("utf-8"))
            at = match.end()
