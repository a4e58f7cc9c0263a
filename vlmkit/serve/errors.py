"""Errors as the OpenAI API returns them: an HTTP status and ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

# OpenAI's error types by status.
_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A request the server answers with an error: `status`, a message saying what to change, the
    offending field (`param`, e.g. ``messages[0].content[1].image_url.url``) and a machine-readable `code`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 for a field with a wrong type or value."""
    return APIError(400, message, param=param, code=code)
