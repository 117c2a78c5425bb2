"""The HTTP transport both clients send through: httpx's own, with a cheaper idle check.

Before it hands a request a pooled connection, httpcore asks every idle connection whether
the server closed it (``get_extra_info("is_readable")``): about 32 checks per request at 8
connections. Through anyio each check rebuilds the socket's attribute table, closures and a
``getpeername`` system call included, to reach the socket it then polls: 15-25% of the CPU a
PUT costs the client on loopback (docs/performance.md, "The HTTP transport"). Here each
stream keeps its socket and polls it directly, as httpcore itself does; everything else
(connecting, TLS, reading, writing, timeouts, errors) is httpcore's and anyio's, untouched.

The stream is inserted as httpcore's network backend of the transport's pool. httpx does not
take a network backend as an argument, so the pool's is wrapped in place; should a later
httpx or httpcore not have these attributes, the stock transport is used unchanged
(tests/test_transport.py checks that the wrapping takes with the versions installed).

A client is made with no transport and then given the cheap check (:func:`cheapen`): an
``httpx.AsyncClient`` given a transport ignores the proxies set in the environment
(``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``). Made by the client, its own
transport has httpx's defaults and the proxy transports it mounts stay httpx's, untouched.
"""

# ruff: noqa: ASYNC109 (the timeout parameters are httpcore's network stream interface)

from __future__ import annotations

import select
import socket
import typing

import httpcore
import httpx


def transport(limits: httpx.Limits) -> httpx.AsyncBaseTransport:
    """httpx's transport with ``limits``, its idle check made cheap where it can be."""
    stock = httpx.AsyncHTTPTransport(limits=limits)
    _wrap(stock)
    return stock


def cheapen(http: httpx.AsyncClient) -> httpx.AsyncClient:
    """``http``, its own transport's idle check made cheap where it can be; proxies from the
    environment kept (see the module's docstring: not ``transport=`` for a client)."""
    _wrap(getattr(http, "_transport", None))
    return http


def _wrap(transport: object) -> None:
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(pool, httpcore.AsyncConnectionPool) and isinstance(
            backend, httpcore.AsyncNetworkBackend) and not isinstance(backend, _Backend):
        pool._network_backend = _Backend(backend)  # see the module's docstring


def cheap_idle_check(transport: httpx.AsyncBaseTransport) -> bool:
    """Whether ``transport``'s pool answers the idle check from the kept socket."""
    pool = getattr(transport, "_pool", None)
    return isinstance(getattr(pool, "_network_backend", None), _Backend)


class _Backend(httpcore.AsyncNetworkBackend):
    """httpcore's backend, its streams wrapped in :class:`_Stream`."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address,
                                                     socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _Stream(httpcore.AsyncNetworkStream):
    """A stream that answers ``is_readable`` from the socket it was opened on."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._readable = Readable(inner.get_extra_info("socket"))

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: typing.Any, server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            return self._readable()
        return self._inner.get_extra_info(info)


class Readable:
    """httpcore's check (``httpcore._utils.is_socket_readable``) of one socket: an idle socket
    with data to read, or none left at all, is one the server closed; the connection is then
    dropped. The poll object is made once per socket, not at each of the ~32 checks a request
    makes (docs/performance.md, "The HTTP transport"). A socket that is closed has the fileno
    -1 (its number cannot be reused while this object holds it open)."""

    __slots__ = ("_fd", "_poller", "_socket")

    def __init__(self, sock: socket.socket | None) -> None:
        self._socket = sock
        self._fd = -1
        self._poller: typing.Any = None

    def __call__(self) -> bool:
        fd = -1 if self._socket is None else self._socket.fileno()
        if fd < 0:
            return True
        if not hasattr(select, "poll"):  # pragma: no cover (not on Linux)
            return bool(select.select([fd], [], [], 0)[0])
        if self._poller is None or fd != self._fd:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN)
            self._fd = fd
        return bool(self._poller.poll(0))
