"""In-memory fakes of the store and the requester, for engine tests that need only its logic.

The engine (``reconciler.engine``) runs against these in-process, the way kopf and httpx test
their cores: a pass takes milliseconds instead of a CLI process and a dev requester on a port.
The few end-to-end runs that prove the real pieces fit (SQLite, httpx, the dev requester, the
daemon process) stay in ``test_reconcile_e2e.py`` and ``test_daemon.py``.

:class:`FakeRequester` keeps the requester's rules that the engine depends on
(docs/wire-legacy.md): server-made ids, tag filters on list, idempotent cancel, cancel of a
finished job refused as already terminal, not-found for unknown ids. Faults are scripted per
operation; latency is an ``asyncio.sleep`` per call.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from reconciler.backends.legacy import (
    AlreadyTerminal,
    NotFound,
    OutcomeUnknown,
    RequesterError,
    WireJob,
)
from reconciler.backends.legacy_jobs import LegacyBackend
from reconciler.domain.records import Approval, Record, Run, StoredPolicy
from reconciler.domain.schedule import ScheduleState
from reconciler.ports import Backend, StateStore

Operation = Literal["submit", "cancel", "list", "states"]
#: What a scripted submit fault does: ``after-store`` keeps the job and loses the reply (a 500
#: after the store, a dropped connection, a late reply); ``before-store`` creates nothing.
SubmitFault = Literal["after-store", "before-store"]
TERMINAL = frozenset({"Completed", "Error", "Cancelled"})


class FakeStore:
    """The part of :class:`reconciler.store.sqlite.Store` the engine uses, in a dict.

    ``intent_commits`` counts durable commits, so a test can check that intents are batched.
    """

    def __init__(self, records: Iterable[Record] = ()) -> None:
        self.rows: dict[str, Record] = {r.name: r for r in records}
        self.stored_policies: dict[str, StoredPolicy] = {}
        self.stored_approvals: dict[str, Approval] = {}
        self.views: dict[str, dict[str, str]] = {}
        self.cancels: list[float] = []
        self.schedule_states: dict[str, ScheduleState] = {}
        self.stored_runs: list[Run] = []
        self.intent_commits = 0
        #: Rows written by ``save`` (outcomes): a poll that finds nothing new writes none.
        self.rows_saved = 0

    def as_store(self) -> StateStore:
        """This fake as the engine's store protocol (mypy checks that it is one)."""
        return self

    @property
    def location(self) -> str:
        return "memory"

    def check(self) -> str:
        return "ok"

    def records(self) -> list[Record]:
        return [self.rows[name] for name in sorted(self.rows)]

    def commit_intents(
        self, records: Sequence[Record], *, schedules: Mapping[str, ScheduleState] | None = None,
        runs: Sequence[Run] = (), keep_runs: Mapping[str, int] | None = None,
    ) -> None:
        if records or schedules or runs:
            self.intent_commits += 1
        self.save(records)
        self.schedule_states.update(schedules or {})
        for run in runs:
            previous = [r for r in self.stored_runs if r.name == run.name]
            record = self.rows.get(run.name)
            for old in previous:  # the newest run so far ends as its record ended
                if old.outcome == "current":
                    self.stored_runs[self.stored_runs.index(old)] = replace(
                        old, outcome=str(record.phase) if record else "unknown",
                        job_id=record.job_id if record else old.job_id)
            self.stored_runs.append(run)
            keep = (keep_runs or {}).get(run.name)
            if keep is not None:
                mine = sorted((r for r in self.stored_runs if r.name == run.name),
                              key=lambda r: r.slot, reverse=True)
                for dropped in mine[keep + 1:]:
                    self.stored_runs.remove(dropped)

    def schedules(self) -> dict[str, ScheduleState]:
        return dict(self.schedule_states)

    def runs(self, name: str | None = None) -> list[Run]:
        return sorted((r for r in self.stored_runs if name is None or r.name == name),
                      key=lambda r: (r.name, -r.slot))

    def drop_schedules(self, names: Iterable[str]) -> None:
        for name in list(names):
            self.schedule_states.pop(name, None)
            self.stored_runs = [r for r in self.stored_runs if r.name != name]

    def save(self, records: Sequence[Record]) -> None:
        self.rows_saved += len(records)
        for record in records:
            self.rows[record.name] = record

    def forget(self, names: Iterable[str], *, cancelled_at: float | None = None) -> None:
        for name in names:
            self.rows.pop(name, None)
            if cancelled_at is not None:
                self.cancels.append(cancelled_at)

    def recent_cancels(self, since: float) -> int:
        return sum(1 for at in self.cancels if at >= since)

    def clear_cancels(self) -> None:
        self.cancels.clear()

    def view(self, spec_hash: str) -> dict[str, str] | None:
        return self.views.get(spec_hash)

    def save_views(self, views: Mapping[str, Mapping[str, str]]) -> None:
        self.views.update((h, dict(v)) for h, v in views.items())

    def approvals(self, state: str | None = None) -> list[Approval]:
        return [a for a in self.stored_approvals.values() if state is None or a.state == state]

    def approval(self, job_id: str) -> Approval | None:
        return self.stored_approvals.get(job_id)

    def save_approval(self, approval: Approval) -> None:
        self.stored_approvals[approval.job_id] = approval

    def approval_count(self) -> int:
        return len(self.stored_approvals)

    def prune_approvals(self, *, before: float, keep: int) -> int:
        return 0

    def policies(self) -> list[StoredPolicy]:
        return [self.stored_policies[name] for name in sorted(self.stored_policies)]

    def save_policies(self, policies: Sequence[StoredPolicy]) -> None:
        self.stored_policies.update((p.name, p) for p in policies)

    def drop_policies(self, names: Iterable[str]) -> None:
        for name in names:
            self.stored_policies.pop(name, None)

    def close(self) -> None:
        pass


