"""Observing live jobs: record completions, failures, drift and loss in the store.

Active jobs are found by their uids (the legacy backend lists their annotations, 500 to a
request, so a reply holds only the jobs asked about: one list of all our jobs grew with every
replaced or ended job the requester keeps; 10,000 manifests after 10,000 changes: 20,000 jobs,
~22 MB of JSON and a 60 MB RSS peak per poll). A job missing from the answer is asked about by
id, because an empty or short answer is not proof of absence (docs/wire-legacy.md, List); only
an explicit "not found" marks it ``lost``. The planner then decides what follows (resubmit or
not, by the manifest's policy). A rejected credential (:class:`CredentialsRejected`) is raised
to the caller, never taken for one job's answer.

A service or daemon job (``JobInfo.long_running``) is kept running, so any end of it is drift:
``job.drift`` whatever the end, with its job type, and a backoff before the planner may bring
it back (docs/design.md, "Long-running jobs").
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
    *,
    still_ours: Callable[[], bool] = lambda: True,
) -> Counter[str]:
    """Refresh the recorded state of every active job; returns counts of what changed.

    ``still_ours``: asked before anything is saved. The records were read before the
    requests; a daemon that lost its lease meanwhile and leads again (a later epoch) would
    write them over what another leader recorded in between, so then nothing is saved and
    the next poll reads afresh (docs/design.md, "High availability")."""
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
        # A new version (an update in place) or message alone is news for `status` too; an
        # unchanged job writes nothing, so a no-op poll stays one list and no store write.
        if (state, *_seen(record, job)) == (record.job_state, record.job_version,
                                             record.job_message):
            continue
        updated = _updated(record, job, policy, clock())
        updates.append(updated)
        if updated.phase is not record.phase and job is not None and job.long_running:
            counts["job.drift"] += 1
            log.warning("job.drift", name=record.name, job_id=record.job_id, path=record.path,
                        job_state=state, job_type=job.job_type,
                        job_message=updated.job_message or "",
                        reason=_drift_reason(job, record, updated))
        elif updated.phase is not record.phase:
            event = _EVENTS.get(updated.phase, "job.lost")
            counts[event] += 1
            log.log(30 if updated.phase is not Phase.COMPLETED else 20, event,
                    name=record.name, job_id=record.job_id, path=record.path,
                    job_state=state, job_message=updated.job_message or "",
                    reason=_reason(updated.phase))
    if not still_ours():
        return Counter()
    store.save(updates)
    return counts


def _seen(record: Record, job: JobInfo | None) -> tuple[int | None, str | None]:
    """The version and message to record: a backend that reports no version (the legacy API,
    or a job not seen since) leaves the recorded one; an empty message is none."""
    if job is None:
        return record.job_version, None
    version = job.version if job.version is not None else record.job_version
    return version, job.message or None


def _updated(record: Record, job: JobInfo | None, policy: PlanPolicy, now: float) -> Record:
    """``job`` None: the backend said it does not know the job."""
    phase = Phase.LOST if job is None else RECORD_PHASES[job.phase]
    drifted = job is not None and job.long_running and phase is not Phase.ACTIVE
    attempts = record.attempts
    if drifted and record.updated_at and now - record.updated_at >= policy.stable_after:
        # It ran (unchanged since it was last recorded) for a good while before it ended:
        # a service failing once a week starts its retries afresh, as Kubernetes resets a
        # crash loop's backoff after 10 minutes of running; one failing at once runs out.
        attempts = min(attempts, 1)
    retry = drifted or phase in (Phase.FAILED, Phase.LOST)
    version, message = _seen(record, job)
    return replace(record, phase=phase, job_state=job.state if job else None,
                   attempts=attempts, next_attempt_at=now + policy.backoff(attempts) if retry
                   else 0, job_version=version, job_message=message)


def _drift_reason(job: JobInfo, record: Record, updated: Record) -> str:
    fresh = ("; it had run long enough for its retry count to start afresh"
             if updated.attempts < record.attempts else "")
    return (f"{job.job_type} job ended ({job.state or job.phase}): drift, a {job.job_type} job "
            "is kept running; the manifest's onFailure policy decides whether it is brought "
            f"back{fresh}")


def _reason(phase: Phase) -> str:
    return {
        Phase.COMPLETED: "job completed",
        Phase.FAILED: "job ended in Error",
        Phase.CANCELLED: "job was cancelled outside the reconciler",
        Phase.LOST: "the requester no longer knows this job (restarted with an in-memory "
                    "store?); the manifest's onFailure policy decides what follows",
    }.get(phase, "")
