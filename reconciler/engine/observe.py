"""Observing live jobs: record completions, failures, drift and loss in the store.

Active jobs are listed by their uid annotations, 500 to a request, so a reply holds only the
jobs asked about: one list of all our jobs grew with every replaced or ended job the requester
keeps (10,000 manifests after 10,000 changes: 20,000 jobs, ~22 MB of JSON and a 60 MB RSS peak
per poll). A job missing from the lists is asked about by id (``states``), because an empty or
short list is not proof of absence (docs/wire-legacy.md, List); only an explicit "not found"
marks it ``lost``. The planner then decides what follows (resubmit or not, by the manifest's
policy).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import structlog

from reconciler.backends.legacy import JobInfo, NotFound, Requester, RequesterError
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import jobs_by_uid, phase_of
from reconciler.store.sqlite import Store

_EVENTS = {Phase.COMPLETED: "job.completed", Phase.FAILED: "job.failed",
           Phase.CANCELLED: "job.drift"}


async def observe(
    store: Store,
    requester: Requester,
    policy: PlanPolicy,
    clock: Callable[[], float] = time.time,
) -> Counter[str]:
    """Refresh the recorded state of every active job; returns counts of what changed."""
    log = structlog.get_logger("reconciler.engine.observe")
    active = [r for r in store.records() if r.phase is Phase.ACTIVE and r.job_id]
    if not active:
        return Counter()
    found = await jobs_by_uid(requester, [r.uid for r in active if r.uid])
    listed = {job.job_id: job for jobs in found.values() for job in jobs}
    updates: list[Record] = []
    counts: Counter[str] = Counter()
    for record in active:
        assert record.job_id is not None
        job = listed.get(record.job_id)
        state = job.state if job else await _state_by_id(requester, record.job_id)
        if state == record.job_state:
            continue
        updated = _updated(record, state, job, policy, clock())
        updates.append(updated)
        if updated.phase is not record.phase:
            event = _EVENTS.get(updated.phase, "job.lost")
            counts[event] += 1
            log.log(30 if updated.phase is not Phase.COMPLETED else 20, event,
                    name=record.name, job_id=record.job_id, path=record.path,
                    job_state=state, reason=_reason(updated.phase))
    store.save(updates)
    return counts


async def _state_by_id(requester: Requester, job_id: str) -> str | None:
    """The job's state, None when the requester says it does not know the job."""
    try:
        return await requester.state(job_id)
    except NotFound:
        return None
    except RequesterError:
        return "Unknown"  # no answer: keep what we have, ask again next time


def _updated(record: Record, state: str | None, job: JobInfo | None, policy: PlanPolicy,
             now: float) -> Record:
    if state == "Unknown":
        return record
    phase = Phase.LOST if state is None else phase_of(state)
    retry_at = now + policy.backoff(record.attempts) if phase in (Phase.FAILED, Phase.LOST) else 0
    return replace(record, phase=phase, job_state=state, next_attempt_at=retry_at)


def _reason(phase: Phase) -> str:
    return {
        Phase.COMPLETED: "job completed",
        Phase.FAILED: "job ended in Error",
        Phase.CANCELLED: "job was cancelled outside the reconciler",
        Phase.LOST: "the requester no longer knows this job (restarted with an in-memory "
                    "store?); the manifest's onFailure policy decides what follows",
    }.get(phase, "")