@dataclass
class FakeJob:
    job_id: str
    spec: dict[str, Any]
    state: str = "New"
    message: str = ""  # an execution's Status, as the legacy list carries it

    @property
    def annotations(self) -> tuple[str, ...]:
        return tuple(self.spec.get("Annotations") or ())


@dataclass
class FakeRequester:
    """A requester in memory with the legacy wire client's shape
    (``reconciler.backends.legacy_jobs.LegacyClient``); :meth:`backend` puts the legacy backend
    in front of it, as the wiring does with the real client.

    Script faults with :meth:`fail_submits` (the next N submits), :attr:`faults` (an error to
    raise on the next call of an operation) and :attr:`empty_lists` (lists that find nothing,
    as a requester whose store errors are swallowed does). :attr:`calls` counts every call.
    """

    client: str = "fake-client"
    latency: float = 0.0
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    faults: dict[Operation, list[RequesterError]] = field(default_factory=dict)
    submit_faults: list[SubmitFault] = field(default_factory=list)
    empty_lists: int = 0
    submitted: int = 0

    @property
    def client_id(self) -> str:
        return self.client

    def backend(self) -> Backend:
        return LegacyBackend(self)

    def fail_submits(self, count: int, how: SubmitFault = "after-store") -> None:
        self.submit_faults += [how] * count

    def fail_next(self, operation: Operation, error: RequesterError, times: int = 1) -> None:
        self.faults.setdefault(operation, []).extend([error] * times)

    async def _enter(self, operation: Operation) -> None:
        self.calls[operation] += 1
        if self.latency:
            await asyncio.sleep(self.latency)
        pending = self.faults.get(operation)
        if pending:
            raise pending.pop(0)

    async def submit(self, spec: Mapping[str, Any]) -> str:
        await self._enter("submit")
        fault = self.submit_faults.pop(0) if self.submit_faults else None
        if fault == "before-store":
            raise OutcomeUnknown("submit: fake connection reset")
        self.submitted += 1
        job = FakeJob(f"job-{self.submitted:06d}", dict(spec))
        self.jobs[job.job_id] = job
        if fault == "after-store":
            raise OutcomeUnknown("submit: fake 500 after store", status=500, job_id=None)
        return job.job_id

    async def cancel(self, job_id: str, reason: str) -> str:
        await self._enter("cancel")
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"cancel: HTTP 404: missing job: Job not found. ID: {job_id}",
                           status=404)
        if job.state in ("Completed", "Error"):
            raise AlreadyTerminal(f"cancel: HTTP 500: job in terminal state {job.state}",
                                  status=500)
        job.state = "Cancelled"
        return job.state

    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[WireJob]:
        await self._enter("list")
        if self.empty_lists > 0:
            self.empty_lists -= 1
            return []
        if job_id is not None and job_id not in self.jobs:
            raise NotFound(f"list: HTTP 400: Job not found. ID: {job_id}", status=400)
        wanted = set(include_tags)
        return [self._info(job) for job in self.jobs.values()
                if (job_id is None or job.job_id == job_id)
                and (not wanted or wanted.intersection(job.annotations))]

    async def state(self, job_id: str) -> str:
        await self._enter("states")
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"states: HTTP 500: Job not found. ID: {job_id}", status=500)
        return job.state

    # --- what a test inspects or changes -------------------------------------------------

    def _info(self, job: FakeJob) -> WireJob:
        return WireJob(job.job_id, job.state, self.client, job.annotations,
                       message=job.message)

    def named(self, name: str) -> list[FakeJob]:
        """Jobs of one manifest name, oldest first (by our manifest annotation)."""
        tag = f"reconciler-manifest:{name}"
        return [job for job in self.jobs.values() if tag in job.annotations]

    def states(self, name: str) -> list[str]:
        return sorted(job.state for job in self.named(name))

    def finish(self, job_id: str, state: str, message: str = "") -> None:
        """The job ends on the network (Completed, Error) or is cancelled by someone else;
        ``message``: what its execution's Status says."""
        assert state in TERMINAL
        self.jobs[job_id] = replace(self.jobs[job_id], state=state, message=message)

    def forget_everything(self) -> None:
        """A requester restarted with its default in-memory store."""
        self.jobs.clear()
