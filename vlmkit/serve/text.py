"""Incremental detokenization for streaming, with stop sequences.

Tokens arrive one at a time; the text to send is the decoded answer minus what was already sent. Two
things are held back until the next token settles them: an incomplete UTF-8 character (a byte-level
token may carry half of one; the decoder shows it as U+FFFD) and a tail that could be the start of a
stop sequence (it is sent only once it cannot be).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = list(stop)
        self.tokens: list[int] = []
        self.sent = ""  # the text delivered so far
        self.stopped = False  # a stop sequence was generated: the answer ends before it

    def push(self, token: int) -> str:
        """Add a token; returns the new text that is safe to send now (maybe empty). After a stop
        sequence appears, `stopped` is True and the text before it is all that is ever sent."""
        self.tokens.append(token)
        text = self.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._advance(text[:cut])
        end = len(text.rstrip(REPLACEMENT))
        head = text[:end]
        # The longest tail of the text that a stop sequence starts with waits for the next token.
        hold = max((k for s in self.stop for k in range(1, min(len(s), end + 1)) if head.endswith(s[:k])), default=0)
        return self._advance(head[: end - hold])

    def finish(self) -> str:
        """The rest of the text once generation ends without a stop sequence (held-back tails included)."""
        return "" if self.stopped else self._advance(self.decode(self.tokens))

    def _advance(self, text: str) -> str:
        # The decoded text only grows at its end, but guard against a tokenizer that rewrites earlier text.
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new
