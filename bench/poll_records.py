"""What a poll costs besides the requests: turning N listed jobs into JobInfo (the orchestrator's
and the legacy API's list items), and observe's loop over N live records on SQLite when nothing
changed (no row written) and when every job has a new version (N rows written).

Usage: python -m bench.poll_records [--count 10000]

Issue 14 (status shows version and message): the no-op poll must stay one comparison per job
and write nothing (docs/performance.md, "Polls record version and message").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from bench.common import scratch, table
from reconciler.app.wiring import open_store
from reconciler.backends import legacy, legacy_jobs, orchestrator
from reconciler.domain.manifest import Manifest
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.observe import observe
from reconciler.ports import JobInfo


def orchestrator_items(count: int) -> list[dict[str, Any]]:
    """Half the jobs with a state message, as running jobs of v1.9 often carry one."""
    return [{"ID": f"j-{i:036d}", "Name": f"m{i}", "Version": 2, "CreateTime": 1_700_000_000 + i,
             "Labels": {"managed-by": "reconciler", "reconciler-instance": "default",
                        "reconciler-uid": f"u{i:031d}"},
             "Meta": {"reconciler/spec": "a" * 64},
             "State": {"StateType": "Running", "Message": "" if i % 2 else "job is running"}}
            for i in range(count)]


def legacy_items(count: int) -> list[dict[str, Any]]:
    return [{"Job": {"Metadata": {"ID": f"{i:036d}", "ClientID": "c", "CreatedAt": "2026"},
                     "Spec": {"Annotations": ["reconciler", f"reconciler-uid:u{i}"]}},
             "State": {"State": "InProgress",
                       "Executions": [{"State": "BidAccepted", "Status": ""}]}}
            for i in range(count)]


class Listed:
    """A backend whose list answers the given jobs at once: only observe's own work counts."""

    identity = "bench"

    def __init__(self, jobs: Sequence[JobInfo]) -> None:
        self.jobs = {job.uid: [job] for job in jobs}

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        raise NotImplementedError

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        return self.jobs

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {}

    async def stop(self, job_id: str, reason: str) -> str:
        raise NotImplementedError

    async def status(self, job_id: str) -> JobInfo | None:
        return None

    async def owner_of(self, job_id: str) -> str | None:
        return None


def best_ms(step: Callable[[], object], rounds: int = 5) -> float:
    """The least CPU time of a few rounds: the machine is shared."""
    spent = []
    for _ in range(rounds):
        started = time.process_time()
        step()
        spent.append(time.process_time() - started)
    return min(spent) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    count = args.count
    orch, old = orchestrator_items(count), legacy_items(count)
    rows = [
        ("orchestrator items -> JobInfo", best_ms(lambda: [orchestrator.job_info(j)
                                                          for j in orch]), "-"),
        ("legacy items -> JobInfo", best_ms(lambda: [
            legacy_jobs.job_info(legacy.WireJob.from_wire(j)) for j in old]), "-"),
    ]
    infos = [orchestrator.job_info(j) for j in orch]
    with open_store(scratch() / "state.db") as store:
        store.commit_intents([Record(f"m{i}", Phase.ACTIVE, "h" * 64, f"m{i}.yaml",
                                     job_id=job.job_id, uid=job.uid, job_state=job.state,
                                     job_version=job.version, job_message=job.message or None)
                              for i, job in enumerate(infos)])
        written: list[int] = []
        real_save = store.save

        def counting(records: Sequence[Record]) -> None:
            written.append(len(records))
            real_save(records)

        store.save = counting  # type: ignore[method-assign]
        policy = PlanPolicy()
        unchanged = Listed(infos)
        rows.append(("observe, nothing changed", best_ms(
            lambda: asyncio.run(observe(store, unchanged, policy))), str(sum(written))))
        written.clear()
        version = 2

        def bumped() -> None:
            nonlocal version
            version += 1
            jobs = [JobInfo(j.job_id, j.phase, j.state, uid=j.uid, version=version,
                            message=j.message) for j in infos]
            asyncio.run(observe(store, Listed(jobs), policy))

        rows.append(("observe, every version new", best_ms(bumped, rounds=3),
                     str(sum(written) // 3)))
    print(f"{count} jobs, CPU ms (best of several rounds)")
    print(table(["step", "CPU ms", "rows written"], [[n, f"{ms:.1f}", w] for n, ms, w in rows]))


if __name__ == "__main__":
    main()
