"""A minimal HTTP/1.1 server on asyncio for the daemon's own small listeners (metrics, probe).

One request per connection, a body read by Content-Length (at most 1 MiB), a handler that maps
(method, path, body) to a :class:`Response`. Fixed routes on loopback need no framework, and
this shares the daemon's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

MAX_BODY = 1024 * 1024
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found",
            413: "Content Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[str, str, bytes], Awaitable[Response]]


class HttpServer:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0 picks one); returns the address bound."""
        host, _, port = listen.rpartition(":")
        self._server = await asyncio.start_server(self._serve, host or "127.0.0.1", int(port))
        self.port = self._server.sockets[0].getsockname()[1]
        return f"{host or '127.0.0.1'}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            method, path, length = _parse_head(head)
            if length > MAX_BODY:
                response = Response(413, b"body too large\n")
            else:
                body = await asyncio.wait_for(reader.readexactly(length), timeout=5)
                response = await self._handler(method, path.split("?")[0], body)
            writer.write(_render(response))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, ConnectionError):
            pass
        finally:
            writer.close()


def _parse_head(head: bytes) -> tuple[str, str, int]:
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, path, length


def _render(response: Response) -> bytes:
    reason = _REASONS.get(response.status, "Status")
    head = (f"HTTP/1.1 {response.status} {reason}\r\nContent-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\nConnection: close\r\n\r\n")
    return head.encode() + response.body
