"""The clients' HTTP transport: httpx's, with the idle-connection check read from the kept
socket (reconciler/backends/transport.py). Real sockets over loopback."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler.backends.legacy import ApiClient
from reconciler.backends.orchestrator import OrchestratorClient
from reconciler.backends.signing import load_signer
from reconciler.backends.transport import cheap_idle_check, readable, transport

LIMITS = httpx.Limits(max_connections=4, max_keepalive_connections=4)


def test_the_installed_httpx_takes_the_cheaper_idle_check(rsa_key: Path) -> None:
    assert cheap_idle_check(transport(LIMITS))
    orchestrator = OrchestratorClient("http://127.0.0.1:9")
    legacy = ApiClient("http://127.0.0.1:9", load_signer(rsa_key))
    assert cheap_idle_check(orchestrator._http._transport)
    assert cheap_idle_check(legacy._http._transport)
    # a transport given (tests, a proxy) is used as it is
    mock = httpx.MockTransport(lambda request: httpx.Response(200))
    assert OrchestratorClient("http://127.0.0.1:9", transport=mock)._http._transport is mock
    asyncio.run(orchestrator.aclose())
    asyncio.run(legacy.aclose())


def test_readable_as_httpcore_reads_it() -> None:
    a, b = socket.socketpair()
    try:
        assert not readable(a)  # idle, open: reusable
        b.sendall(b"x")
        assert readable(a)  # data nobody asked for: the connection is not reusable
        a.recv(1)
        b.close()
        assert readable(a)  # closed by the peer: EOF is readable
    finally:
        a.close()
    assert readable(a)  # closed here: fileno() is -1
    assert readable(None)


@pytest.fixture
def closes_when_idle() -> Iterator[tuple[str, list[int]]]:
    """An HTTP/1.1 server that answers one request per connection with keep-alive headers,
    then closes the connection a moment later: what a server's idle timeout does."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Content-Type: text/plain\r\n\r\nok")
            stop.wait(0.1)  # then close: the client still holds it as idle

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            accepted.append(conn.fileno())
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_a_connection_the_server_closed_is_never_reused(
        closes_when_idle: tuple[str, list[int]]) -> None:
    """Were the idle check wrong (never readable), the second request would be written to
    the dead connection and fail with "Server disconnected"."""
    url, accepted = closes_when_idle

    async def twice() -> list[int]:
        async with httpx.AsyncClient(transport=transport(LIMITS)) as http:
            first = await http.get(url)
            await asyncio.sleep(0.4)  # the server has closed its end by now
            second = await http.get(url)
            return [first.status_code, second.status_code]

    assert asyncio.run(twice()) == [200, 200]
    assert len(accepted) == 2  # a fresh connection for the second request
