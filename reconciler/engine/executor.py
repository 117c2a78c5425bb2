"""The executor: carries a :class:`~reconciler.domain.plan.Plan` out through a backend, durably.

Order of every remote effect (docs/operations-notes.md, Intent before effect):

1. commit an intent (a record in phase ``submitting`` with a fresh uid, or ``cancelling``);
   the intents of up to ``INTENT_BATCH`` actions share one durable commit;
2. send the request (the backend tags the job with the uid; the legacy API as the annotation
   ``reconciler-uid:<uid>``);
3. save the outcome (job id and state). The outcomes of submits that succeeded are saved a
   batch at a time (``OUTCOME_BATCH``, ``OUTCOME_DELAY``; any other write, and the end of the
   apply, saves them first): the intent already guards each, so one lost in a crash is found
   again by its uid (docs/performance.md, "Where a cold sync's time went").

A submit whose outcome is unknown (lost reply, 5xx) is resolved by finding its uid; an empty
answer is not proof of absence, so the lookup is repeated ``confirmations`` times before the
manifest is submitted again, under a fresh uid: a uid is never sent twice, so a late arrival of
the first request is a detectable duplicate (a second live job for the name), not a second job
with the same uid. A replace cancels, then submits, each step durable.

``apply`` never returns or raises while a request it started is still in flight: a failed
action (a store error while saving an outcome) stops new actions from starting, every started
one runs to its end (requests have timeouts), each failure is logged, and the first is raised
after that. A rejected credential (:class:`CredentialsRejected`, a configuration error) stops
the pass the same way, at its first occurrence: the intent of the refused action is given back
(nothing was created, so no error record and no backoff) and the error is raised, not logged
per action. A name with no record is looked up by its name before it is submitted
(a lost or rolled-back store), and live duplicates are looked for by name at the first apply
and, for a while, for every name whose submit was in doubt (docs/design.md, "No duplicate
jobs").

Decisions are the planner's; this module only carries them out and reports what happened as
events (``docs/events.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import structlog

from reconciler.backends.errors import (
    AlreadyTerminal,
    CredentialsRejected,
    NotFound,
    OutcomeUnknown,
    RequesterError,
)
from reconciler.domain.manifest import Manifest
from reconciler.domain.plan import Action, Decision, Plan, PlanPolicy, Scheduled
from reconciler.domain.records import Phase, Record, Run
from reconciler.domain.schedule import ScheduleState
from reconciler.events import iso_time
from reconciler.ports import Backend, JobInfo, JobPhase, Refusing, StateStore, UpdatesInPlace
from reconciler.store.errors import NotLeader, StoreError

INTENT_BATCH = 256
#: How long a name whose submit was in doubt is swept for duplicates: a request the requester
#: took in before our timeout can still be stored after it (docs/design.md).
SUSPECT_WINDOW = 600.0
#: Names per lookup when looking jobs up by name (like uids per poll request).
NAME_BATCH = 500
#: Outcomes of successful submits saved together (one transaction), or once the oldest has
#: waited this long (seconds): a transaction per outcome was a fifth of a cold sync's own CPU.
OUTCOME_BATCH = 128
OUTCOME_DELAY = 0.25

#: An intent in doubt, its manifest (None once removed), and what follows a confirmed absence.
Pending = tuple[Record, Manifest | None, Action]
#: What a job's phase means for its record. UNKNOWN (a state the backend could not place) is
#: kept live on purpose: the job exists and has not been seen to end, so it is polled again
#: rather than resubmitted or forgotten.
RECORD_PHASES = {
    JobPhase.RUNNING: Phase.ACTIVE,
    JobPhase.UNKNOWN: Phase.ACTIVE,
    JobPhase.COMPLETED: Phase.COMPLETED,
    JobPhase.FAILED: Phase.FAILED,
    JobPhase.CANCELLED: Phase.CANCELLED,
}


def _live(job: JobInfo) -> bool:
    """Running, or in a state the backend could not place (kept live, as above)."""
    return RECORD_PHASES[job.phase] is Phase.ACTIVE


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


class _IntentStays(Exception):
    """A credential refused after a request of this action may already have changed something
    (a PUT in doubt, the cancel before a replace's submit): its intent stays in the store for
    the next pass to resolve by uid, instead of being given back."""

    def __init__(self, rejected: CredentialsRejected) -> None:
        super().__init__(str(rejected))
        self.rejected = rejected


@dataclass
class _Run:
    """One apply's bookkeeping: its tasks, the failures met, the actions never started.

    A task leaves ``tasks`` when it ends and sets ``ended``, so waiting for room in the window
    of intents costs the same whatever the number of tasks in flight (``asyncio.wait`` on the
    whole set hooked and unhooked every task at each end: quadratic, docs/performance.md)."""

    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    failures: list[BaseException] = field(default_factory=list)
    not_started: list[Decision] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.ended.set()


class _Writes:
    """The executor's writes to the store, in the order it makes them. The outcomes of
    successful submits wait in ``pending`` (at most ``batch`` of them, or ``delay`` seconds)
    and are saved in one transaction; every other write saves them first, so a later write
    of a name is never overwritten by an earlier outcome.

    Why waiting is safe (docs/operations-notes.md, "Intent before effect"; docs/design.md,
    "Outcomes saved in batches"): each outcome's intent (the record in ``submitting`` with the
    uid the job carries) was committed durably before the request was sent. An outcome lost
    with the process leaves that intent, and the next pass resolves it by uid: the job is
    found and adopted, never submitted again. The price of a crash is at most ``batch``
    lookups by uid, batched like polls."""

    def __init__(self, store: StateStore, batch: int, delay: float) -> None:
        self._store = store
        self._batch = max(1, batch)
        self._delay = delay
        self.pending: dict[str, Record] = {}
        self._oldest = 0.0
        self._retired = False

    def retire(self) -> None:
        """Write nothing more: the waiting outcomes are dropped (their intents stay) and
        every later write raises :class:`NotLeader` (see :meth:`Executor.retire`)."""
        self._retired = True
        self.pending = {}

    def _check(self) -> None:
        if self._retired:
            raise NotLeader("the lease this pass began under was lost: it writes nothing "
                            "more (its intents are resolved by uid under the lease held now)")

    def outcome(self, record: Record) -> None:
        """Save a submit's outcome, now or with the next batch."""
        self._check()
        now = time.monotonic()
        if not self.pending:
            self._oldest = now
        self.pending[record.name] = record
        if len(self.pending) >= self._batch or now - self._oldest >= self._delay:
            self.flush()

    def flush(self) -> None:
        """Save the pending outcomes. Should the store refuse them, they are dropped: their
        intents stay, and the next pass resolves them by uid."""
        self._check()
        if self.pending:
            records, self.pending = list(self.pending.values()), {}
            self._store.save(records)

    def save(self, records: Sequence[Record]) -> None:
        self.flush()
        self._store.save(records)

    def commit_intents(
        self, records: Sequence[Record], *, schedules: Mapping[str, ScheduleState] | None = None,
        runs: Sequence[Run] = (), keep_runs: Mapping[str, int] | None = None,
    ) -> None:
        self.flush()
        self._store.commit_intents(records, schedules=schedules, runs=runs, keep_runs=keep_runs)

    def forget(self, names: Iterable[str], *, cancelled_at: float | None = None) -> None:
        self.flush()
        self._store.forget(names, cancelled_at=cancelled_at)

    def drop_schedules(self, names: Iterable[str]) -> None:
        self.flush()
        self._store.drop_schedules(names)


