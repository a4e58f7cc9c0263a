"""Chat templates, `<image>` placeholder expansion and assistant-only label masking.

Accepted conversation shapes:

* OpenAI/HF style: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
  {"role": "assistant", "content": "..."}]`` (``content`` may also be a plain string);
* LLaVA records: ``{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``.

A conversation is rendered by the tokenizer's chat template (Jinja, in a sandbox, with the settings
transformers uses, so token ids equal `apply_chat_template`'s), with each image written as the
`<image>` token; the whole text is tokenized at once and every `<image>` then expands to as many
placeholders as the connector emits tokens for that image (`VLMProcessor` knows the count). Our own
tokenizers use ChatML (``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message).

Labels are -100 everywhere except the assistant's content and the special token that closes its
turn (so the model learns to stop). Assistant turns are found by rendering prefixes of the
conversation: the text a turn adds after the generation prompt, up to its end-of-turn token.
"""

from __future__ import annotations

import bisect
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmkit.constants import IGNORE_INDEX
from vlmkit.data.tokenizer import CHATML_TEMPLATE, Tokenizer

IMAGE = object()  # marker for an image slot inside a message's content
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation record is malformed; the message says which part."""


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    parts: list  # str pieces and IMAGE markers, in order


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    num_images: int
    image_tokens: list[int] = field(default_factory=list)  # placeholders of each image, in reading order


def _split_image_tags(text: str, image_tag: str) -> list:
    parts: list = []
    for i, piece in enumerate(text.split(image_tag)):
        if i:
            parts.append(IMAGE)
        if piece:
            parts.append(piece)
    return parts


def normalize_messages(conversation: Any, image_tag: str = "<image>") -> list[Message]:
    """Turn either accepted shape (see module doc) into a list of `Message`."""
    if isinstance(conversation, dict):
        if "conversations" not in conversation:
            raise ConversationError("record has no 'conversations' list")
        turns = conversation["conversations"]
        if not isinstance(turns, list):
            raise ConversationError("'conversations' must be a list")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise ConversationError(f"conversations[{i}] needs 'from' and 'value'")
            messages.append(Message(_role(turn["from"], i), _split_image_tags(str(turn["value"]), image_tag)))
        return messages
    if not isinstance(conversation, list):
        raise ConversationError(f"expected a list of messages or a LLaVA record, got {type(conversation).__name__}")
    messages = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ConversationError(f"message {i} needs 'role' and 'content'")
        messages.append(Message(_role(msg["role"], i), _content_parts(msg["content"], i, image_tag)))
    return messages


def _role(name: Any, index: int) -> str:
    role = ROLE_ALIASES.get(str(name).lower())
    if role is None:
        raise ConversationError(f"message {index}: unknown role {name!r}; expected one of {sorted(ROLE_ALIASES)}")
    return role


def _content_parts(content: Any, index: int, image_tag: str) -> list:
    if isinstance(content, str):
        return _split_image_tags(content, image_tag)
    if not isinstance(content, list):
        raise ConversationError(f"message {index}: content must be a string or a list of parts")
    parts: list = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append(IMAGE)
        elif kind == "text":
            parts.extend(_split_image_tags(str(part.get("text", "")), image_tag))
        else:
            raise ConversationError(f"message {index}: content part {part!r} is neither image nor text")
    return parts


class ChatFormat:
    """Encodes conversations with a tokenizer's chat template; each `<image>` becomes placeholders.

    `image_tokens` is the default count per image (`encode` may give each image its own), or None
    for a text-only model (an image in a conversation is then an error).
    """

    def __init__(self, tokenizer: Tokenizer, image_tokens: int | None = None, system_prompt: str | None = None):
        if image_tokens is not None and image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
        if tokenizer.chat_template == CHATML_TEMPLATE and tokenizer.im_start_id is None:
            raise ValueError("the tokenizer has no chat template (chat_template in tokenizer_config.json, or "
                             "chat_template.jinja) and no ChatML tokens to fall back on: add a chat template")
        self.tok = tokenizer
        self.image_tokens = image_tokens
        self.system_prompt = system_prompt
        self.template = compile_template(tokenizer.chat_template)
        # Tokens that can close a turn; the eos token counts even where a converted tokenizer lost its flag.
        self._special_ids = tokenizer.special_ids | {tokenizer.eos_id}
        self._template_vars = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token,
                               "pad_token": tokenizer.pad_token,
                               "unk_token": tokenizer.extra_config.get("unk_token") or ""}
        self.end_of_turn_id = self._find_end_of_turn()

    def __getstate__(self) -> dict[str, Any]:
        # A compiled template does not pickle (DataLoader workers started by "spawn" or "forkserver"
        # receive their dataset pickled): it is compiled again from the tokenizer's source.
        return {key: value for key, value in self.__dict__.items() if key != "template"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.template = compile_template(self.tok.chat_template)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The template's text for `[{"role": ..., "content": str}, ...]`."""
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, documents=None, **self._template_vars)
        except jinja2.TemplateError as err:
            raise ConversationError(f"the chat template rejected the conversation: {err}") from None

    def encode(self, conversation: Any, add_generation_prompt: bool = False,
               image_tokens: list[int] | None = None) -> Encoded:
        """Token ids and labels for a whole conversation.

        With `add_generation_prompt`, the text ends with the assistant header, ready for
        `generate()` (labels are then all IGNORE_INDEX). `image_tokens` gives each image's
        placeholder count, in reading order (default: `self.image_tokens` for every image).
        """
        messages = normalize_messages(conversation, self.tok.image_token)
        if self.system_prompt and (not messages or messages[0].role != "system"):
            messages.insert(0, Message("system", [self.system_prompt]))
        plain = [{"role": m.role, "content": self._text(m)} for m in messages]
        text = self.render(plain, add_generation_prompt)
        encoding = self.tok.backend.encode(text, add_special_tokens=False)
        ids, labels = encoding.ids, [IGNORE_INDEX] * len(encoding.ids)
        starts = [first for first, _ in encoding.offsets]
        for i, message in enumerate(messages):
            if message.role != "assistant":
                continue
            span = self._assistant_span(plain, i, text, whole=i == len(plain) - 1 and not add_generation_prompt)
            inside = range(bisect.bisect_left(starts, span[0]), bisect.bisect_left(starts, span[1]))
            # The turn ends at its last special token (e.g. <|im_end|>); what follows is separator text.
            closing = [j for j in inside if ids[j] in self._special_ids]
            for j in range(inside.start, closing[-1] + 1 if closing else inside.stop):
                labels[j] = ids[j]
        return self._expand_images(ids, labels, image_tokens)

    def prompt(self, question: str, with_image: bool = True, image_tokens: int | Sequence[int] | None = None,
               *, num_images: int | None = None) -> Encoded:
        """A single-turn user prompt ending with the assistant header.

        `num_images` images (default: one with `with_image`, else none). Without `<image>` tags in
        the question, each image comes first on a line of its own, then the question: the layout of
        LLaVA records (``"<image>\\nWhat ..."``, ``"<image>\\n<image>\\nWhich ..."``), so prompts at
        inference match what training saw. Tags typed in the question place the images there instead
        (in order); their number must equal `num_images`. `image_tokens`: one placeholder count for
        every image, or one per image in order (default `self.image_tokens`).
        """
        n = int(with_image) if num_images is None else num_images
        if n < 0:
            raise ValueError(f"num_images must be >= 0, got {n}")
        counts = [image_tokens] * n if isinstance(image_tokens, int) else image_tokens
        if counts is not None and len(counts) != n:
            raise ValueError(f"{len(counts)} image token count(s) for {n} image(s)")
        tags = question.count(self.tok.image_token)
        if tags and tags != n:
            raise ConversationError(f"the question has {tags} {self.tok.image_token} tag(s) but {n} image(s) were "
                                    f"given; type one tag per image, or none to put every image before the question")
        text = question if tags else "".join(f"{self.tok.image_token}\n" for _ in range(n)) + question
        return self.encode([{"role": "user", "content": text}], add_generation_prompt=True,
                           image_tokens=None if counts is None else list(counts))

    def _text(self, message: Message) -> str:
        images = sum(part is IMAGE for part in message.parts)
        if images and message.role == "assistant":
            raise ConversationError("an assistant message cannot contain an image")
        if images and self.image_tokens is None:
            raise ConversationError("this model has no vision tower: a conversation with an image cannot be encoded")
        if images and self.tok.image_id is None:
            raise ConversationError(f"the tokenizer has no {self.tok.image_token!r} token (see add_image_token)")
        return "".join(self.tok.image_token if part is IMAGE else part for part in message.parts)

    def _assistant_span(self, messages: list[dict[str, str]], index: int, text: str,
                        whole: bool = False) -> tuple[int, int]:
        """Characters of `text` that assistant message `index` adds after its generation prompt.

        `whole`: `text` is the rendering of exactly `messages[:index + 1]` (saves one rendering).
        """
        before = self.render(messages[:index], add_generation_prompt=True)
        through = text if whole else self.render(messages[: index + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise ConversationError(
                f"the chat template does not render message {index} (assistant) as an extension of the messages "
                "before it, so its answer cannot be located for the loss")
        return len(before), len(through)

    def _expand_images(self, ids: list[int], labels: list[int], image_tokens: list[int] | None) -> Encoded:
        image_id = self.tok.image_id
        positions = [] if image_id is None else [j for j, token in enumerate(ids) if token == image_id]
        counts = [self.image_tokens] * len(positions) if image_tokens is None else list(image_tokens)
        if len(counts) != len(positions):
            raise ConversationError(f"the conversation has {len(positions)} image(s) but {len(counts)} image token "
                                    "count(s) were given")
        if any(n < 1 for n in counts):
            raise ValueError(f"image token counts must be >= 1, got {counts}")
        if not positions:
            return Encoded(ids, labels, 0)
        out_ids: list[int] = []
        out_labels: list[int] = []
        done = 0
        for pos, n in zip(positions, counts):
            out_ids += ids[done:pos] + [image_id] * n
            out_labels += labels[done:pos] + [IGNORE_INDEX] * n
            done = pos + 1
        return Encoded(out_ids + ids[done:], out_labels + labels[done:], len(positions), counts)

    def _find_end_of_turn(self) -> int:
        """The special token that closes an assistant turn (generation stops there); else the eos token."""
        try:
            labels = self.encode([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]).labels
        except ConversationError:
            return self.tok.eos_id
        supervised = [x for x in labels if x != IGNORE_INDEX]
        return supervised[-1] if supervised and supervised[-1] in self._special_ids else self.tok.eos_id


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for transformers; rendered as is here."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.cache
def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers does: sandboxed, trim_blocks + lstrip_blocks, the
    `raise_exception` / `strftime_now` helpers and a `tojson` that does not escape HTML."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"chat template: syntax error on line {err.lineno}: {err.message}") from None
