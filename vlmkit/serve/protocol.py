"""The Chat Completions API (OpenAI's ``POST /v1/chat/completions``): requests checked field by field, and
the response bodies (a whole completion, or `chat.completion.chunk` objects for streaming).

Every check raises an `APIError` (400) that names the field, so no malformed request reaches the model.
Fields of the API that the server cannot honour (several choices, tools, log-probabilities, penalties)
are refused with the reason rather than silently ignored; purely informational ones (``user``,
``metadata``, ``store``) are accepted and ignored.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from vlmkit.serve.errors import invalid

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
# Accepted when they ask for nothing beyond plain text generation (their value here), refused otherwise.
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "top_logprobs": None,
           "logit_bias": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
           "response_format": None, "modalities": None, "audio": None, "prediction": None,
           "reasoning_effort": None, "web_search_options": None}
KNOWN = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream",
         "stream_options"} | IGNORED | set(NEUTRAL)
MAX_STOP = 4


@dataclass
class ImageRef:
    """An image part of a message: its URL (``data:`` or ``http(s)://``) and where it was in the request."""

    url: str
    param: str


@dataclass
class ChatMessage:
    role: str  # system | user | assistant
    parts: list[str | ImageRef]  # text and images, in order
    plain: bool = False  # the content was a string (not an array of parts)

    def param(self, index: int, part: int) -> str:
        """The request field of part `part` of this message (message `index`)."""
        return f"messages[{index}].content" + ("" if self.plain else f"[{part}]")


@dataclass
class ChatRequest:
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0  # the API's default; 0 is greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False

    @property
    def images(self) -> list[ImageRef]:
        return [p for m in self.messages for p in m.parts if isinstance(p, ImageRef)]


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _int(body: dict, key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid(f"'{key}' must be an integer, got {_type_name(value)}", key, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def _number(body: dict, key: str, low: float, high: float, default: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise invalid(f"'{key}' must be a number, got {_type_name(value)}", key, "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bounds = f"{'greater than' if low_open else 'at least'} {low} and at most {high}"
        raise invalid(f"'{key}' must be {bounds}, got {value}", key)
    return float(value)


def _parts(content: Any, param: str, role: str) -> list[str | ImageRef]:
    if isinstance(content, str):
        return [content]
    if content is None:
        raise invalid(f"'{param}' is null: tool and function calls are not supported; give the message's text",
                      param, "unsupported_value")
    if not isinstance(content, list):
        raise invalid(f"'{param}' must be a string or an array of content parts, got {_type_name(content)}",
                      param, "invalid_type")
    parts: list[str | ImageRef] = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"'{where}' must be an object, got {_type_name(part)}", where, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"'{where}.text' must be a string, got {_type_name(text)}", f"{where}.text",
                              "invalid_type")
            parts.append(text)
        elif kind == "image_url":
            if role != "user":
                raise invalid(f"'{where}': only user messages may hold images ({role} messages hold text)", where)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else None
            if not isinstance(url, str):
                raise invalid(f"'{where}.image_url' must be an object with a string 'url', got {_type_name(image)}",
                              f"{where}.image_url", "invalid_type")
            detail = image.get("detail", "auto")
            if detail not in ("auto", "low", "high"):
                raise invalid(f"'{where}.image_url.detail' must be 'auto', 'low' or 'high', got {detail!r}",
                              f"{where}.image_url.detail")
            parts.append(ImageRef(url, f"{where}.image_url.url"))
        elif isinstance(kind, str):
            raise invalid(f"'{where}.type' {kind!r} is not supported: use 'text' or 'image_url'", f"{where}.type",
                          "unsupported_value")
        else:
            raise invalid(f"'{where}.type' must be 'text' or 'image_url', got {_type_name(kind)}", f"{where}.type",
                          "invalid_type")
    return parts


def _messages(value: Any) -> list[ChatMessage]:
    if value is None:
        raise invalid("'messages' is required: an array of {role, content} objects", "messages", "missing_required")
    if not isinstance(value, list):
        raise invalid(f"'messages' must be an array, got {_type_name(value)}", "messages", "invalid_type")
    if not value:
        raise invalid("'messages' must hold at least one message", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object, got {_type_name(message)}", where, "invalid_type")
        role = message.get("role")
        if role not in ROLES:
            shown = repr(role) if isinstance(role, str) else _type_name(role)
            reason = " (tool calls are not supported)" if role in ("tool", "function") else ""
            raise invalid(f"'{where}.role' {shown} is not supported{reason}: use one of "
                          f"{', '.join(sorted(ROLES))}", f"{where}.role", "invalid_value")
        if "content" not in message:
            raise invalid(f"'{where}' has no 'content'", f"{where}.content", "missing_required")
        content = message["content"]
        parts = _parts(content, f"{where}.content", ROLES[role])
        messages.append(ChatMessage(ROLES[role], parts, plain=isinstance(content, str)))
    return messages


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or an array of strings, got {_type_name(value)}", "stop",
                      "invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid(f"'stop' may hold at most {MAX_STOP} sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise invalid("'stop' sequences must not be empty", "stop")
    return stops


def parse_chat_request(body: Any, max_tokens_limit: int) -> ChatRequest:
    """Check a decoded JSON body; `max_tokens_limit`: the largest `max_tokens` any request may ask for."""
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    unknown = sorted(k for k in body if k not in KNOWN)
    if unknown:
        raise invalid(f"unrecognized request argument(s): {', '.join(map(repr, unknown))}", unknown[0],
                      "unknown_parameter")
    for key, neutral in NEUTRAL.items():
        value = body.get(key)
        if value is None or value == neutral or (key == "tools" and value == []) or (
                key == "response_format" and value == {"type": "text"}):
            continue
        if key == "n":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(f"'n' must be a positive integer, got {value!r}", "n")
            raise invalid(f"'n' = {value} is not supported: this server returns one choice per request; send "
                          "several requests instead", "n", "unsupported_value")
        raise invalid(f"'{key}' is not supported by this server (got {value!r})", key, "unsupported_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_type_name(model)}", "model", "invalid_type")
    max_tokens = _int(body, "max_tokens", 1, max_tokens_limit)
    max_completion = _int(body, "max_completion_tokens", 1, max_tokens_limit)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid("give 'max_completion_tokens' or 'max_tokens' (the older name), not both with different "
                      "values", "max_tokens")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid(f"'stream' must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed with 'stream': true", "stream_options")
        if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
            raise invalid("'stream_options' must be an object like {\"include_usage\": true}", "stream_options",
                          "invalid_type")
        include_usage = options.get("include_usage", False)
    return ChatRequest(messages=_messages(body.get("messages")), model=model,
                       max_tokens=max_completion if max_completion is not None else max_tokens,
                       temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
                       top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True),
                       stop=_stop(body.get("stop")), seed=_int(body, "seed", -(2**63), 2**64 - 1),
                       stream=stream, include_usage=include_usage)


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(completion_id: str, model: str, created: int, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk_body(completion_id: str, model: str, created: int, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`; `delta` None: the closing usage chunk (no choices), as
    ``stream_options.include_usage`` asks."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices, "system_fingerprint": None}
    if usage_ is not None or delta is None:
        body["usage"] = usage_
    return body


def now() -> int:
    return int(time.time())
