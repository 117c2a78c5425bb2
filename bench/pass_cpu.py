"""The reconciler's own CPU per job in a cold sync, without HTTP (issue 14).

Usage: python -m bench.pass_cpu [--count 2000] [--modes name,label] [--repeat 5]
                                [--profile FILE]

One real pass (read + parse N files, plan, durable intents in SQLite, the orchestrator
backend's translation, hygiene and labels, outcomes saved, every event rendered to /dev/null)
against an orchestrator client whose PUT and listing answer at once: what is left is the
reconciler's own work, which the cold sync benches' CPU ratio compares with a bare httpx
client's (docs/performance.md, "Where a cold sync's time went"). Prints the best of
``--repeat`` runs in µs of CPU per job; ``--profile FILE``: the last run is profiled
(cProfile) instead of counted.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.cold_sync import write_manifests
from bench.common import scratch
from reconciler import events
from reconciler.app.wiring import open_store
from reconciler.backends.orchestrator import Mode, OrchestratorBackend, OrchestratorClient
from reconciler.domain.plan import PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.sources.folder import FolderSource


class _Instant(OrchestratorClient):
    """Every PUT stored at once, every name free: no HTTP."""

    sent = 0

    async def put_job(self, job: Mapping[str, Any], *, force: bool = False) -> str:
        _Instant.sent += 1
        return f"j-{_Instant.sent:032x}"

    async def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        return []


async def one_pass(root: Path, state: Path, mode: Mode) -> float:
    store = open_store(state)
    policy = PlanPolicy()
    client = _Instant("http://127.0.0.1:9")
    backend = OrchestratorBackend(client, mode=mode,
                                  version="v1.9.3" if mode == "name" else "v1.6.0")
    try:
        executor = Executor(store, backend, policy, concurrency=8)
        started = time.process_time()
        result = await Reconciler(FolderSource(root), store, policy).run_pass(executor)
        cpu = time.process_time() - started
    finally:
        await client.aclose()
        store.close()
    assert result.report.counts["submit.ok"] == len(result.desired.manifests), result.report
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--modes", default="name,label")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--profile")
    args = parser.parse_args()
    directory = scratch()
    root = directory / "m"
    write_manifests(root, args.count)
    with open(os.devnull, "w") as null:
        events.configure("json", "info", null)
        for mode in args.modes.split(","):
            assert mode in ("name", "label"), mode
            best = float("inf")
            for attempt in range(args.repeat):
                profile = cProfile.Profile() if args.profile and attempt == args.repeat - 1 \
                    else None
                if profile is not None:
                    profile.enable()
                cpu = asyncio.run(one_pass(root, directory / f"{mode}-{attempt}.db",
                                           "name" if mode == "name" else "label"))
                if profile is not None:
                    profile.disable()
                    profile.dump_stats(args.profile)
                else:
                    best = min(best, cpu)
            print(f"{mode:5s} mode  N={args.count}  best of {args.repeat}: "
                  f"{best / args.count * 1e6:.0f} µs of CPU per job")


if __name__ == "__main__":
    main()
