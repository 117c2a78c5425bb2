"""Memory: the daemon's RSS in steady state with N managed manifests.

Usage: python -m bench.memory [--counts 1000,10000,100000]

Target (issue 8): 10,000 <= 150 MB, growth linear.
"""

from __future__ import annotations

import argparse
import time

from bench.common import key, scratch, start_daemon, start_requester, table, wait_log
from bench.world import build
from reconciler.backends.signing import load_signer
from tests.reliability.common import rss_kib


def measure(count: int) -> list[object]:
    directory = scratch()
    key_path = key(directory)
    root, _, journal = build(directory, count, load_signer(key_path))
    requester, url = start_requester(directory, "--state-file", str(journal))
    log = directory / "daemon.log"
    daemon = start_daemon(directory, root, url, key_path, log=log, poll_interval="5",
                          resync_interval="3600")
    try:
        wait_log(log, "pass.completed", timeout=600)
        time.sleep(12)  # past a poll of every live job
        rss = rss_kib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait()
        requester.terminate()
        requester.wait()
    return [count, f"{rss / 1024:.1f}", f"{rss / count:.1f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1000,10000,100000")
    args = parser.parse_args()
    rows = [measure(int(c)) for c in args.counts.split(",")]
    print("Daemon RSS in steady state (after the first pass and a poll of every job)")
    print(table(["manifests", "RSS MiB", "KiB per manifest"], rows))


if __name__ == "__main__":
    main()
