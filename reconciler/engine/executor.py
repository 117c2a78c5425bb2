"""The executor: carries a :class:`~reconciler.domain.plan.Plan` out through a requester, durably.

Order of every remote effect (docs/operations-notes.md, Intent before effect):

1. commit an intent (a record in phase ``submitting`` with a fresh uid, or ``cancelling``);
   the intents of up to ``INTENT_BATCH`` actions share one durable commit;
2. send the request (a submit carries the uid as the annotation ``reconciler-uid:<uid>``);
3. save the outcome (job id and state).

A submit whose outcome is unknown (lost reply, 5xx) is resolved by listing its uid; an empty
list is not proof of absence, so the lookup is repeated ``confirmations`` times before the
same intent is submitted again. A replace cancels, then submits, each step durable.

Decisions are the planner's; this module only carries them out and reports what happened as
events (``docs/events.md``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from reconciler.backends.legacy import (
    AlreadyTerminal,
    JobInfo,
    NotFound,
    OutcomeUnknown,
    Requester,
    RequesterError,
)
from reconciler.domain.manifest import Manifest
from reconciler.domain.plan import Action, Decision, Plan, PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.store.sqlite import Store

INTENT_BATCH = 256
UID_TAG = "reconciler-uid:"

#: An intent in doubt, its manifest (None once removed), and what follows a confirmed absence.
Pending = tuple[Record, Manifest | None, Action]
JOB_PHASES = {"Completed": Phase.COMPLETED, "Error": Phase.FAILED, "Cancelled": Phase.CANCELLED}


def job_annotations(manifest: Manifest, uid: str) -> list[str]:
    """Our annotations: lower-case, within the CLI's safe set ``[a-z0-9._~!:@,;+-]``."""
    return [
        "reconciler",
        UID_TAG + uid,
        f"reconciler-manifest:{manifest.name}",
        f"reconciler-spec:{manifest.spec_hash[:16]}",
    ]


async def jobs_by_uid(
    requester: Requester, uids: Sequence[str], batch: int = 500
) -> dict[str, list[JobInfo]]:
    """Our jobs carrying any of these uids, by uid. Asked ``batch`` uids at a time, so a reply
    holds only the jobs asked about, however many ended jobs the requester keeps."""
    found: dict[str, list[JobInfo]] = {}
    wanted = set(uids)
    for start in range(0, len(uids), batch):
        tags = [UID_TAG + uid for uid in uids[start : start + batch]]
        for job in await requester.list_jobs(include_tags=tags):
            for tag in job.annotations:
                uid = tag.removeprefix(UID_TAG)
                if tag.startswith(UID_TAG) and uid in wanted:
                    found.setdefault(uid, []).append(job)
    return found


def phase_of(state: str) -> Phase:
    return JOB_PHASES.get(state, Phase.ACTIVE)


