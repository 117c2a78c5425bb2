"""Scenario 8: a connection flood on the probe listener (issue 11, item 5). A real daemon held
to systemd's default 1,024 open files gets 1,200 (2,000 full) idle connections, re-opened as
fast as it closes them, while manifests keep arriving: it must stay ready, act on every
manifest, and write nothing but JSON events to stderr. Before the listener capped its
connections it ran out of descriptors: "Too many open files", a not-ready source, and
thousands of bare traceback lines."""

from __future__ import annotations

import errno
import os
import resource
import socket
import time
from pathlib import Path

from tests.conftest import DevProcess
from tests.daemon_proc import Daemons, daemon_args
from tests.reliability.common import figures, manifest, size
from tests.test_daemon import by_name, wait_until


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def idle_connection(port: int) -> socket.socket:
    conn = socket.socket()
    conn.setblocking(False)
    conn.connect_ex(("127.0.0.1", port))  # in progress; never sends a byte
    return conn


def closed_by_peer(conn: socket.socket) -> bool:
    try:
        return conn.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno != errno.ENOTCONN


def test_connection_flood_on_the_probe_listener(tmp_path: Path, dev: DevProcess,
                                                rsa_key: Path) -> None:
    count, seconds = size(1200, 2000), size(6, 20)
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "first.yaml").write_text(manifest("first", "img:first"))
    port = free_port()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 512)), hard))
    daemons = Daemons()
    flood: list[socket.socket] = []
    try:
        daemon = daemons.start(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key,
                                           "--probe-listen", f"127.0.0.1:{port}"))
        resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (1024, 1024))
        flood = [idle_connection(port) for _ in range(count)]
        reopened, most_fds, names = 0, 0, ["first"]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i, conn in enumerate(flood):
                if closed_by_peer(conn):
                    conn.close()
                    flood[i] = idle_connection(port)
                    reopened += 1
            names.append(f"m{len(names)}")
            (root / f"{names[-1]}.yaml").write_text(manifest(names[-1], f"img:{names[-1]}"))
            most_fds = max(most_fds, len(os.listdir(f"/proc/{daemon.process.pid}/fd")))
            time.sleep(0.5)
        wait_until(lambda: set(by_name(dev)) >= set(names), timeout=30)
        passes = daemon.named("pass.completed")
    finally:
        for conn in flood:
            conn.close()
        daemons.stop_all()
    non_json = [line for line in daemon.raw if not line.startswith("{")]
    not_ready = [p for p in passes if p["state"] != "ready"]
    figures("probe_flood", connections=count, seconds=seconds, reopened=reopened,
            daemon_fds_max=most_fds, passes=len(passes), not_ready=len(not_ready),
            manifests=len(names), non_json_lines=len(non_json))
    assert non_json == [] and not_ready == []
    assert most_fds < 1024 - 100
