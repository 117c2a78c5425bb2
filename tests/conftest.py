"""Shared fixtures: generated keys, and real dev-requester processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.backends.signing import Signer, write_new_key


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


@pytest.fixture(scope="session")
def rsa_key(key_dir: Path) -> Path:
    path = key_dir / "rsa.pem"
    write_new_key(path, "rsa")
    return path


@pytest.fixture(scope="session")
def other_rsa_key(key_dir: Path) -> Path:
    path = key_dir / "other.pem"
    write_new_key(path, "rsa")
    return path


@pytest.fixture(scope="session")
def ed_key(key_dir: Path) -> Path:
    path = key_dir / "ed.pem"
    write_new_key(path, "ed25519")
    return path


@pytest.fixture(scope="session")
def signer(rsa_key: Path) -> Signer:
    from reconciler.backends.signing import load_signer

    return load_signer(rsa_key)


@dataclass
class DevProcess:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def jobs(self, **request: object) -> list[dict[str, Any]]:
        """What the requester recorded: every client's jobs, straight from its list route."""
        body = {"return_all": True, "max_jobs": 0, **request}
        reply = httpx.post(self.url + "/devnet/jobs", json=body, timeout=10)
        reply.raise_for_status()
        return list(reply.json()["jobs"])

    def stats(self) -> dict[str, int]:
        return dict(httpx.post(self.url + "/devnet/stats", timeout=10).json())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_dev_requester(tmp: Path, *args: str) -> DevProcess:
    port_file = tmp / f"port-{time.monotonic_ns()}"
    log = tmp / f"devnet-{time.monotonic_ns()}.log"
    command = [sys.executable, "-m", "reconciler", "--log-format", "json", "dev-requester",
               "--port", "0", "--port-file", str(port_file), *args]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    deadline = time.monotonic() + 20
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("dev requester did not start:\n" + log.read_text())
        time.sleep(0.02)
    return DevProcess(f"http://127.0.0.1:{port_file.read_text().strip()}", process, log)


@pytest.fixture
def dev_factory(tmp_path: Path) -> Iterator[Callable[..., DevProcess]]:
    started: list[DevProcess] = []

    def start(*args: str) -> DevProcess:
        dev = start_dev_requester(tmp_path, *args)
        started.append(dev)
        return dev

    yield start
    for dev in started:
        dev.stop()


@pytest.fixture
def dev(dev_factory: Callable[..., DevProcess]) -> DevProcess:
    return dev_factory("--job-duration", "30")
