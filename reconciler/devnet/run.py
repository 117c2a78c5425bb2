"""Running the dev requester: in the foreground (the CLI) or on a thread (``run --dev``)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from reconciler.devnet.server import DevConfig, DevRequester


def bind(host: str, port: int) -> socket.socket:
    """Bind first, so that port 0 works and the chosen port can be reported before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _server(app: DevRequester) -> uvicorn.Server:
    config = uvicorn.Config(
        app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=2,
        backlog=2048,
    )
    return uvicorn.Server(config)


def write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, path)  # readers see the whole number or nothing


def serve(config: DevConfig, host: str, port: int, port_file: Path | None = None,
          announce: Callable[[int], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn handles both); ``announce`` gets the bound port."""
    sock = bind(host, port)
    app = DevRequester(config)
    if port_file is not None:
        write_port_file(port_file, sock.getsockname()[1])
    if announce is not None:
        announce(sock.getsockname()[1])
    _server(app).run(sockets=[sock])


class DevRequesterThread:
    """A dev requester on a background thread with its own event loop.

    ``with DevRequesterThread(config) as dev: ... dev.url ...``
    """

    def __init__(self, config: DevConfig | None = None, host: str = "127.0.0.1") -> None:
        self.app = DevRequester(config or DevConfig())
        self._sock = bind(host, 0)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = _server(self.app)
        self._thread = threading.Thread(target=self._run, name="dev-requester", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._server.serve(sockets=[self._sock]))

    def start(self) -> DevRequesterThread:
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> DevRequesterThread:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
