"""The clients' HTTP transport: httpx's, with the idle-connection check read from the kept
socket (reconciler/backends/transport.py). Real sockets over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
import threading
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler.backends.legacy import ApiClient
from reconciler.backends.orchestrator import OrchestratorClient
from reconciler.backends.signing import load_signer
from reconciler.backends.transport import Readable, cheap_idle_check, transport

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


def test_one_stream_checked_again_and_again_as_httpcore_checks_it() -> None:
    """The kept poll object answers as a fresh check would, at every step of a socket's life."""
    a, b = socket.socketpair()
    check = Readable(a)
    try:
        assert not check() and not check()  # idle, open: reusable
        b.sendall(b"x")
        assert check()
        a.recv(1)
        assert not check()
        b.close()
        assert check()  # closed by the peer
    finally:
        a.close()
    assert check()  # closed here


def test_readable_as_httpcore_reads_it() -> None:
    a, b = socket.socketpair()
    try:
        assert not Readable(a)()  # idle, open: reusable
        b.sendall(b"x")
        assert Readable(a)()  # data nobody asked for: the connection is not reusable
        a.recv(1)
        b.close()
        assert Readable(a)()  # closed by the peer: EOF is readable
    finally:
        a.close()
    assert Readable(a)()  # closed here: fileno() is -1
    assert Readable(None)()


@contextlib.contextmanager
def _listening(serve: Callable[[int, socket.socket, threading.Event], None]
               ) -> Iterator[str]:
    """A loopback listener handing each connection, with its number (1, 2, ...) and the
    stop event, to ``serve`` on a thread of its own; yields ``host:port``."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        number = 0
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            number += 1
            threading.Thread(target=serve, args=(number, conn, stop), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


class ClosesWhenIdle(typing.NamedTuple):
    url: str
    accepted: list[int]
    #: Set once the server has closed the first connection.
    closed: threading.Event

    async def wait_closed(self) -> None:
        """Until the first connection is closed: an event, not a sleep that a loaded
        machine could outlast."""
        assert await asyncio.to_thread(self.closed.wait, 30)


@pytest.fixture
def closes_when_idle() -> Iterator[ClosesWhenIdle]:
    """An HTTP/1.1 server that answers one request per connection with keep-alive headers,
    then closes the connection: what a server's idle timeout does."""
    accepted: list[int] = []
    closed = threading.Event()

    def serve(number: int, conn: socket.socket, stop: threading.Event) -> None:
        accepted.append(number)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                         b"Content-Type: text/plain\r\n\r\nok")
        closed.set()  # the client still holds it as idle

    with _listening(serve) as address:
        yield ClosesWhenIdle(f"http://{address}", accepted, closed)


def test_a_connection_the_server_closed_is_never_reused(
        closes_when_idle: ClosesWhenIdle) -> None:
    """Were the idle check wrong (never readable), the second request would be written to
    the dead connection and fail with "Server disconnected"."""
    server = closes_when_idle

    async def twice() -> list[int]:
        async with httpx.AsyncClient(transport=transport(LIMITS)) as http:
            first = await http.get(server.url)
            await server.wait_closed()
            second = await http.get(server.url)
            return [first.status_code, second.status_code]

    assert asyncio.run(twice()) == [200, 200]
    assert len(server.accepted) == 2  # a fresh connection for the second request


