"""Checks in front of the routes, as plain ASGI middleware: the API key, and the size of request bodies."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Collection

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import error_response


class ApiKeyGuard:
    """Answers 401 unless the request carries `Authorization: Bearer <api_key>`; `exempt` paths pass freely.

    It runs before the body is read, so a client without the key learns nothing from validation errors.
    `on_refused(path)` is called for each refusal (for metrics)."""

    def __init__(self, app: ASGIApp, *, api_key: str, exempt: Collection[str], on_refused: Callable[[str], None]):
        self.app = app
        self._key = api_key.encode("utf-8")
        self._exempt = frozenset(exempt)
        self._on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt:
            return await self.app(scope, receive, send)
        token = _bearer_token(scope["headers"])
        if token is not None and hmac.compare_digest(token, self._key):  # constant time: no timing hints about the key
            return await self.app(scope, receive, send)
        if token is None:
            detail = "an API key is required: send it as `Authorization: Bearer <key>`"
            challenge = 'Bearer realm="softdimo"'
        else:
            detail = "the API key is not valid"
            challenge = 'Bearer realm="softdimo", error="invalid_token"'
        self._on_refused(scope["path"])
        response = error_response(scope["path"], 401, detail, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), or None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
            return None
    return None


class BodyTooLarge(HTTPException):
    """A request body over the limit; raised from `receive`, so FastAPI passes it on instead of parsing."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds max_body_bytes = {limit} bytes")


class BodyLimit:
    """Refuses bodies over `max_bytes` with 413 before they are parsed.

    A declared Content-Length over the limit fails the first read; a chunked body fails as soon as the bytes
    received pass the limit, so no more than `max_bytes` plus one chunk is ever held."""

    def __init__(self, app: ASGIApp, *, max_bytes: int):
        self.app = app
        self._max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope["headers"])
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self._max_bytes:
                raise BodyTooLarge(self._max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._max_bytes:
                    raise BodyTooLarge(self._max_bytes)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge as exc:
            # The app's exception handler normally answers; this covers a read outside its reach.
            if started:
                raise
            await error_response(scope["path"], 413, exc.detail)(scope, receive, send)


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None
