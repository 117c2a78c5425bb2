"""A manifests folder, a state store and a key around a real dev requester, driven through the
real ``reconciler`` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler.domain.records import Record
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess


def envelope(name: str, image: str = "ubuntu:22.04", *, policy: str = "",
             annotations: tuple[str, ...] = (), env: tuple[str, ...] = ()) -> str:
    lines = [
        "apiVersion: reconciler/v1", "kind: Job", "metadata:", f"  name: {name}", "spec:",
        "  engine: docker", "  publisher: ipfs", "  docker:", f"    image: {image}",
    ]
    if env:
        lines += ["    environmentVariables:", *[f"      - {e}" for e in env]]
    if annotations:
        lines += ["  annotations:", *[f"    - {a}" for a in annotations]]
    if policy:
        lines += ["policy:", *[f"  {p}" for p in policy.split(";")]]
    return "\n".join(lines) + "\n"


@dataclass
class Harness:
    tmp: Path
    dev: DevProcess
    key: Path
    env: dict[str, str] = field(default_factory=dict)
    #: Runs the CLI through this (e.g. ``setpriv`` to an unprivileged user).
    prefix: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.root = self.tmp / "manifests"
        self.root.mkdir(exist_ok=True)
        self.state = self.tmp / "state.db"

    def write(self, relative: str, text: str) -> Path:
        """Write as operators are told to: a temp file renamed into place."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "reconciler", "--log-format", "json", args[0],
                   "--manifests", str(self.root), "--state", str(self.state),
                   "--endpoint", self.dev.url, "--key", str(self.key), *args[1:]]
        if args[0] == "validate":
            command = [sys.executable, "-m", "reconciler", "validate", str(self.root)]
        environment = {**os.environ, "RECONCILER_RESOLVE_DELAY": "0.05", **self.env, **(env or {})}
        return subprocess.run([*self.prefix, *command], capture_output=True, text=True,
                              env=environment, timeout=120)

    def apply(self, *args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        result = self.cli("apply", *args)
        if expect is not None:
            assert result.returncode == expect, result.stdout + result.stderr
        return result

    def events(self, result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
        return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]

    def jobs(self, name: str | None = None) -> list[dict[str, Any]]:
        """The requester's own record of jobs (for one manifest name, by its annotation)."""
        tags = [f"reconciler-manifest:{name}"] if name else []
        return self.dev.jobs(include_tags=tags)

    def states(self, name: str) -> list[str]:
        return sorted(j["State"]["State"] for j in self.jobs(name))

    def records(self) -> dict[str, Record]:
        with Store(self.state, writer=False) as store:
            return {r.name: r for r in store.records()}
