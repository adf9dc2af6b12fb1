"""The benchmarks' lean HTTP client: keep-alive, chunked bodies, servers that close, and failures."""

import asyncio
import socket

import pytest

from benchmarks.load_client import Connection, LoadClientError


def _serve(responses: list[bytes]):
    """A raw HTTP server on a free loopback port answering each request with the next canned response."""
    replies = iter(responses)
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            reply = next(replies)
            writer.write(reply)
            await writer.drain()
            if b"Connection: close" in reply:
                writer.close()
                return

    return handle, connections


def test_keep_alive_chunked_and_closing_responses():
    responses = [
        b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}',
        b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ]

    async def main():
        handle, connections = _serve(responses)
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Connection(f"http://127.0.0.1:{port}")
        got = [await client.post_json("/generate", {"prompt": "a red circle"}, timeout_s=5) for _ in responses]
        client.close()
        server.close()
        return got, len(connections)

    got, connections = asyncio.run(main())
    assert got == [(200, b'{"a":1}'), (429, b"abcde"), (503, b"no"), (200, b"ok")]
    assert connections == 2  # one reused for three requests, a new one after the server closed


def test_a_connection_the_server_closed_while_idle_is_opened_again():
    """As uvicorn does after its keep-alive timeout: the answer said nothing of closing, the server closes later."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    connections = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = Connection(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        first = await client.post_json("/generate", {}, timeout_s=5)
        await asyncio.sleep(0.2)  # idle: the server's close arrives
        second = await client.post_json("/generate", {}, timeout_s=5)
        client.close()
        server.close()
        return first, second

    assert asyncio.run(main()) == ((200, b"ok"), (200, b"ok"))
    assert len(connections) == 2


def test_no_server_is_a_load_client_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LoadClientError):
        asyncio.run(Connection(f"http://127.0.0.1:{port}").post_json("/generate", {}, timeout_s=5))


def test_only_plain_http_urls():
    with pytest.raises(ValueError):
        Connection("https://example.com")


def test_extra_headers_are_sent_and_retry_after_is_read():
    heads = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        heads.append(head)
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Connection(f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k"})
        answer = await client.post_json("/refine", {"n": 1}, timeout_s=5)
        retry_after = client.retry_after
        client.close()
        server.close()
        return answer, retry_after

    (status, body), retry_after = asyncio.run(main())
    assert (status, body, retry_after) == (429, b"no", 2.0)
    assert b"\r\nAuthorization: Bearer k\r\n" in heads[0]