@dataclass
class ApplyReport:
    """What one apply did: counts by ``action.outcome`` and the errors met."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    done: int = 0
    total: int = 0

    def count(self, key: str) -> None:
        self.counts[key] += 1

    @property
    def failed(self) -> bool:
        return bool(self.errors)


class Executor:
    def __init__(
        self,
        store: Store,
        requester: Requester,
        policy: PlanPolicy,
        *,
        concurrency: int = 8,
        confirmations: int = 3,
        resolve_delay: float = 0.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._requester = requester
        self._policy = policy
        self._semaphore = asyncio.Semaphore(concurrency)
        self._confirmations = max(1, confirmations)
        self._resolve_delay = resolve_delay
        self._clock = clock
        self._log = structlog.get_logger("reconciler.engine.executor")
        #: Called with (done, total) as actions finish; the CLI draws a progress line with it.
        self.on_progress: Callable[[int, int], None] | None = None
        self._stopping = False

    def stop(self) -> None:
        """Start no new action; those not started give their intents back (see _rollback)."""
        self._stopping = True

    async def apply(self, plan: Plan) -> ApplyReport:
        report = ApplyReport()
        changes = plan.changes
        self._forget([d for d in changes if d.action is Action.FORGET], report)
        self._update([d for d in changes if d.action is Action.UPDATE], report)
        await self._resolve([d for d in changes if d.action is Action.RESOLVE], report)
        actions = [d for d in changes
                   if d.action not in (Action.FORGET, Action.UPDATE, Action.RESOLVE)]
        report.total = len(actions)
        pending: set[asyncio.Task[None]] = set()
        for start in range(0, len(actions), INTENT_BATCH):
            while len(pending) >= INTENT_BATCH:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if self._stopping:
                break
            batch = actions[start : start + INTENT_BATCH]
            intents = [self._intent(d, plan.revision) for d in batch]
            self._store.commit_intents(intents)
            pending |= {
                asyncio.create_task(self._bounded(d, intent, report))
                for d, intent in zip(batch, intents, strict=True)
            }
        if pending:
            await asyncio.gather(*pending)
        return report

    # --- intents ------------------------------------------------------------------------

    def _intent(self, decision: Decision, revision: str | None) -> Record:
        record = decision.record
        if decision.action in (Action.SUBMIT, Action.RESUBMIT):
            assert decision.manifest is not None
            return self._submit_intent(decision.manifest, record, revision)
        assert record is not None  # cancel and replace act on a recorded job
        return replace(record, phase=Phase.CANCELLING, revision=revision or record.revision)

    def _submit_intent(
        self, manifest: Manifest, record: Record | None, revision: str | None, uid: str = ""
    ) -> Record:
        same_spec = record is not None and record.spec_hash == manifest.spec_hash
        return Record(
            name=manifest.name,
            phase=Phase.SUBMITTING,
            spec_hash=manifest.spec_hash,
            path=manifest.path,
            uid=uid or secrets.token_hex(16),
            attempts=(record.attempts if record and same_spec else 0) + (0 if uid else 1),
            last_error=record.last_error if record else None,
            on_remove=manifest.policy.on_remove,
            revision=revision,
        )

    # --- actions ------------------------------------------------------------------------

    async def _bounded(self, decision: Decision, intent: Record, report: ApplyReport) -> None:
        async with self._semaphore:
            if self._stopping:
                self._rollback(decision, report)
                return
            await self._carry_out(decision, intent, report)
        report.done += 1
        if self.on_progress is not None:
            self.on_progress(report.done, report.total)

    async def _carry_out(self, decision: Decision, intent: Record, report: ApplyReport) -> None:
        if decision.action in (Action.SUBMIT, Action.RESUBMIT):
            assert decision.manifest is not None
            await self._submit(decision.manifest, intent, report, decision.reason)
            return
        done = await self._cancel(intent, decision.reason, report)
        if not done:
            return
        if decision.action is Action.CANCEL:
            self._store.forget([intent.name])
            return
        assert decision.manifest is not None  # a replace: the new spec follows the cancel
        fresh = self._submit_intent(decision.manifest, intent, intent.revision)
        self._store.commit_intents([fresh])
        await self._submit(decision.manifest, fresh, report, decision.reason)

    async def _submit(
        self, manifest: Manifest, intent: Record, report: ApplyReport, reason: str,
        *, resolve_unknown: bool = True,
    ) -> None:
        assert intent.uid is not None
        spec = manifest.wire()
        spec["Annotations"] = [*spec.get("Annotations", []), *job_annotations(manifest, intent.uid)]
        fields = self._fields(intent, reason=reason)
        try:
            job_id = await self._requester.submit(spec)
        except OutcomeUnknown as exc:
            self._log.warning("job.submit_unknown", **fields, error=str(exc))
            report.count("submit.unknown")
            self._store.save([replace(intent, last_error=str(exc))])
            if resolve_unknown:  # once per pass: a second doubt waits for the next pass
                await self._resolve_records([(intent, manifest, Action.RESUBMIT)], report)
            return
        except RequesterError as exc:
            self._failed(intent, "submit", exc, report)
            return
        self._store.save([replace(intent, phase=Phase.ACTIVE, job_id=job_id, job_state="New",
                                  last_error=None)])
        self._log.info("job.submitted", **fields | {"job_id": job_id})
        report.count("submit.ok")

    async def _cancel(self, record: Record, reason: str, report: ApplyReport) -> bool:
        """Cancel a recorded job; True once the job is surely not running any more."""
        fields = self._fields(record, reason=reason)
        if record.job_id is None:
            return True
        try:
            state = await self._requester.cancel(record.job_id, reason)
        except (AlreadyTerminal, NotFound) as exc:
            self._log.info("job.cancel_skipped", **fields, detail=str(exc))
            report.count("cancel.skipped")
            return True
        except RequesterError as exc:
            self._failed(record, "cancel", exc, report)
            return False
        self._log.info("job.cancelled", **fields, job_state=state)
        report.count("cancel.ok")
        return True

    def _rollback(self, decision: Decision, report: ApplyReport) -> None:
        """No request was sent for this intent: put the record back as it was."""
        if decision.record is not None:
            self._store.save([decision.record])
        else:
            self._store.forget([decision.name])
        report.count(f"{decision.action}.not_started")

    def _failed(self, record: Record, what: str, exc: RequesterError, report: ApplyReport) -> None:
        now = self._clock()
        if what == "submit":
            # Only refusals and requests that never arrived reach here: no job exists.
            record = replace(record, phase=Phase.ERROR,
                             next_attempt_at=now + self._policy.backoff(record.attempts))
        self._store.save([replace(record, last_error=str(exc))])
        self._log.error("action.failed", **self._fields(record), action=what, error=str(exc),
                        retry_at=round(record.next_attempt_at, 3) or None)
        report.count(f"{what}.failed")
        report.errors.append(f"{record.name}: {what}: {exc}")

    def _forget(self, decisions: Sequence[Decision], report: ApplyReport) -> None:
        if not decisions:
            return
        self._store.forget(d.name for d in decisions)
        for decision in decisions:
            self._log.info("job.forgotten", name=decision.name, job_id=decision.job_id,
                           path=decision.path, reason=decision.reason)
            report.count("forget.ok")

    def _update(self, decisions: Sequence[Decision], report: ApplyReport) -> None:
        updated = [
            replace(d.record, path=d.manifest.path, on_remove=d.manifest.policy.on_remove)
            for d in decisions if d.record is not None and d.manifest is not None
        ]
        self._store.save(updated)
        for record, decision in zip(updated, decisions, strict=True):
            self._log.info("record.updated", **self._fields(record), reason=decision.reason)
            report.count("update.ok")

    # --- resolving intents without a job id -------------------------------------------------

    async def _resolve(self, decisions: Sequence[Decision], report: ApplyReport) -> None:
        pending: list[Pending] = []
        for d in decisions:
            assert d.record is not None and d.if_absent is not None  # the planner says both
            pending.append((d.record, d.manifest, d.if_absent))
        await self._resolve_records(pending, report)

    async def _resolve_records(self, pending: Iterable[Pending], report: ApplyReport) -> None:
        """Adopt the job of each intent by its uid; once its absence was confirmed
        ``confirmations`` times, do what the plan said should follow."""
        waiting = {item[0].uid: item for item in pending if item[0].uid}
        for attempt in range(self._confirmations):
            if attempt:
                await asyncio.sleep(self._resolve_delay * attempt)
            try:
                found = await jobs_by_uid(self._requester, list(waiting))
            except RequesterError as exc:
                for record, _, _ in waiting.values():
                    self._failed(record, "lookup", exc, report)
                return
            for uid, jobs in found.items():
                await self._adopt(waiting.pop(uid)[0], jobs, report)
            if not waiting:
                return
        for item in waiting.values():
            await self._after_confirmed_absence(*item, report)

    async def _adopt(self, record: Record, jobs: list[JobInfo], report: ApplyReport) -> None:
        keep, *extra = sorted(jobs, key=lambda j: (j.created_at, j.job_id))
        adopted = replace(record, phase=phase_of(keep.state), job_id=keep.job_id,
                          job_state=keep.state, last_error=None)
        self._store.save([adopted])
        self._log.info("job.adopted", **self._fields(adopted), job_state=keep.state,
                       reason=f"found by uid {record.uid}")
        report.count("resolve.adopted")
        for duplicate in extra:  # ours by uid, and one job is enough
            cancel = replace(adopted, job_id=duplicate.job_id)
            if await self._cancel(cancel, "duplicate of an adopted job", report):
                self._log.warning("job.duplicate_cancelled", **self._fields(cancel))

    async def _after_confirmed_absence(
        self, record: Record, manifest: Manifest | None, then: Action, report: ApplyReport
    ) -> None:
        reason = f"uid {record.uid} not found after {self._confirmations} lookups"
        if then is Action.FORGET:
            self._store.forget([record.name])
            self._log.info("job.forgotten", **self._fields(record), reason=reason)
            report.count("resolve.forgotten")
            return
        assert manifest is not None  # the planner resubmits only a manifest that is there
        intent = self._submit_intent(manifest, record, record.revision, uid=record.uid or "")
        self._store.commit_intents([intent])
        report.count("resolve.resubmitted")
        await self._submit(manifest, intent, report, reason + "; submitting again",
                           resolve_unknown=False)

    @staticmethod
    def _fields(record: Record, **extra: Any) -> dict[str, Any]:
        return {"name": record.name, "job_id": record.job_id, "path": record.path,
                "revision": record.revision, "uid": record.uid, **extra}
