"""Error bodies in each ecosystem's shape: OpenAI error objects under /v1/, `{"detail": ...}` on native paths."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import JSONResponse

OPENAI_PREFIX = "/v1/"

# OpenAI's error `type` and `code` for the statuses this server answers with.
_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "model_not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("invalid_request_error", "conflict"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_value"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "timeout"),
}


class ErrorJSON(JSONResponse):
    """Error bodies echo client input, which may hold lone surrogates or non-finite numbers: escape them, never fail."""

    def render(self, content: Any) -> bytes:
        return json.dumps(_finite(content), ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """An OpenAI error object: what the OpenAI SDKs read a failed request's message from; `code` overrides the
    status's usual code."""
    kind, usual = _OPENAI_KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None))
    code = usual if code is None else code
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    path: str,
    status: int,
    detail: Any,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> ErrorJSON:
    """The error answer for `path`: an OpenAI error object under /v1/, else {"detail": detail} (a message or
    FastAPI's list of validation issues)."""
    if not path.startswith(OPENAI_PREFIX):
        return ErrorJSON({"detail": detail}, status_code=status, headers=headers)
    if isinstance(detail, list):  # validation issues: the first names the field
        first = detail[0] if detail else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = "; ".join(
            f"{'.'.join(str(p) for p in i.get('loc', ()) if p != 'body') or 'body'}: {i.get('msg')}" for i in detail
        )
        return ErrorJSON(openai_error(status, message, param), status_code=status, headers=headers)
    return ErrorJSON(openai_error(status, str(detail), code=code), status_code=status, headers=headers)
