"""Scheduled manifests firing together: N manifests with ``* * * * *``, one slot (issue 16).

Usage: python -m bench.schedules [--count 1000]

Starts the dev requester and the daemon (real clock), waits for the first pass, then for the
next whole minute: every manifest's slot is due at once. Prints how long after the slot the
last job was created (target: all within the minute), the daemon's CPU while waiting for the
slot (idle) and for the burst, and its resident memory (now and peak).
"""

from __future__ import annotations

import argparse
import math
import time

from bench.common import (
    cpu_seconds,
    created_at,
    jobs,
    key,
    scratch,
    start_daemon,
    start_requester,
    table,
    wait_log,
)
from tests.harness import envelope


def peak_rss_kib(pid: int) -> tuple[int, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values["VmRSS"], values["VmHWM"]


def measure(count: int) -> list[object]:
    directory = scratch()
    root = directory / "manifests"
    root.mkdir()
    for index in range(count):
        (root / f"s-{index:05d}.yaml").write_text(
            envelope(f"s-{index:05d}", policy='schedule: "* * * * *"'))
    requester, url = start_requester(directory)
    log = directory / "daemon.log"
    daemon = start_daemon(directory, root, url, key(directory), log)
    try:
        wait_log(log, "pass.completed", 120)
        time.sleep(2)  # the settle pass after the first one
        first, first_cpu = time.time(), cpu_seconds(daemon.pid)
        slot = math.floor(first / 60) * 60 + 60
        if slot - first < 15:  # too close to tell the first pass from the slot: the next one
            slot += 60
        time.sleep(max(0.0, slot - 1 - time.time()))
        idle_cpu = cpu_seconds(daemon.pid)
        idle_s = time.time() - first
        deadline = slot + 90
        found: list[dict[str, object]] = []
        while time.time() < deadline:
            found = jobs(url)
            if len(found) >= count:
                break
            time.sleep(0.5)
        burst_cpu = cpu_seconds(daemon.pid) - idle_cpu
        created = sorted(created_at(j) for j in found)
        rss, hwm = peak_rss_kib(daemon.pid)
        # idle CPU: from after the first passes to a second before the slot
        waiting_share = (idle_cpu - first_cpu) / max(idle_s, 1e-9)
        return [count, len(found), f"{created[0] - slot:.2f}" if created else "-",
                f"{created[-1] - slot:.2f}" if created else "-", f"{burst_cpu:.2f}",
                f"{100 * max(waiting_share, 0.0):.2f}%", f"{rss / 1024:.1f}",
                f"{hwm / 1024:.1f}"]
    finally:
        daemon.terminate()
        daemon.wait()
        requester.terminate()
        requester.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1000)
    args = parser.parse_args()
    print(f"{args.count} scheduled manifests (* * * * *), one slot; times after the slot (s)")
    print(table(["N", "jobs", "first", "last", "burst CPU s", "CPU until slot", "RSS MiB",
                 "peak MiB"], [measure(args.count)]))


if __name__ == "__main__":
    main()
