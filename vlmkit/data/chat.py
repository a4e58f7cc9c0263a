"""Chat template (ChatML), `<image>` placeholder expansion and assistant-only label masking.

Accepted conversation shapes:

* OpenAI/HF style: ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
  {"role": "assistant", "content": "..."}]`` (``content`` may also be a plain string);
* LLaVA records: ``{"image": "x.png", "conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}]}``.

Rendered as ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message. Labels are -100 everywhere
except the assistant's content and its closing ``<|im_end|>`` (so the model learns to stop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.models.language import IGNORE_INDEX

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
    """Encodes conversations for a tokenizer and a fixed number of tokens per image."""

    def __init__(self, tokenizer: Tokenizer, image_tokens: int, system_prompt: str | None = None):
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
        self.tok = tokenizer
        self.image_tokens = image_tokens
        self.system_prompt = system_prompt
        self._newline = tokenizer.encode("\n")
        self._headers: dict[str, list[int]] = {}

    def _header(self, role: str) -> list[int]:
        if role not in self._headers:
            self._headers[role] = [self.tok.im_start_id] + self.tok.encode(f"{role}\n")
        return self._headers[role]

    def _body(self, parts: list) -> tuple[list[int], int]:
        ids: list[int] = []
        images = 0
        for part in parts:
            if part is IMAGE:
                ids.extend([self.tok.image_id] * self.image_tokens)
                images += 1
            else:
                ids.extend(self.tok.encode(part))
        return ids, images

    def encode(self, conversation: Any, add_generation_prompt: bool = False) -> Encoded:
        """Token ids and labels for a whole conversation.

        With `add_generation_prompt`, the text ends with the assistant header, ready for
        `generate()` (labels are then all IGNORE_INDEX).
        """
        messages = normalize_messages(conversation, self.tok.image_token)
        if self.system_prompt and (not messages or messages[0].role != "system"):
            messages.insert(0, Message("system", [self.system_prompt]))
        ids: list[int] = []
        labels: list[int] = []
        images = 0
        for msg in messages:
            body, n = self._body(msg.parts)
            images += n
            header, end = self._header(msg.role), [self.tok.eos_id]
            ids += header + body + end + self._newline
            if msg.role == "assistant":
                if n:
                    raise ConversationError("an assistant message cannot contain an image")
                labels += [IGNORE_INDEX] * len(header) + body + end + [IGNORE_INDEX] * len(self._newline)
            else:
                labels += [IGNORE_INDEX] * (len(header) + len(body) + 1 + len(self._newline))
        if add_generation_prompt:
            header = self._header("assistant")
            ids += header
            labels += [IGNORE_INDEX] * len(header)
        return Encoded(ids, labels, images)

    def prompt(self, question: str, with_image: bool = True) -> Encoded:
        """A single-turn user prompt ending with the assistant header.

        The image comes first, then a newline, then the question: the layout of LLaVA records
        (``"<image>\nWhat ..."``), so prompts at inference match what training saw.
        """
        content = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": ("\n" if with_image else "") + question})
        return self.encode([{"role": "user", "content": content}], add_generation_prompt=True)
