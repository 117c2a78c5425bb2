"""A minimal HTTP/1.1 server on asyncio for the daemon's own small listeners (metrics, probe).

One request per connection, a body read by Content-Length (at most 1 MiB), a handler that maps
(method, path, body) to a :class:`Response`. Fixed routes on loopback need no framework, and
this shares the daemon's event loop.

The probe listener faces compute nodes, so every resource a client can hold is bounded
(docs/reliability.md, "Hostile input"): at most ``max_connections`` connections at once (more
are closed as soon as they are accepted, so idle clients cannot exhaust the daemon's file
descriptors), a request head of at most 16 KiB, ``REQUEST_TIMEOUT`` seconds for the whole
request (slow senders are cut off), the body's size, and a handler that raises answers 500
with one JSON event instead of a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

MAX_BODY = 1024 * 1024
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0  # seconds for the head and body together
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found",
            413: "Content Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str, bytes], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler, *, max_body: int = MAX_BODY,
                 max_connections: int = MAX_CONNECTIONS,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._max_body = max_body
        self._max_connections = max_connections
        self._timeout = timeout
        self.open_connections = 0
        self.refused_connections = 0
        self.port = 0

    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0 picks one); returns the address bound."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host or "127.0.0.1", int(port),
                                                  limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return f"{host or '127.0.0.1'}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self._max_connections:
            self.refused_connections += 1  # closed at once: its descriptor is freed now
            writer.transport.abort()
            return
        self.open_connections += 1
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._respond(reader)
                writer.write(_render(response))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ConnectionError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        method, path, length = _parse_head(head)
        if length > self._max_body:
            return Response(413, b"body too large\n")
        body = await reader.readexactly(length)
        try:
            return await self._handler(method, path.split("?")[0], body)
        except Exception as exc:  # a bug in a handler: one event, never a traceback
            structlog.get_logger("reconciler").error("http.failed", path=path.split("?")[0],
                                                     error=type(exc).__name__)
            return Response(500, b"internal error\n")


def _parse_head(head: bytes) -> tuple[str, str, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    if length < 0:
        raise ValueError("negative Content-Length")
    return method, path, length


def _render(response: Response) -> bytes:
    reason = _REASONS.get(response.status, "Status")
    head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + response.body
