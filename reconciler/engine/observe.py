"""Observing live jobs: record completions, failures, drift and loss in the store.

Active jobs are found by their uids (the legacy backend lists their annotations, 500 to a
request, so a reply holds only the jobs asked about: one list of all our jobs grew with every
replaced or ended job the requester keeps; 10,000 manifests after 10,000 changes: 20,000 jobs,
~22 MB of JSON and a 60 MB RSS peak per poll). A job missing from the answer is asked about by
id, because an empty or short answer is not proof of absence (docs/wire-legacy.md, List); only
an explicit "not found" marks it ``lost``. The planner then decides what follows (resubmit or
not, by the manifest's policy). A rejected credential (:class:`CredentialsRejected`) is raised
to the caller, never taken for one job's answer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import structlog

from reconciler.backends.errors import CredentialsRejected, RequesterError
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import RECORD_PHASES
from reconciler.ports import Backend, JobInfo, StateStore

_EVENTS = {Phase.COMPLETED: "job.completed", Phase.FAILED: "job.failed",
           Phase.CANCELLED: "job.drift"}


async def observe(
    store: StateStore,
    backend: Backend,
    policy: PlanPolicy,
    clock: Callable[[], float] = time.time,
) -> Counter[str]:
    """Refresh the recorded state of every active job; returns counts of what changed."""
    log = structlog.get_logger("reconciler.engine.observe")
    active = [r for r in store.records() if r.phase is Phase.ACTIVE and r.job_id]
    if not active:
        return Counter()
    found = await backend.find([r.uid for r in active if r.uid])
    listed = {job.job_id: job for jobs in found.values() for job in jobs}
    updates: list[Record] = []
    counts: Counter[str] = Counter()
    for record in active:
        assert record.job_id is not None
        job = listed.get(record.job_id)
        if job is None:
            try:
                job = await backend.status(record.job_id)
            except CredentialsRejected:
                raise  # a configuration error: the caller stops, it is not this job's
            except RequesterError:
                continue  # no answer: keep what we have, ask again next time
        state = job.state if job else None
        if state == record.job_state:
            continue
        updated = _updated(record, job, policy, clock())
        updates.append(updated)
        if updated.phase is not record.phase:
            event = _EVENTS.get(updated.phase, "job.lost")
            counts[event] += 1
            log.log(30 if updated.phase is not Phase.COMPLETED else 20, event,
                    name=record.name, job_id=record.job_id, path=record.path,
                    job_state=state, reason=_reason(updated.phase))
    store.save(updates)
    return counts


def _updated(record: Record, job: JobInfo | None, policy: PlanPolicy, now: float) -> Record:
    """``job`` None: the backend said it does not know the job."""
    phase = Phase.LOST if job is None else RECORD_PHASES[job.phase]
    retry_at = now + policy.backoff(record.attempts) if phase in (Phase.FAILED, Phase.LOST) else 0
    return replace(record, phase=phase, job_state=job.state if job else None,
                   next_attempt_at=retry_at)


def _reason(phase: Phase) -> str:
    return {
        Phase.COMPLETED: "job completed",
        Phase.FAILED: "job ended in Error",
        Phase.CANCELLED: "job was cancelled outside the reconciler",
        Phase.LOST: "the requester no longer knows this job (restarted with an in-memory "
                    "store?); the manifest's onFailure policy decides what follows",
    }.get(phase, "")
