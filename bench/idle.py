"""Idle cost: CPU used by a daemon with N managed manifests over 60 s, no resync in the window
(its polls of every live job are included).

Usage: python -m bench.idle [--count 10000] [--seconds 60]

Target (issue 8): < 1% of one core; no busy polling.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.common import cpu_seconds, key, scratch, start_daemon, start_requester, table, wait_log
from bench.world import build
from reconciler.backends.signing import load_signer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    directory = scratch()
    key_path = key(directory)
    root, _, journal = build(directory, args.count, load_signer(key_path))
    requester, url = start_requester(directory, "--state-file", str(journal))
    log = directory / "daemon.log"
    daemon = start_daemon(directory, root, url, key_path, log=log, resync_interval="3600")
    try:
        wait_log(log, "pass.completed", timeout=600)
        time.sleep(2)
        before, started = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(args.seconds)
        used, elapsed = cpu_seconds(daemon.pid) - before, time.monotonic() - started
    finally:
        daemon.terminate()
        daemon.wait()
        requester.terminate()
        requester.wait()
    ticks = os.sysconf("SC_CLK_TCK")
    print(f"Idle cost over {elapsed:.0f} s (poll_interval 10 s; CPU clock tick {1 / ticks:.3f} s)")
    print(table(["manifests", "CPU s", "share of one core"],
                [[args.count, f"{used:.2f}", f"{used / elapsed:.2%}"]]))


if __name__ == "__main__":
    main()
