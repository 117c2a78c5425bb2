"""No-op pass: one full pass over N unchanged, already-managed manifests, against a baseline of
os.scandir + stat of the same tree.

Usage: python -m bench.noop_pass [--counts 10000,100000] [--profile]
                                [--state postgresql[://user@host/db]]

``--state``: on PostgreSQL (a fresh database per run, a leading fenced store: bench/pgstate.py).

Target (issue 8): <= 5x the baseline, and under 300 ms at 10,000.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import logging
import os
import pstats
import time
from pathlib import Path

import structlog

from bench.common import scratch, table
from bench.pgstate import fresh_store, start_server
from reconciler.app.wiring import open_store
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.reconcile import Reconciler
from reconciler.ports import StateStore
from reconciler.sources.folder import FolderSource
from tests.reliability.common import manifest


def populate(root: Path, store: StateStore, count: int) -> None:
    """N manifest files, and the store records a finished sync would have left."""
    records = []
    for index in range(count):
        name = f"n-{index:06d}"
        text = manifest(name, f"img:{index}")
        (root / f"{name}.yaml").write_text(text)
        spec_hash = load_file(f"{name}.yaml", text.encode()).manifests[0].spec_hash
        records.append(Record(name, Phase.ACTIVE, spec_hash, f"{name}.yaml",
                              job_id=f"job-{index}", uid=f"{index:032x}", job_state="New"))
    store.commit_intents(records)


def baseline(root: Path) -> float:
    started = time.perf_counter()
    with os.scandir(root) as entries:
        for entry in entries:
            entry.stat()
    return time.perf_counter() - started


LOOP = asyncio.new_event_loop()  # one loop, as in the daemon (asyncio.run costs ~0.1 s)


def timed_pass(reconciler: Reconciler) -> float:
    result = LOOP.run_until_complete(reconciler.run_pass(None))
    assert not result.plan.changes, result.plan.changes[:3]
    return result.duration


def measure(count: int, profile: bool, pg_url: str | None = None) -> list[object]:
    directory = scratch()
    root = directory / "manifests"
    root.mkdir()
    opened: StateStore = (open_store(directory / "state.db") if pg_url is None
                          else fresh_store(pg_url))
    with contextlib.closing(opened) as store:
        populate(root, store, count)
        reconciler = Reconciler(FolderSource(root), store, PlanPolicy())
        cold = timed_pass(reconciler)  # parses every file once
        gc.freeze()  # as the daemon does after its first pass
        warm = min(timed_pass(reconciler) for _ in range(5))
        base = min(baseline(root) for _ in range(3))
        if profile:
            with cProfile.Profile() as prof:
                timed_pass(reconciler)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    return [count, f"{cold * 1000:.0f}", f"{warm * 1000:.0f}", f"{base * 1000:.1f}",
            f"{warm / base:.1f}x"]


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="10000,100000")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--state", default=None, help="postgresql[://user@host/db]")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        pg_url = args.state
        if pg_url == "postgresql":
            pg_url = stack.enter_context(start_server()).url
        rows = [measure(int(c), args.profile, pg_url) for c in args.counts.split(",")]
    print(f"{'PostgreSQL' if pg_url else 'SQLite'} store.")
    print("No-op pass over unchanged managed manifests (ms; no-op: best of 5)")
    print(table(["manifests", "first pass", "no-op pass", "scandir+stat", "ratio"], rows))


if __name__ == "__main__":
    main()
