"""A minimal HTTP/1.1 server on asyncio for the daemon's own small listeners (metrics, probe).

One request per connection, a body read by Content-Length (at most 1 MiB), a handler that maps
(method, path, body) to a :class:`Response`. Fixed routes on loopback need no framework, and
this shares the daemon's event loop.

The probe listener faces compute nodes, so every resource a client can hold is bounded
(docs/reliability.md, "Hostile input"): at most ``max_connections`` connections at once (the
listener accepts the next one only when a slot is free; the rest wait in the kernel's backlog
and cost the daemon no file descriptor, so idle clients cannot exhaust them), a request head
of at most 16 KiB, ``REQUEST_TIMEOUT`` seconds for the whole request (slow senders are cut
off), the body's size, and a handler that raises answers 500 with one JSON event instead of a
traceback. An accept that fails (out of descriptors after all) is one event and a short pause,
never a stream of tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

MAX_BODY = 1024 * 1024
MAX_HEAD = 16 * 1024
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0  # seconds for the head and body together
BACKLOG = 128
ACCEPT_RETRY = 0.5
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
        self._max_body = max_body
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout = timeout
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self.open_connections = 0
        self.port = 0

    async def start(self, listen: str) -> str:
        """Listen on ``host:port`` (port 0 picks one); returns the address bound."""
        host, _, port = listen.rpartition(":")
        loop = asyncio.get_running_loop()
        family, kind, proto, _, address = (await loop.getaddrinfo(
            host or "127.0.0.1", int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        self.port = sock.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept_loop(sock))
        return f"{host or '127.0.0.1'}:{self.port}"

    async def stop(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._socket is not None:
            self._socket.close()
        for task in list(self._serving):
            task.cancel()
        if self._serving:
            await asyncio.gather(*self._serving, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # no free slot: leave the next client in the backlog
            try:
                conn, _ = await loop.sock_accept(sock)
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...: pause rather than spin
                self._slots.release()
                structlog.get_logger("reconciler").error(
                    "http.accept_failed", error=exc.strerror or type(exc).__name__,
                    retry_in_s=ACCEPT_RETRY)
                await asyncio.sleep(ACCEPT_RETRY)
                continue
            task = asyncio.create_task(self._serve(conn))
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        self.open_connections += 1
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_HEAD)
                response = await self._respond(reader)
                writer.write(_render(response))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError):
            pass
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()
            self.open_connections -= 1
            self._slots.release()

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
