"""One pass: read the source, collect desired state, plan against the store, apply, report.

The one-shot commands (``plan``, ``apply``, ``status``) and the daemon all go through
:class:`Reconciler`, so a preview is made by the same code that acts
(docs/operations-notes.md, Lessons from other reconcilers).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from reconciler.domain.desired import Desired, collect
from reconciler.domain.plan import Action, Plan, PlanPolicy, plan
from reconciler.domain.records import FINISHED_PHASES, Phase, Record, StoredPolicy
from reconciler.domain.snapshot import Snapshot
from reconciler.domain.specview import spec_view
from reconciler.engine.executor import ApplyReport, Executor
from reconciler.ports import Source, StateStore


@dataclass(frozen=True)
class PassResult:
    desired: Desired
    plan: Plan
    report: ApplyReport = field(default_factory=ApplyReport)
    duration: float = 0.0

    @property
    def held(self) -> int:
        return len(self.plan.by_action(Action.HOLD))

    @property
    def waiting(self) -> int:
        """Decisions deferred to a later pass (settling files, removal grace, backoff)."""
        return len(self.plan.by_action(Action.WAIT))

    @property
    def failing(self) -> int:
        """Names whose last action failed and waits for a retry (e.g. the requester is
        unreachable): no job exists for them, or (a refused update in place backing off)
        their job runs an old spec, so the network is not in line."""
        return sum(1 for d in self.plan.by_action(Action.WAIT)
                   if d.record is not None and (d.record.phase is Phase.ERROR or (
                       d.record.phase in (Phase.ACTIVE, Phase.CANCELLING)
                       and d.retry_at is not None)))

    @property
    def down(self) -> int:
        """Service and daemon manifests whose job has ended and is not being brought back
        this pass (``onFailure: none``, retries used up, or backing off): they are meant to
        run, so the network is not in line (docs/design.md, "Long-running jobs"). A scheduled
        one is between its runs, not down."""
        return sum(1 for d in self.plan.decisions
                   if d.action in (Action.NOOP, Action.WAIT) and d.manifest is not None
                   and d.manifest.long_running and d.manifest.policy.schedule is None
                   and d.record is not None
                   and d.record.phase in FINISHED_PHASES
                   and d.record.spec_hash == d.manifest.spec_hash)

    @property
    def overall(self) -> str:
        """``ready``, ``degraded`` (held manifests, failed actions, jobs waiting to retry
        one, services that are down) or ``not ready``."""
        if not self.plan.ready:
            return "not ready"
        if (self.held or self.desired.errors or self.report.failed or self.plan.blocked
                or self.failing or self.down):
            return "degraded"
        return "ready"

    def summary(self) -> str:
        changes = ", ".join(f"{k} {v}" for k, v in sorted(self.report.counts.items()))
        parts = [self.overall, f"{len(self.desired.manifests)} manifests", f"{self.held} held"]
        if self.waiting:
            parts.append(f"{self.waiting} waiting")
        if self.down:
            parts.append(f"{self.down} services down")
        if self.plan.revision:
            parts.append(f"revision {self.plan.revision}")
        if changes:
            parts.append(changes)
        return "; ".join(parts)


class Reconciler:
    def __init__(
        self,
        source: Source,
        store: StateStore,
        policy: PlanPolicy,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        schedule_clock: Callable[[], float] | None = None,
    ) -> None:
        self.source = source
        self.store = store
        self.policy = policy
        self._clock = clock
        #: The time scheduled manifests' slots are decided at: the wall clock, but for the
        #: daemon's test-only accelerated clock (service/timers.py, ScheduleClock).
        self.schedule_clock = schedule_clock or clock
        self._monotonic = monotonic
        self._log = structlog.get_logger("reconciler")
        self._reported: set[str] = set()
        #: A recorded file must stay missing this long before its job counts as removed: a
        #: save may unlink and recreate a file, and its events can reach the daemon after the
        #: read that saw it missing. The daemon sets it; one-shot commands have one read only.
        self.removal_grace = 0.0
        self._missing_since: dict[str, float] = {}
        #: Whether the last read found files the source says may still be being written.
        self.source_settling = False
        #: When each removal the last plan deferred matures (monotonic).
        self._deferred: dict[str, float] = {}

    def plan(
        self, policy: PlanPolicy | None = None, settling: frozenset[str] = frozenset()
    ) -> tuple[Desired, Plan]:
        """Read and plan, without side effects (works offline)."""
        snapshot = self.source.read()
        records = self.store.records()
        self.source_settling = bool(snapshot.settling)
        settling = settling | snapshot.settling | self._recently_missing(snapshot, records)
        desired = replace(collect(snapshot), settling=settling)
        policy = policy or self.policy
        now = self._clock()
        recent = self.store.recent_cancels(now - policy.mass_cancel_window)
        return desired, plan(desired, records, policy, now, recent,
                             schedules=self.store.schedules(),
                             schedule_now=self.schedule_clock())

    def _recently_missing(self, snapshot: Snapshot, records: list[Record]) -> frozenset[str]:
        if not self.removal_grace or not snapshot.ready:
            self._deferred = {}
            return frozenset()
        now = self._monotonic()
        missing = {r.path for r in records if r.path not in snapshot.files}
        self._missing_since = {p: self._missing_since.get(p, now) for p in missing}
        self._deferred = {p: since + self.removal_grace
                          for p, since in self._missing_since.items()
                          if now - since < self.removal_grace}
        return frozenset(self._deferred)

    def next_removal_check(self) -> float | None:
        """When the earliest removal the last plan deferred matures (monotonic), if any. It may
        lie in the past already: a pass slower than the grace period (a busy machine) must
        still be followed by the pass that acts on the removal, not by the next resync."""
        return min(self._deferred.values(), default=None)

    async def run_pass(
        self, executor: Executor | None, settling: frozenset[str] = frozenset()
    ) -> PassResult:
        started = time.perf_counter()
        desired, the_plan = self.plan(settling=settling)
        self._report_problems(desired, the_plan)
        report = await executor.apply(the_plan) if executor is not None else ApplyReport()
        if executor is not None:
            self._sync_policies(desired)
            self._remember_views(the_plan)
            if self.policy.allow_mass_cancel and the_plan.by_action(Action.CANCEL):
                # The operator allowed these cancels: the guard's window starts afresh.
                self.store.clear_cancels()
        result = PassResult(desired, the_plan, report, time.perf_counter() - started)
        self._log.info(
            "pass.completed", state=result.overall, revision=the_plan.revision,
            manifests=len(desired.manifests), held=result.held, errors=len(desired.errors),
            changes=len(the_plan.changes), waiting=result.waiting,
            outcomes=dict(report.counts),
            duration_ms=round(result.duration * 1000, 1),
        )
        return result

    def _remember_views(self, the_plan: Plan) -> None:
        """Keep what ``plan`` may show of each submitted spec, for a later replace's diff."""
        submitted = (Action.SUBMIT, Action.RESUBMIT, Action.REPLACE)
        self.store.save_views({d.manifest.spec_hash: spec_view(d.manifest.wire())
                               for d in the_plan.by_action(*submitted)
                               if d.manifest is not None})

    def _sync_policies(self, desired: Desired) -> None:
        """Keep the store's approval policies in step: a held (broken) policy keeps its last
        valid version, and nothing is dropped while the source is not ready."""
        if not desired.ready:
            return
        stored = {p.name: p for p in self.store.policies()}
        changed = [
            StoredPolicy(p.name, p.policy.model_dump_json(by_alias=True), p.body_hash, p.path)
            for p in desired.policies.values()
            if p.name not in stored or stored[p.name].body_hash != p.body_hash
        ]
        gone = [name for name, p in stored.items()
                if name not in desired.policies and name not in desired.held_policies
                and not desired.is_broken(p.path)]
        self.store.save_policies(changed)
        self.store.drop_policies(gone)
        for policy in changed:
            self._log.info("policy.updated", name=policy.name, path=policy.path,
                           revision=desired.revision)
        for name in gone:
            self._log.info("policy.removed", name=name, revision=desired.revision)

    def _report_problems(self, desired: Desired, the_plan: Plan) -> None:
        """One event per problem when it first appears, not on every pass."""
        current: set[str] = set()
        for error in desired.errors:
            key = f"invalid:{error}"
            if desired.is_settling(error.path):
                # Most likely a save still being written: not reported yet, but not forgotten
                # either if it already was (a late event makes a file settle again).
                if key in self._reported:
                    current.add(key)
                continue
            current.add(key)
            if key not in self._reported:
                self._log.error("manifest.invalid", path=error.path, line=error.line,
                                field=error.field, reason=error.message, revision=desired.revision)
        for decision in the_plan.by_action(Action.HOLD, Action.BLOCKED):
            key = f"{decision.action}:{decision.name}:{decision.reason}"
            current.add(key)
            if key not in self._reported:
                self._log.warning(f"manifest.{decision.action}", name=decision.name,
                                  job_id=decision.job_id, path=decision.path,
                                  reason=decision.reason, revision=the_plan.revision)
        for guard in the_plan.guards:
            key = f"guard:{guard.name}:{guard.reason}"
            current.add(key)
            if key not in self._reported:
                self._log.warning(guard.name, reason=guard.reason, names=list(guard.names[:50]),
                                  count=len(guard.names), revision=the_plan.revision)
        self._reported = current
