"""Reaction latency: a manifest file written -> its submit received by the requester.

Usage: python -m bench.latency [--count 200] [--rates 10,100]

Prints p50/p90/p99/max per rate. The target (issue 8) is p99 <= debounce + 100 ms.
"""

from __future__ import annotations

import argparse
import time

from bench.common import (
    created_at,
    jobs,
    key,
    percentile,
    scratch,
    start_daemon,
    start_requester,
    table,
)
from tests.harness import envelope


def measure(count: int, rate: float) -> list[float]:
    directory = scratch()
    root = directory / "manifests"
    root.mkdir()
    (root / "seed.yaml").write_text(envelope("seed"))
    requester, url = start_requester(directory)
    daemon = start_daemon(directory, root, url, key(directory))
    try:
        while not jobs(url):
            time.sleep(0.05)  # the first pass is done
        written: dict[str, float] = {}
        for index in range(count):
            name = f"lat-{index:05d}"
            tmp = root / f".{name}.tmp"
            tmp.write_text(envelope(name))
            written[name] = time.time()
            tmp.rename(root / f"{name}.yaml")
            time.sleep(max(0.0, written[name] + 1 / rate - time.time()))
        deadline = time.time() + 30
        while len(jobs(url)) < count + 1 and time.time() < deadline:
            time.sleep(0.1)
        latencies = []
        for job in jobs(url):
            tags = [t for t in job["Job"]["Spec"]["Annotations"]  # type: ignore[index]
                    if t.startswith("reconciler-manifest:lat-")]
            if tags:
                latencies.append(created_at(job) - written[tags[0].split(":", 1)[1]])
        return latencies
    finally:
        daemon.terminate()
        daemon.wait()
        requester.terminate()
        requester.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rates", default="10,100")
    args = parser.parse_args()
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        values = measure(args.count, rate)
        ms = [v * 1000 for v in values]
        rows.append([f"{rate:g}/s", len(ms), f"{percentile(ms, 0.5):.0f}",
                     f"{percentile(ms, 0.9):.0f}", f"{percentile(ms, 0.99):.0f}",
                     f"{max(ms):.0f}"])
    print("Reaction latency, file written -> submit received (ms); debounce 150 ms")
    print(table(["rate", "files", "p50", "p90", "p99", "max"], rows))


if __name__ == "__main__":
    main()
