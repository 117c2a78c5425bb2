"""A real PostgreSQL server for the tests: initdb in a temporary folder, loopback only.

The server binaries come from Debian's ``postgresql`` package (``.ci/run`` installs it when
missing). PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
``postgres`` user the package creates. Without binaries the tests that need a server skip and say
why; nothing else is skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _bindir() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), reverse=True)
    if versions:  # Debian's layout: initdb and pg_ctl are not on PATH
        return versions[0].parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def unavailable_reason() -> str | None:
    """Why no server can be started here, or None when one can."""
    if _bindir() is None:
        return "no PostgreSQL server binaries (install Debian's postgresql; .ci/run does)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and no 'postgres' user to run the server as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    folder: Path
    port: int
    bindir: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:
            argv = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", *argv]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)

    def start(self) -> None:
        result = self._run(
            "pg_ctl", "-D", str(self.folder / "data"), "-w", "-t", "30",
            "-l", str(self.folder / "server.log"), "-o",
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder} -c fsync=off "
            "-c max_connections=200", "start")
        if result.returncode:
            log = (self.folder / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{log}")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")

    def sql(self, statement: str) -> str:
        """One statement as the superuser; rows as ``a|b`` lines."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement)
            rows = cur.fetchall() if cur.description else []
        return "\n".join("|".join(str(v) for v in row) for row in rows)

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def running_server() -> Iterator[PgServer]:
    bindir = _bindir()
    assert bindir is not None
    folder = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
        server = PgServer(folder, _free_port(), bindir)
        init = server._run("initdb", "-D", str(folder / "data"), "-A", "trust", "-U", "postgres",
                           "--no-sync", "-E", "UTF8")
        if init.returncode:
            raise RuntimeError(f"initdb failed: {init.stderr}")
        server.start()
        try:
            yield server
        finally:
            server.stop("immediate")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