@contextlib.contextmanager
def _recording(tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """An HTTP/1.1 server that answers every request 200, keeping connections open, and
    records each request line with the number of the connection it came on."""
    lines: list[tuple[int, bytes]] = []

    def serve(number: int, conn: socket.socket, stop: threading.Event) -> None:
        with contextlib.suppress(OSError), conn:
            if tls is not None:  # the TLS socket detaches the plain one and is closed here
                with tls.wrap_socket(conn, server_side=True) as secure:
                    talk(number, secure, stop)
            else:
                talk(number, conn, stop)

    def talk(number: int, conn: socket.socket, stop: threading.Event) -> None:
        data = b""
        while not stop.is_set():
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            lines.append((number, head.split(b"\r\n")[0]))
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    with _listening(serve) as address:
        yield address, lines


@pytest.fixture
def recording_server() -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    with _recording() as (address, lines):
        yield f"http://{address}", lines


@pytest.fixture
def tls_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               ) -> Iterator[tuple[str, list[tuple[int, bytes]]]]:
    """The same over TLS, its self-signed certificate for 127.0.0.1 the one the clients
    trust (httpx reads SSL_CERT_FILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    with _recording(context) as (address, lines):
        yield f"https://{address}", lines


def test_tls_through_the_wrapped_stream_reuses_its_connection(
        tls_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    """start_tls is wrapped too: the TLS stream's extra info (ssl_object, addresses) is
    httpcore's, and an open idle connection is reused, not taken for one the server closed
    (a check that always said "readable" would pass the closing test above, and cost every
    request a new connection)."""
    url, lines = tls_server
    client = OrchestratorClient(url)

    async def thrice() -> list[Any]:
        try:
            seen: list[Any] = []
            for _ in range(3):
                reply = await client._http.get("/probe")
                stream = reply.extensions["network_stream"]
                seen.append((reply.status_code, type(stream).__name__,
                             stream.get_extra_info("ssl_object").version() is not None,
                             stream.get_extra_info("server_addr")[0]))
            return seen
        finally:
            await client.aclose()

    assert asyncio.run(thrice()) == [(200, "_Stream", True, "127.0.0.1")] * 3
    assert lines == [(1, b"GET /probe HTTP/1.1")] * 3


@pytest.mark.parametrize("kind", ["orchestrator", "legacy"])
def test_a_proxy_set_in_the_environment_is_still_used(
        kind: str, recording_server: tuple[str, list[tuple[int, bytes]]], rsa_key: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx ignores HTTP_PROXY and its kin when a client is given a transport: the
    cheaper idle check must not cost a deployment behind a proxy its proxy."""
    proxy, lines = recording_server
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY",
                 "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy)
    endpoint = "http://bacalhau.invalid:1234"
    client = (OrchestratorClient(endpoint) if kind == "orchestrator"
              else ApiClient(endpoint, load_signer(rsa_key)))

    async def once() -> int:
        try:
            return (await client._http.get("/probe")).status_code
        finally:
            await client.aclose()

    assert asyncio.run(once()) == 200
    assert lines == [(1, b"GET http://bacalhau.invalid:1234/probe HTTP/1.1")]
    assert cheap_idle_check(client._http._transport)  # for the direct connections


def test_a_check_that_never_says_readable_fails_the_closing_test(
        closes_when_idle: ClosesWhenIdle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The closing test above can fail: with the check broken (never readable) the second
    request goes to the connection the server closed, and httpx does not resend it."""
    server = closes_when_idle
    monkeypatch.setattr(Readable, "__call__", lambda self: False)

    async def twice() -> None:
        async with httpx.AsyncClient(transport=transport(LIMITS)) as http:
            assert (await http.get(server.url)).status_code == 200
            await server.wait_closed()
            await http.get(server.url)

    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        asyncio.run(twice())


class _Renumbered:
    """A socket-like object whose number changes: the check follows it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def test_the_kept_poll_object_follows_a_changed_fileno() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        sock = _Renumbered(a)
        check = Readable(sock)  # type: ignore[arg-type]
        b.sendall(b"x")
        assert check()
        sock.sock = c  # idle: a check still polling a's number would say readable
        assert not check()
        d.sendall(b"y")
        assert check()
    finally:
        for s in (a, b, c, d):
            s.close()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_kept_poll_objects_hold_no_file_descriptor() -> None:
    """A poll object is a list of numbers handed to poll(2) at each call (not an epoll
    descriptor): a thousand kept checks open nothing. The count is compared with a margin:
    other tests' objects in this worker process may close (or open) a few meanwhile, where
    a descriptor per poll object would add a thousand."""
    a, b = socket.socketpair()
    try:
        before = len(list(Path("/proc/self/fd").iterdir()))
        checks = [Readable(a) for _ in range(1000)]
        assert not any(check() for check in checks)
        assert len(list(Path("/proc/self/fd").iterdir())) < before + 50
    finally:
        a.close()
        b.close()


def test_the_kept_check_answers_as_httpcores_own_at_every_step() -> None:
    from httpcore._utils import is_socket_readable

    a, b = socket.socketpair()
    check = Readable(a)
    seen: list[tuple[bool, bool]] = []

    def both() -> None:
        seen.append((check(), is_socket_readable(a)))

    try:
        both()
        b.sendall(b"x")
        both()
        a.recv(1)
        both()
        b.close()
        both()
    finally:
        a.close()
    both()
    assert seen == [(False, False), (True, True), (False, False), (True, True), (True, True)]
    assert Readable(None)() is is_socket_readable(None) is True
