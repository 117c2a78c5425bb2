"""A real ``reconciler run`` process, its JSON event stream collected on a thread."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class DaemonProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        command = [sys.executable, "-m", "reconciler", "--log-format", "json", "run", *args]
        self.args = args
        environment = {**os.environ, "RECONCILER_RESOLVE_DELAY": "0.05", **(env or {})}
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=environment)
        self.events: list[Event] = []
        self.raw: list[str] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            with self._lock:
                self.raw.append(line)
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        self.events.append(json.loads(line))

    def named(self, name: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60.0,
                 what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        tail = "".join(self.raw[-30:])
        raise AssertionError(f"timed out waiting for {what}; daemon output tail:\n{tail}")

    def quiet(self) -> bool:
        """A pass that changed nothing and deferred nothing: the daemon has converged. A pass
        with only deferred decisions (a removal in its grace period) is not quiet."""
        return any(e.get("changes") == 0 and e.get("waiting") == 0
                   for e in self.named("pass.completed"))

    def wait_quiet_after(self, event: str, timeout: float = 60.0) -> None:
        """Wait for a quiet pass (see :meth:`quiet`) completed after the last ``event`` seen so
        far: a condition, not a fixed sleep, so a busy machine only makes it take longer."""
        with self._lock:
            since = max((i for i, e in enumerate(self.events) if e.get("event") == event),
                        default=-1)

        def quiet_since() -> bool:
            with self._lock:
                later = self.events[since + 1 :]
            return any(e.get("event") == "pass.completed" and e.get("changes") == 0
                       and e.get("waiting") == 0 for e in later)

        self.wait_for(quiet_since, timeout, f"a quiet pass after {event}")

    def wait_event(self, name: str, count: int = 1, timeout: float = 60.0) -> list[Event]:
        self.wait_for(lambda: len(self.named(name)) >= count, timeout, f"{count} x {name}")
        return self.named(name)

    def signal(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit on its own (no signal sent)."""
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code

    def stop(self, timeout: float = 20.0) -> int:
        """One SIGTERM (if still running), then wait; kill after ``timeout``."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.wait(timeout)


class Daemons:
    """The daemons one test starts; each is up (its first pass done) when returned, and all are
    stopped when the test ends, however it ends."""

    def __init__(self) -> None:
        self._procs: list[DaemonProcess] = []

    def start(self, args: list[str], env: dict[str, str] | None = None) -> DaemonProcess:
        proc = DaemonProcess(args, env)
        self._procs.append(proc)
        proc.wait_event("pass.completed")
        return proc

    def stop_all(self) -> None:
        for proc in self._procs:
            proc.stop()


def daemon_args(root: Path, state: Path, url: str, key: Path, *extra: str) -> list[str]:
    return ["--manifests", str(root), "--state", str(state), "--endpoint", url,
            "--key", str(key), *extra]
