"""Shared helpers for the benchmarks: real processes on loopback, a key, a table printer."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

from reconciler.backends.signing import write_new_key


@dataclass(frozen=True)
class Timed:
    """Wall-clock and CPU seconds of one side of a benchmark. The CPU is this process's own
    (the dev requester is another process): on a machine shared with other work it moves far
    less than the wall clock does, so its ratio is the steadier one (docs/performance.md)."""

    wall: float
    cpu: float


@dataclass(frozen=True)
class Rounds:
    """Rounds of several sides run one after the other (the order rotating), each round's
    ratios taken between its own runs. On a shared 2-core machine one run's CPU per job moves
    by 25-40% from minute to minute: a ratio of two bests taken minutes apart carries that
    drift whole, a round's ratio far less of it, and the median of the rounds least
    (docs/performance.md, "Measuring")."""

    runs: dict[str, list[Timed]]

    def best(self, side: str) -> Timed:
        return Timed(min(t.wall for t in self.runs[side]), min(t.cpu for t in self.runs[side]))

    def median_ratio(self, side: str, to: str, of: str) -> float:
        return float(statistics.median(self._ratios(side, to, of)))

    def ratios(self, side: str, to: str, of: str) -> str:
        return " ".join(f"{r:.2f}" for r in self._ratios(side, to, of))

    def _ratios(self, side: str, to: str, of: str) -> list[float]:
        return [getattr(a, of) / getattr(b, of)
                for a, b in zip(self.runs[side], self.runs[to], strict=True)]


def rounds(count: int, sides: dict[str, Callable[[int], Timed]]) -> Rounds:
    """``count`` rounds of every side; each round starts one side later than the last."""
    names = list(sides)
    runs: dict[str, list[Timed]] = {name: [] for name in names}
    for index in range(count):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(sides[name](index))
    return Rounds(runs)


class Stopwatch:
    def __init__(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def read(self) -> Timed:
        return Timed(time.perf_counter() - self._wall, time.process_time() - self._cpu)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="reconciler-bench-"))


def key(directory: Path, key_type: str = "rsa") -> Path:
    path = directory / f"{key_type}.pem"
    write_new_key(path, "rsa" if key_type == "rsa" else "ed25519")
    return path


@contextmanager
def requester(directory: Path, *args: str) -> Iterator[str]:
    """A dev requester process for the duration of a block; yields its URL."""
    process, url = start_requester(directory, *args)
    try:
        yield url
    finally:
        process.terminate()
        process.wait()


def warm_up(directory: Path) -> None:
    """One request through httpx's async stack before anything is timed. Its first request
    imports httpcore, h11 and anyio's backend (~50 ms of CPU), which the side timed first
    paid and the other did not (docs/performance.md)."""
    async def one(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            await http.get("/")

    with requester(directory) as url:
        asyncio.run(one(url))


def start_requester(directory: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = directory / f"port-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "--log-level", "warning", "dev-requester",
         "--port", "0", "--port-file", str(port_file), "--job-duration", "3600", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not port_file.exists():
        time.sleep(0.01)
    return process, f"http://127.0.0.1:{port_file.read_text().strip()}"


def start_daemon(directory: Path, root: Path, url: str, key_path: Path,
                 log: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    environment = {**os.environ, **{f"RECONCILER_{k.upper()}": v for k, v in env.items()}}
    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "reconciler", "--log-format", "json", "run", "--manifests",
             str(root), "--state", str(directory / "state.db"), "--endpoint", url, "--key",
             str(key_path)], stdout=subprocess.DEVNULL, stderr=out, env=environment)


def wait_log(log: Path, event: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while f'"{event}"' not in log.read_text():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event} in {log}")
        time.sleep(0.1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jobs(url: str) -> list[dict[str, object]]:
    reply = httpx.post(url + "/api/v1/requester/list", json={"return_all": True}, timeout=60)
    return list(reply.json()["jobs"])


def created_at(job: dict[str, object]) -> float:
    text = job["Job"]["Metadata"]["CreatedAt"]  # type: ignore[index]
    return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