class Executor:
    def __init__(
        self,
        store: StateStore,
        backend: Backend,
        policy: PlanPolicy,
        *,
        concurrency: int = 8,
        confirmations: int = 3,
        resolve_delay: float = 0.5,
        clock: Callable[[], float] = time.time,
        outcome_batch: int = OUTCOME_BATCH,
        outcome_delay: float = OUTCOME_DELAY,
    ) -> None:
        #: Every write goes through _Writes, which keeps them in order (outcomes batched).
        self._store = _Writes(store, outcome_batch, outcome_delay)
        self._backend = backend
        self._policy = policy
        self._semaphore = asyncio.Semaphore(concurrency)
        self._confirmations = max(1, confirmations)
        self._resolve_delay = resolve_delay
        self._clock = clock
        self._log = structlog.get_logger("reconciler.engine.executor")
        #: Called with (done, total) as actions finish; the CLI draws a progress line with it.
        self.on_progress: Callable[[int, int], None] | None = None
        self._stopping = False
        #: Every recorded name is swept for duplicates once (at the first apply), then only
        #: the names whose submit was in doubt, until their time here runs out.
        self._swept = False
        self._suspects: dict[str, float] = {}
        #: Names without a record at the first ready pass not yet looked up by name (held or
        #: deferred then); None until that pass. See _look_up_by_name.
        self._unchecked: set[str] | None = None

    def stop(self) -> None:
        """Start no new action; those not started give their intents back (see _rollback)."""
        self._stopping = True

    def retire(self) -> None:
        """The lease this executor acted under is lost: start no new action and write
        nothing more, whatever the lease does next. A pass can outlive its lease (a request
        hanging while the renewal failed); should this daemon lead again before it ends, the
        fenced backend and store (docs/design.md, "High availability") would let it go on
        under the new lease, with a plan and waiting outcomes from before another leader
        acted: an outcome saved over that leader's newer record, a manifest it submitted sent
        again. The daemon builds a fresh executor for the new lease; this one's intents are
        resolved by uid there, as after a crash."""
        self._stopping = True
        self._store.retire()

    async def apply(self, plan: Plan) -> ApplyReport:
        """Carry the plan out. Returns (or raises the first failure) only once every request
        it started has ended, so no later pass can race a request of this one."""
        report = ApplyReport()
        run = _Run()
        try:
            await self._apply(plan, report, run)
        except Exception as exc:  # a store error between actions: after the drain, raised
            self._note_failure(run, None, exc)
        except asyncio.CancelledError:  # the shutdown deadline: requests in flight are cut
            await self._cancel_all(run)
            with contextlib.suppress(StoreError):  # else their intents are resolved by uid
                self._store.flush()
            raise
        try:
            await self._drain(run)
        except asyncio.CancelledError:
            # The deadline met in the drain (_drain cancelled the tasks): after SIGTERM no
            # action starts, so this is where it usually lands. Saved as above, not dropped.
            with contextlib.suppress(StoreError):
                self._store.flush()
            raise
        try:
            self._store.flush()  # the outcomes still waiting: none is left for a later pass
        except StoreError as exc:
            self._note_failure(run, None, exc)
        self._rollback(run, report)
        if run.failures:
            # A rejected credential first: it is what the caller must act on (stop, exit 78).
            rejected = [f for f in run.failures if isinstance(f, CredentialsRejected)]
            first = rejected[0] if rejected else run.failures[0]
            if len(run.failures) > 1 and not rejected:
                first.add_note(f"{len(run.failures) - 1} more actions failed in this pass "
                               "(each logged as action.failed)")
            raise first
        return report

    async def _apply(self, plan: Plan, report: ApplyReport, run: _Run) -> None:
        changes = plan.changes
        self._forget([d for d in changes if d.action is Action.FORGET], report)
        self._update([d for d in changes if d.action is Action.UPDATE], report)
        self._record_schedules(plan, report)
        actions = [d for d in changes if d.action not in (Action.FORGET, Action.UPDATE,
                                                          Action.RESOLVE, Action.SKIP)]
        actions = self._refuse(actions, report)
        actions = await self._look_up_by_name(plan, actions, report)
        await self._resolve([d for d in changes if d.action is Action.RESOLVE], report, run)
        report.total = len(actions)
        for start in range(0, len(actions), INTENT_BATCH):
            while len(run.tasks) >= INTENT_BATCH:
                # The tasks never raise (failures are kept in run), so nothing is dropped here.
                run.ended.clear()
                await run.ended.wait()
            if self._stopping or run.failures:
                break
            batch = actions[start : start + INTENT_BATCH]
            intents = [self._intent(d, plan.revision) for d in batch]
            # A slot's state commits with its run's intent: once recorded, the slot is never
            # decided again, and the intent's uid (the slot's) finds the run after a crash.
            fired = [(d, i) for d, i in zip(batch, intents, strict=True)
                     if self._fires_now(d)]
            self._commit_runs(intents, fired, report)
            for decision, intent in zip(batch, intents, strict=True):
                self._spawn(run, self._bounded(decision, intent, report, run), decision.name)

    def _spawn(self, run: _Run, action: Coroutine[Any, Any, None], name: str) -> None:
        async def kept() -> None:
            try:
                await action
            except Exception as exc:
                self._note_failure(run, name, exc)

        run.add(asyncio.create_task(kept()))

    def _note_failure(self, run: _Run, name: str | None, exc: Exception) -> None:
        if isinstance(exc, _IntentStays):
            exc = exc.rejected
        run.failures.append(exc)
        if isinstance(exc, CredentialsRejected):
            return  # one configuration error, raised by apply and reported once by its caller
        if name is not None:
            self._suspect(name)
        self._log.error("action.failed", name=name, action="apply", error=str(exc),
                        reason="an action failed; no new action starts in this pass, those "
                               "in flight finish first")

    async def _drain(self, run: _Run) -> None:
        """Wait for every task; if the pass itself is cancelled (shutdown deadline), cancel
        them and still wait for their ends."""
        while run.tasks:
            try:
                await asyncio.wait(run.tasks)
            except asyncio.CancelledError:
                await self._cancel_all(run)
                raise
            run.tasks = {task for task in run.tasks if not task.done()}

    @staticmethod
    async def _cancel_all(run: _Run) -> None:
        for task in run.tasks:
            task.cancel()
        await asyncio.gather(*run.tasks, return_exceptions=True)
        run.tasks.clear()

    def _suspect(self, name: str) -> None:
        self._suspects[name] = self._clock() + SUSPECT_WINDOW

    # --- intents ------------------------------------------------------------------------

    def _fires_now(self, decision: Decision) -> bool:
        """A slot whose run's intent is the one committed now: a submit, or a replace done in
        place (no cancel first). A cancel-then-submit replace records its slot later, with the
        new run's intent (_carry_out)."""
        return _fires(decision) and (decision.action is Action.SUBMIT
                                     or self._in_place(decision))

    def _in_place(self, decision: Decision) -> bool:
        """A replace the backend does as one update of the same job (no cancel first)."""
        return (decision.action is Action.REPLACE and decision.manifest is not None
                and isinstance(self._backend, UpdatesInPlace) and self._backend.updates_in_place)

    def _intent(self, decision: Decision, revision: str | None) -> Record:
        record = decision.record
        if decision.action in (Action.SUBMIT, Action.RESUBMIT):
            assert decision.manifest is not None
            return self._submit_intent(decision.manifest, record, revision,
                                       uid=_slot_uid(decision))
        if self._in_place(decision):
            assert decision.manifest is not None and record is not None
            # The old job id stays in the intent: it is the job the update lands on, and the
            # one to stop should the manifest go away while the update is in doubt.
            return replace(self._submit_intent(decision.manifest, record, revision,
                                               uid=_slot_uid(decision)),
                           job_id=record.job_id)
        assert record is not None  # cancel and replace act on a recorded job
        return replace(record, phase=Phase.CANCELLING, revision=revision or record.revision)

    def _submit_intent(
        self, manifest: Manifest, record: Record | None, revision: str | None,
        *, new_attempt: bool = True, uid: str | None = None,
    ) -> Record:
        """A fresh uid, always: a uid is never submitted twice (docs/design.md). A slot's run
        is first submitted under the slot's uid (``schedule.run_uid``), itself used once."""
        same_spec = record is not None and record.spec_hash == manifest.spec_hash
        return Record(
            name=manifest.name,
            phase=Phase.SUBMITTING,
            spec_hash=manifest.spec_hash,
            path=manifest.path,
            uid=uid or secrets.token_hex(16),
            attempts=(record.attempts if record and same_spec else 0) + int(new_attempt),
            last_error=record.last_error if record else None,
            on_remove=manifest.policy.on_remove,
            revision=revision,
        )

    # --- schedules ----------------------------------------------------------------------

    def _record_schedules(self, plan: Plan, report: ApplyReport) -> None:
        """Record what the plan decided of schedules without a run (a schedule first seen,
        slots skipped or missed) and forget the schedules of names no longer scheduled."""
        if plan.schedule_updates:
            self._store.commit_intents([], schedules=plan.schedule_updates)
        if plan.schedule_drops:
            self._store.drop_schedules(plan.schedule_drops)
        for d in plan.by_action(Action.SKIP):
            s = d.scheduled
            if s is None or d.name not in plan.schedule_updates:
                continue
            slot = s.slot
            fields = {"name": d.name, "path": d.path, "reason": d.reason,
                      "next_run": _iso(slot.next_run)}
            if slot.action == "skip":
                self._log.info("schedule.skipped", **fields, slot=_iso(slot.slot),
                               job_id=d.job_id, missed=len(slot.missed))
                report.count("schedule.skipped")
            else:
                self._log.warning("schedule.missed", **fields, slot=_iso(slot.missed[0]),
                                  count=len(slot.missed), more=slot.missed_more)
                report.count("schedule.missed")

    def _commit_runs(self, intents: Sequence[Record],
                     fired: Sequence[tuple[Decision, Record]], report: ApplyReport) -> None:
        """Commit intents; with each fired slot's run, its schedule state (one transaction)."""
        states: dict[str, ScheduleState] = {}
        runs: list[Run] = []
        keep: dict[str, int] = {}
        for decision, intent in fired:
            s = decision.scheduled
            assert s is not None and s.slot.slot is not None and intent.uid is not None
            states[decision.name] = s.after
            runs.append(Run(decision.name, s.slot.slot.timestamp(), intent.uid))
            keep[decision.name] = s.keep_runs
        self._store.commit_intents(intents, schedules=states, runs=runs, keep_runs=keep)
        for decision, intent in fired:
            s = decision.scheduled
            assert s is not None
            self._log.info("schedule.fired", name=decision.name, path=decision.path,
                           uid=intent.uid, slot=_iso(s.slot.slot), reason=decision.reason,
                           missed=len(s.slot.missed), next_run=_iso(s.slot.next_run),
                           previous_job_id=decision.job_id)
            report.count("schedule.fired")

    # --- actions ------------------------------------------------------------------------

    async def _bounded(
        self, decision: Decision, intent: Record, report: ApplyReport, run: _Run
    ) -> None:
        async with self._semaphore:
            if self._stopping or run.failures:
                run.not_started.append(decision)
                return
            try:
                await self._carry_out(decision, intent, report)
            except CredentialsRejected:
                # Refused before anything changed (no job created, stopped or updated): the
                # intent is given back like those of actions never started, so no error
                # record and no backoff; once the credential is fixed it is sent at once.
                run.not_started.append(decision)
                raise
        report.done += 1
        if self.on_progress is not None:
            self.on_progress(report.done, report.total)

    async def _carry_out(self, decision: Decision, intent: Record, report: ApplyReport) -> None:
        if decision.action in (Action.SUBMIT, Action.RESUBMIT):
            assert decision.manifest is not None
            await self._submit(decision.manifest, intent, report, decision.reason)
            return
        if intent.phase is Phase.SUBMITTING:  # a replace done in place (see _intent)
            assert decision.manifest is not None and decision.record is not None
            await self._submit(decision.manifest, intent, report,
                               "spec changed: the job is updated in place (same id, next "
                               "version)", kept=decision.record)
            return
        done = await self._cancel(intent, decision.reason, report)
        if not done:
            return
        if decision.action is Action.CANCEL:  # counted by the mass-cancel guard's window
            self._store.forget([intent.name], cancelled_at=self._clock())
            return
        assert decision.manifest is not None  # a replace: the new spec follows the cancel
        fresh = self._submit_intent(decision.manifest, intent, intent.revision,
                                    uid=_slot_uid(decision))
        # concurrency: replace records the slot only now, with the new run's intent: a crash
        # after the cancel leaves the slot due, and the next pass fires it again.
        self._commit_runs([fresh], [(decision, fresh)] if _fires(decision) else [], report)
        try:
            await self._submit(decision.manifest, fresh, report, decision.reason)
        except CredentialsRejected as exc:  # the old job is stopped: the new intent stays
            raise _IntentStays(exc) from exc

    async def _submit(
        self, manifest: Manifest, intent: Record, report: ApplyReport, reason: str,
        *, resolve_unknown: bool = True, kept: Record | None = None,
    ) -> None:
        """``kept``: the record of the job an in-place update changes; a refused update leaves
        that job (and its record) as they were."""
        assert intent.uid is not None
        fields = self._fields(intent, reason=reason)
        try:
            job = await self._backend.submit(manifest, intent.uid)
        except OutcomeUnknown as exc:
            self._suspect(intent.name)  # it may still be stored later: watch for a duplicate
            self._log.warning("job.submit_unknown", **fields, error=str(exc))
            report.count("submit.unknown")
            self._store.save([replace(intent, last_error=str(exc))])
            if resolve_unknown:  # once per pass: a second doubt waits for the next pass
                try:
                    await self._resolve_records([(intent, manifest, Action.RESUBMIT)], report)
                except CredentialsRejected as rejected:  # in doubt: never given back
                    raise _IntentStays(rejected) from rejected
            return
        except CredentialsRejected:
            raise  # a configuration error, not this job's: no error record (see apply)
        except RequesterError as exc:
            if kept is not None:
                self._failed(kept, "update", exc, report)
                return
            self._failed(intent, "submit", exc, report)
            return
        # A PUT's reply has no version: a backend may know it (looked up + 1) or leave it to
        # observe (docs/design.md, "The orchestrator backend").
        self._store.outcome(intent.evolve(phase=Phase.ACTIVE, job_id=job.job_id,
                                          job_state=job.state, last_error=None,
                                          job_version=job.version,
                                          job_message=job.message or None))
        self._log.info("job.submitted", **fields | {"job_id": job.job_id})
        report.count("submit.ok")
        if kept is not None and kept.job_id and job.job_id != kept.job_id:
            await self._stop_superseded(kept, job.job_id, report)

    async def _stop_superseded(self, kept: Record, new_id: str, report: ApplyReport) -> None:
        """An update in place that created a job instead: the server's name index did not
        know the old one (a job made before Bacalhau v1.8, docs/wire-orchestrator.md 4.4, e.g.
        by this daemon in label mode before an upgrade). Left alone, both would run. The
        record follows the new job now, so should the stop fail, no record names the old one:
        the name becomes a suspect, and the duplicate sweep of the next applies (for
        SUSPECT_WINDOW) finds it live beside the recorded job and stops it."""
        reason = (f"superseded by job {new_id}: the update by name created a new job (the "
                  "server's name index does not know this one)")
        try:
            await self._cancel(kept, reason, report, unrecorded="superseded job")
        except CredentialsRejected as exc:
            # Stop the pass as for any refused credential; the new job's record is saved, so
            # nothing is given back, and the sweep stops the old job once the key is fixed.
            self._suspect(kept.name)
            raise _IntentStays(exc) from exc

    async def _cancel(self, record: Record, reason: str, report: ApplyReport,
                      *, unrecorded: str | None = None) -> bool:
        """Cancel a recorded job; True once the job is surely not running any more.
        ``unrecorded`` (what the job is: a duplicate, a superseded job): ``record`` is the
        name's record with a job id the store does not keep, not a record to save: a failure
        leaves the store alone (saved, it recorded that job in place of the kept one, which
        the next sweep then cancelled) and makes the name a suspect, so the sweep of the
        next passes tries again."""
        fields = self._fields(record, reason=reason)
        if record.job_id is None:
            return True
        try:
            state = await self._backend.stop(record.job_id, reason)
        except (AlreadyTerminal, NotFound) as exc:
            self._log.info("job.cancel_skipped", **fields, detail=str(exc))
            report.count("cancel.skipped")
            return True
        except CredentialsRejected:
            raise  # nothing was stopped; a configuration error (see apply)
        except RequesterError as exc:
            if unrecorded is not None:
                self._suspect(record.name)
                self._log.error("action.failed", **fields, action="cancel", error=str(exc),
                                retry_at=None)
                report.count("cancel.failed")
                report.errors.append(f"{record.name}: cancel of {unrecorded} "
                                     f"{record.job_id}: {exc}")
                return False
            self._failed(record, "cancel", exc, report)
            return False
        self._log.info("job.cancelled", **fields, job_state=state)
        report.count("cancel.ok")
        return True

    def _rollback(self, run: _Run, report: ApplyReport) -> None:
        """No request was sent for these intents: put their records back as they were. If
        the store cannot take it (it just failed), the intents stay and the next pass
        resolves them by uid: none was sent, so each is submitted once, under a fresh uid."""
        # A fired slot's intent stays: its state and run committed with it, so giving it back
        # would lose the slot; the next pass resolves it by uid and submits it once.
        given_back = [d for d in run.not_started if not self._fires_now(d)]
        if not given_back:
            return
        try:
            self._store.save([d.record for d in given_back if d.record is not None])
            self._store.forget([d.name for d in given_back if d.record is None])
        except StoreError as exc:
            if not run.failures:
                run.failures.append(exc)
            return
        for decision in given_back:
            report.count(f"{decision.action}.not_started")

    def _failed(self, record: Record, what: str, exc: RequesterError, report: ApplyReport) -> None:
        now = self._clock()
        if what == "submit":
            # Only refusals and requests that never arrived reach here: no job exists.
            record = replace(record, phase=Phase.ERROR,
                             next_attempt_at=now + self._policy.backoff(record.attempts))
        elif what in ("update", "cancel"):
            # A refused update in place leaves the old job running under its record, and a
            # failed cancel leaves its record cancelling; the planner waits for
            # next_attempt_at before it tries again. Without it each was sent again at every
            # pass, and the daemon follows a pass with changes by another a second later: one
            # refused PUT or failed DELETE a second, per job, for as long as it fails. The
            # delay doubles from the previous one (no count is kept for these), from
            # backoff_base up to backoff_max.
            previous = (record.next_attempt_at - record.updated_at
                        if record.last_error and record.next_attempt_at > record.updated_at > 0
                        else 0.0)
            delay = min(self._policy.backoff_max,
                        max(self._policy.backoff(1), 2 * previous))
            record = replace(record, next_attempt_at=now + delay)
        self._store.save([replace(record, last_error=str(exc))])
        self._log.error("action.failed", **self._fields(record), action=what, error=str(exc),
                        retry_at=iso_time(record.next_attempt_at))
        report.count(f"{what}.failed")
        report.errors.append(f"{record.name}: {what}: {exc}")

    def _refuse(self, actions: list[Decision], report: ApplyReport) -> list[Decision]:
        """Actions whose manifest the backend says it cannot run (the other API's form) are
        not carried out: nothing is sent and nothing cancelled, the record keeps its job and
        says why (a manifest without a record gets an error record, retried after backoff).
        Returns the actions left."""
        if not isinstance(self._backend, Refusing):
            return actions
        left: list[Decision] = []
        for decision in actions:
            manifest = decision.manifest
            why = (self._backend.refusal(manifest) if manifest is not None
                   and decision.action in (Action.SUBMIT, Action.RESUBMIT, Action.REPLACE)
                   else None)
            if why is None:
                left.append(decision)
                continue
            assert manifest is not None
            record = decision.record
            if record is None or record.phase not in (Phase.ACTIVE, Phase.CANCELLING):
                record = replace(self._submit_intent(manifest, record, None), phase=Phase.ERROR,
                                 uid=None, next_attempt_at=self._clock()
                                 + self._policy.backoff(record.attempts if record else 1))
            self._store.save([replace(record, last_error=why)])
            self._log.error("action.failed", **self._fields(record), action="refused",
                            error=why, reason="the backend cannot run this manifest; nothing "
                            "was sent or cancelled")
            report.count("refused")
            report.errors.append(f"{decision.name}: {why}")
        return left

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

    # --- looking up jobs by name: a lost store, and duplicates ------------------------------

    async def _look_up_by_name(
        self, plan: Plan, actions: list[Decision], report: ApplyReport
    ) -> list[Decision]:
        """Before a name with no record is submitted, adopt the newest live job of ours that
        carries its name (the store was lost or rolled back); extra live jobs of a name are
        duplicates and are cancelled, the recorded one kept. Returns the actions left.

        Records go missing only while the store is closed (the open store is ours alone), so
        only names that had no record at the first ready pass are asked about (those held or
        deferred then are asked when they are submitted), and suspects: a manifest added later
        is submitted at once, without a lookup's round trip."""
        now = self._clock()
        self._suspects = {n: until for n, until in self._suspects.items() if until > now}
        unrecorded = {d.name: d for d in actions
                      if d.action is Action.SUBMIT and d.record is None
                      and (self._unchecked is None or d.name in self._unchecked
                           or d.name in self._suspects)}
        asked = set(unrecorded)
        recorded: dict[str, Record] = {}
        if not self._swept or self._suspects:  # else skip the walk: a no-op pass stays cheap
            # concurrency: allow keeps earlier runs of a name live on purpose: not duplicates.
            recorded = {d.name: d.record for d in plan.decisions
                        if d.record is not None and d.record.phase is not Phase.SUBMITTING
                        and not _overlaps(d)}
        swept = set(recorded) if not self._swept else set(self._suspects) & set(recorded)
        names = sorted(set(unrecorded) | swept)
        unknown: set[str] = set()
        # A batch at a time: at start every recorded name is asked, and each reply holds the
        # names' whole history (replaced and ended jobs), so only one batch is held at once.
        for start in range(0, len(names), NAME_BATCH):
            try:
                found = await self._backend.find_by_name(names[start : start + NAME_BATCH])
            except CredentialsRejected:
                raise
            except RequesterError as exc:
                # Not knowing whether a job exists, submit nothing new for these names now.
                unknown = set(names[start:]) & set(unrecorded)
                for name in sorted(unknown):
                    report.count("lookup.failed")
                    report.errors.append(f"{name}: lookup: {exc}")
                self._log.error("action.failed", name=None, action="lookup", error=str(exc),
                                count=len(names) - start, reason="jobs by name could not be "
                                "listed; names without a record wait for the next pass")
                break
            for name, jobs in found.items():
                live = [j for j in jobs if _live(j)]
                if not live:
                    continue
                if name in unrecorded:
                    await self._adopt_by_name(unrecorded.pop(name), live, report)
                elif name in recorded:
                    record = recorded[name]
                    extra = [j for j in live if j.job_id != record.job_id]
                    await self._cancel_duplicates(record, extra, "the recorded job is kept",
                                                  report)
        else:
            self._swept = True
            if self._unchecked is not None:
                self._unchecked -= asked
            elif plan.ready:
                self._unchecked = {d.name for d in plan.decisions if d.record is None} - asked
        return [d for d in actions if d.name not in asked
                or (d.name in unrecorded and d.name not in unknown)]

    async def _adopt_by_name(
        self, decision: Decision, live: list[JobInfo], report: ApplyReport
    ) -> None:
        manifest = decision.manifest
        assert manifest is not None
        keep, *extra = sorted(live, key=lambda j: (j.created_at, j.job_id), reverse=True)
        tag = keep.spec_hash
        # A job of an older spec is recorded with its own (short) hash: the next pass
        # replaces it, as it would any live job whose manifest changed.
        spec_hash = manifest.spec_hash if tag and manifest.spec_hash.startswith(tag) else tag
        adopted = Record(name=manifest.name, phase=RECORD_PHASES[keep.phase], spec_hash=spec_hash,
                         path=manifest.path, job_id=keep.job_id,
                         uid=keep.uid or None, job_state=keep.state,
                         attempts=1, on_remove=manifest.policy.on_remove,
                         job_version=keep.version, job_message=keep.message or None)
        self._store.save([adopted])
        self._log.info("job.adopted", **self._fields(adopted), job_state=keep.state,
                       reason="no record; found by its name (the store was lost or rolled "
                              "back?)")
        report.count("submit.adopted")
        await self._cancel_duplicates(adopted, extra, "the newest job is kept", report)

    async def _cancel_duplicates(
        self, kept: Record, extra: Sequence[JobInfo], why: str, report: ApplyReport
    ) -> None:
        for duplicate in extra:  # ours by annotation, and one live job per name is enough
            cancel = replace(kept, job_id=duplicate.job_id, uid=duplicate.uid or None)
            reason = f"a second live job for {kept.name} ({why}: {kept.job_id})"
            if await self._cancel(cancel, reason, report, unrecorded="duplicate"):
                self._log.warning("job.duplicate_cancelled", **self._fields(cancel),
                                  kept_job_id=kept.job_id, reason=reason)
                report.count("duplicate.cancelled")

    # --- resolving intents without a job id -------------------------------------------------

    async def _resolve(
        self, decisions: Sequence[Decision], report: ApplyReport, run: _Run
    ) -> None:
        pending: list[Pending] = []
        for d in decisions:
            assert d.record is not None and d.if_absent is not None  # the planner says both
            pending.append((d.record, d.manifest, d.if_absent))
        await self._resolve_records(pending, report, run)
        await self._drain(run)  # resolved before anything else is sent

    async def _resolve_records(
        self, pending: Iterable[Pending], report: ApplyReport, run: _Run | None = None
    ) -> None:
        """Adopt the job of each intent by its uid; once its absence was confirmed
        ``confirmations`` times, do what the plan said should follow. With ``run``, the
        adoptions and the submits that follow run concurrently (bounded), as tasks of it."""
        waiting = {item[0].uid: item for item in pending if item[0].uid}
        for attempt in range(self._confirmations):
            if attempt:
                await asyncio.sleep(self._resolve_delay * attempt)
            try:
                found = await self._backend.find(list(waiting))
            except CredentialsRejected:
                raise
            except RequesterError as exc:
                for record, _, _ in waiting.values():
                    self._failed(record, "lookup", exc, report)
                return
            for uid, jobs in found.items():
                record = waiting.pop(uid)[0]
                await self._then(run, self._adopt(record, jobs, report), record.name)
            if not waiting:
                return
        for item in waiting.values():
            await self._then(run, self._after_confirmed_absence(*item, report), item[0].name)

    async def _then(
        self, run: _Run | None, step: Coroutine[Any, Any, None], name: str
    ) -> None:
        if run is None:
            await step
            return

        async def bounded() -> None:
            async with self._semaphore:
                if any(isinstance(f, CredentialsRejected) for f in run.failures):
                    # Credentials refused meanwhile: send nothing more; the intent stays and
                    # the next pass resolves it by uid again.
                    step.close()
                    return
                await step

        self._spawn(run, bounded(), name)

    async def _adopt(self, record: Record, jobs: list[JobInfo], report: ApplyReport) -> None:
        keep, *extra = sorted(jobs, key=lambda j: (j.created_at, j.job_id))
        adopted = replace(record, phase=RECORD_PHASES[keep.phase], job_id=keep.job_id,
                          job_state=keep.state, last_error=None, job_version=keep.version,
                          job_message=keep.message or None)
        self._store.save([adopted])
        self._log.info("job.adopted", **self._fields(adopted), job_state=keep.state,
                       reason=f"found by uid {record.uid}")
        report.count("resolve.adopted")
        await self._cancel_duplicates(adopted, extra, "the first job is kept", report)
        if record.job_id and keep.job_id != record.job_id:
            # An update in place (its intent keeps the job it lands on) that created a job
            # instead: stopped as _submit stops it. Not left to the sweep: after a restart the
            # first sweep skips names in submitting, and later ones sweep only suspects.
            await self._stop_superseded(record, keep.job_id, report)

    async def _after_confirmed_absence(
        self, record: Record, manifest: Manifest | None, then: Action, report: ApplyReport
    ) -> None:
        reason = f"uid {record.uid} not found after {self._confirmations} lookups"
        self._suspect(record.name)  # should that request be stored late, it is a duplicate
        if then is Action.FORGET:
            # An in-place update in doubt: its job is still there, so it is stopped first.
            if record.job_id is not None and not await self._cancel(record, "manifest removed",
                                                                    report):
                return
            self._store.forget([record.name])
            self._log.info("job.forgotten", **self._fields(record), reason=reason)
            report.count("resolve.forgotten")
            return
        assert manifest is not None  # the planner resubmits only a manifest that is there
        # An update in place keeps the job it lands on (see _intent): dropped here, a second
        # doubt (or a kill -9 before this PUT) followed by the manifest's removal forgot the
        # record without stopping that job, which ran on with no record.
        intent = replace(self._submit_intent(manifest, record, record.revision,
                                             new_attempt=False), job_id=record.job_id)
        self._store.commit_intents([intent])
        report.count("resolve.resubmitted")
        # Still an update of that job: refused, it is recorded as live again (its spec
        # unknown here, so "" makes the planner update it after the backoff), not as an
        # error record without a live job, which a removal would forget without a stop; and
        # should the PUT create a new job, the old one is stopped, as in _carry_out.
        kept = (replace(record, phase=Phase.ACTIVE, spec_hash="", job_state=None)
                if record.job_id is not None else None)
        await self._submit(manifest, intent, report,
                           reason + f"; submitting again under a fresh uid {intent.uid}",
                           resolve_unknown=False, kept=kept)

    @staticmethod
    def _fields(record: Record, **extra: Any) -> dict[str, Any]:
        return {"name": record.name, "job_id": record.job_id, "path": record.path,
                "revision": record.revision, "uid": record.uid, **extra}


def _overlaps(decision: Decision) -> bool:
    manifest = decision.manifest
    return (manifest is not None and manifest.policy.schedule is not None
            and manifest.policy.concurrency == "allow")


def _fires(decision: Decision) -> bool:
    return decision.scheduled is not None and decision.scheduled.fires


def _slot_uid(decision: Decision) -> str | None:
    s: Scheduled | None = decision.scheduled
    return s.slot.uid if s is not None and s.fires else None


def _iso(instant: datetime | None) -> str | None:
    return instant.isoformat() if instant is not None else None
