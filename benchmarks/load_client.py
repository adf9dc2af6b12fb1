"""A lean HTTP/1.1 client for load generation: one keep-alive connection per worker, JSON POSTs.

On a small machine the load generator shares the cores with the server it measures, so every
millisecond of client CPU per request is taken from the server. A general client (httpx) spends
about 5 ms of CPU per request; this one writes a fixed request and reads one response, about a tenth
of that. It speaks only what the benchmarks need: no TLS, no redirects, no pooling."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit


class LoadClientError(Exception):
    """The request got no complete answer: connection refused or lost, or a malformed response."""


class Connection:
    """One keep-alive connection to `url`'s host; reconnects on the next request after any failure."""

    def __init__(self, url: str, headers: dict[str, str] | None = None):
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"{url}: the load client speaks plain http://host:port only")
        self.host, self.port = parts.hostname, parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())  # e.g. Authorization
        self.retry_after: float | None = None  # the last response's Retry-After, in seconds

    async def post_json(self, path: str, body: dict, *, timeout_s: float) -> tuple[int, bytes]:
        """(status, body bytes) of one POST; raises LoadClientError or TimeoutError without an answer."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{self._extra}\r\n"
        ).encode()
        try:
            async with asyncio.timeout(timeout_s):
                if self._reader is not None and self._reader.at_eof():  # the server closed it while it was idle
                    self.close()
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                self._writer.write(head + payload)
                return await self._read_response()
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.close()
            raise LoadClientError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:  # a timeout or a cancellation leaves the connection mid-response
            self.close()
            raise

    async def _read_response(self) -> tuple[int, bytes]:
        reader = self._reader
        status_line = await reader.readline()
        if not status_line.startswith(b"HTTP/1.1 "):
            raise ValueError(f"not an HTTP/1.1 response: {status_line[:40]!r}")
        status = int(status_line.split()[1])
        length, chunked, keep_alive = None, False, True
        self.retry_after = None
        while (line := await reader.readline()) != b"\r\n":
            if not line:
                raise ValueError("the connection closed in the middle of the headers")
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                chunked = "chunked" in value
            elif name == "connection":
                keep_alive = value != "close"
            elif name == "retry-after" and value.replace(".", "", 1).isdigit():
                self.retry_after = float(value)
        if chunked:
            body = await self._read_chunks()
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body, keep_alive = await reader.read(), False
        if not keep_alive:
            self.close()
        return status, body

    async def _read_chunks(self) -> bytes:
        parts = []
        while size := int((await self._reader.readline()).split(b";")[0], 16):
            parts.append(await self._reader.readexactly(size))
            await self._reader.readline()
        await self._reader.readline()  # the blank line after the last chunk
        return b"".join(parts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
