"""The planner: a pure function from desired and recorded state to decisions, each with a reason.

No I/O and no clock: time comes in as ``now``. Every managed or desired name gets exactly one
:class:`Decision`; those whose action has an effect are the plan's ``changes``.

The rules (``docs/design.md`` has the table):

* a valid manifest with no record is submitted; with a record of the same spec hash, nothing
  happens; with another hash, an active job is replaced (or waited for, ``onChange: keep``) and
  a finished one is followed by a new submit;
* a removed manifest's active job is cancelled (or forgotten, ``onRemove: orphan``); a finished
  one is forgotten;
* a manifest that is broken, unreadable or claimed twice is **held**: nothing is cancelled or
  replaced, whatever the store says;
* an intent without a job id (a crash, a lost reply) is resolved by looking up its uid before
  anything is resubmitted; the decision names what follows a confirmed absence (``if_absent``:
  submit again, under a fresh uid, while the manifest is there; forget it once it is gone);
* a failed job is resubmitted only when its policy says so, with backoff and a cap;
* a service or daemon job (``Manifest.long_running``) is kept running: any end of its job
  (failed, completed, stopped by someone else, lost) is drift, resubmitted under the same
  policy, backoff and cap; batch and ops jobs keep the rules above;
* a scheduled manifest runs at its slots only (``domain/schedule.py``): ``decide`` says, with
  a reason, whether the slot due at ``schedule_now`` fires (a submit under the slot's uid, or a
  replace under ``concurrency: replace``), is skipped or missed (``skip``: only its state is
  recorded), or nothing is due (``noop``, naming the next run). The state to record goes with
  the decision (``Scheduled``) and, for a run, into the same transaction as its intent.

Guards: a source that is not ready (missing, unreadable, or empty without ``allow_empty``)
holds everything; a pass that would cancel more than ``mass_cancel_ratio`` of the managed live
jobs *and* more than ``mass_cancel_min`` of them is blocked until an operator allows it once.
Cancels are counted over a sliding window (``mass_cancel_window``): the caller passes in how
many removals were cancelled within it (``recent_cancels``), so deleting manifests one at a
time meets the same guard as deleting them at once, and the planner stays pure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol

from reconciler.domain.desired import Desired
from reconciler.domain.manifest import Manifest
from reconciler.domain.records import FINISHED_PHASES, LIVE_PHASES, Phase, Record
from reconciler.domain.schedule import Decision as SlotDecision
from reconciler.domain.schedule import Schedule, ScheduleState, decide, local_time, track


class Action(StrEnum):
    SUBMIT = "submit"
    RESUBMIT = "resubmit"
    REPLACE = "replace"
    CANCEL = "cancel"
    RESOLVE = "resolve"
    FORGET = "forget"
    UPDATE = "update"
    HOLD = "hold"
    BLOCKED = "blocked"
    SKIP = "skip"  # a scheduled manifest's slot is skipped or missed: only recorded
    WAIT = "wait"
    NOOP = "noop"


#: Actions that change something (remotely, or in the store).
EFFECTS = frozenset(
    {Action.SUBMIT, Action.RESUBMIT, Action.REPLACE, Action.CANCEL, Action.RESOLVE, Action.FORGET,
     Action.UPDATE, Action.SKIP}
)
SYMBOLS = {
    Action.SUBMIT: "+", Action.RESUBMIT: "+", Action.REPLACE: "~", Action.CANCEL: "-",
    Action.RESOLVE: "=", Action.FORGET: "-", Action.UPDATE: "*", Action.HOLD: "!",
    Action.BLOCKED: "x", Action.SKIP: "/",
    Action.WAIT: ".", Action.NOOP: " ",
}


@dataclass(frozen=True)
class PlanPolicy:
    """The planner's settings (see :class:`reconciler.settings.Settings` for their docs)."""

    allow_empty: bool = False
    mass_cancel_ratio: float = 0.5
    mass_cancel_min: int = 3
    #: Seconds over which cancels are counted by the guard (the caller counts them).
    mass_cancel_window: float = 600.0
    allow_mass_cancel: bool = False
    backoff_base: float = 10.0
    backoff_max: float = 600.0
    #: The daemon spaces retries out; a one-shot ``apply`` (and its previews) tries now.
    honour_backoff: bool = True
    #: Seconds a service or daemon job must have run (unchanged since last recorded) before
    #: its end resets its retry count (engine/observe.py; Kubernetes resets a crash loop's
    #: backoff after 10 minutes of running).
    stable_after: float = 600.0

    def backoff(self, attempts: int) -> float:
        return float(min(self.backoff_max, self.backoff_base * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Scheduled:
    """A scheduled manifest's slot decision and the states around it."""

    slot: SlotDecision
    #: The state before the decision (a new or changed schedule starts at now).
    tracked: ScheduleState
    #: The state to record once the decision is acted on (``tracked.after(slot)``).
    after: ScheduleState
    keep_runs: int
    timezone: str

    @property
    def fires(self) -> bool:
        return self.slot.action == "fire"


@dataclass(frozen=True)
class Decision:
    name: str
    action: Action
    reason: str
    path: str | None = None
    job_id: str | None = None
    manifest: Manifest | None = field(default=None, repr=False)
    record: Record | None = field(default=None, repr=False)
    #: For ``resolve``: what the executor does once the uid is confirmed absent.
    if_absent: Action | None = None
    #: For a ``wait`` on a backoff: when (wall clock) the action may be tried again.
    retry_at: float | None = None
    #: For a scheduled manifest: its slot decision (a submit or replace with it is a run).
    scheduled: Scheduled | None = field(default=None, repr=False)

    @property
    def is_change(self) -> bool:
        return self.action in EFFECTS


@dataclass(frozen=True)
class Guard:
    name: str  # "source.not_ready" or "prune.blocked"
    reason: str
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    decisions: tuple[Decision, ...]
    guards: tuple[Guard, ...] = ()
    ready: bool = True
    revision: str | None = None
    #: Schedule states to record that come with no run: a schedule first seen or changed, a
    #: slot skipped or missed. (A run's state is recorded with its intent.)
    schedule_updates: Mapping[str, ScheduleState] = field(default_factory=dict)
    #: Names whose schedule state and runs are forgotten (no longer scheduled).
    schedule_drops: tuple[str, ...] = ()
    #: The earliest next slot of any scheduled manifest (Unix seconds): when to look again.
    next_slot: float | None = None

    @property
    def changes(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.is_change)

    @property
    def blocked(self) -> bool:
        return any(g.name == "prune.blocked" for g in self.guards)

    def by_action(self, *actions: Action) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.action in actions)

    def next_retry(self) -> float | None:
        """When the earliest backoff among the waits ends (wall clock), if any: the daemon
        looks again then, rather than at the next resync."""
        return min((d.retry_at for d in self.decisions if d.retry_at is not None), default=None)


def plan(
    desired: Desired, recorded: Iterable[Record], policy: PlanPolicy, now: float,
    recent_cancels: int = 0, schedules: Mapping[str, ScheduleState] | None = None,
    schedule_now: float | None = None,
) -> Plan:
    """``recent_cancels``: removals cancelled within ``policy.mass_cancel_window`` so far.
    ``schedules``: the recorded states of scheduled manifests; ``schedule_now``: the time slots
    are decided at (default ``now``; tests and the daemon's test clock set it apart)."""
    records = {r.name: r for r in recorded}
    stored = schedules or {}
    not_ready = _not_ready_reason(desired, policy)
    if not_ready:
        return _hold_everything(desired, records, not_ready)
    names = sorted(set(records) | set(desired.manifests) | set(desired.held))
    slots = _Slots(stored, datetime.fromtimestamp(now if schedule_now is None else schedule_now,
                                                  UTC))
    decisions = [
        _settled(_decide(name, desired, records.get(name), policy, now, slots), desired)
        for name in names
    ]
    decisions, guards = _guard_mass_cancel(decisions, records, policy, recent_cancels)
    return _with_schedules(Plan(tuple(decisions), guards, True, desired.revision), desired,
                           stored)


@dataclass(frozen=True)
class _Slots:
    stored: Mapping[str, ScheduleState]
    when: datetime


def _with_schedules(
    the_plan: Plan, desired: Desired, stored: Mapping[str, ScheduleState]
) -> Plan:
    """What the plan records of schedules besides runs, and when the next slot is."""
    updates: dict[str, ScheduleState] = {}
    scheduled: set[str] = set()
    next_slot: float | None = None
    keep = (Action.HOLD, Action.WAIT, Action.BLOCKED)
    for d in the_plan.decisions:
        s = d.scheduled
        if s is None:
            continue
        scheduled.add(d.name)
        if s.slot.next_run is not None:
            at = s.slot.next_run.timestamp()
            next_slot = at if next_slot is None else min(next_slot, at)
        if d.action in (Action.SUBMIT, Action.REPLACE) and s.fires:
            continue  # recorded with the run's intent
        target = s.after if d.action is Action.SKIP else s.tracked
        if stored.get(d.name) != target:
            updates[d.name] = target
    gone = set(stored) - scheduled - set(desired.held)
    actions = {d.name: d.action for d in the_plan.decisions if d.name in gone} if gone else {}
    drops = tuple(sorted(name for name in gone if actions.get(name) not in keep))
    if not (updates or drops or next_slot is not None):
        return the_plan
    return replace(the_plan, schedule_updates=updates, schedule_drops=drops,
                   next_slot=next_slot)


def _not_ready_reason(desired: Desired, policy: PlanPolicy) -> str:
    if not desired.ready:
        return desired.reason or "source not ready"
    if desired.file_count == 0 and not policy.allow_empty:
        return "source is empty (set allow_empty to cancel everything on purpose)"
    return ""


def _hold_everything(desired: Desired, records: Mapping[str, Record], reason: str) -> Plan:
    decisions = tuple(
        # The reason is the guard's, given once (plan output, the source.not_ready event).
        Decision(r.name, Action.HOLD, "source not ready", r.path, r.job_id, record=r)
        for r in sorted(records.values(), key=lambda r: r.name)
    )
    guard = Guard("source.not_ready", reason, tuple(d.name for d in decisions))
    return Plan(decisions, (guard,), False, desired.revision)


def _decide(
    name: str, desired: Desired, record: Record | None, policy: PlanPolicy, now: float,
    slots: _Slots,
) -> Decision:
    if name in desired.held:
        return _held(name, record, desired.held[name])
    manifest = desired.manifests.get(name)
    if manifest is not None and record is not None and record.path != manifest.path \
            and desired.is_broken(record.path):
        return _held(name, record, f"{record.path} cannot be read or parsed and may still "
                     f"define this name (now also claimed by {manifest.path})")
    if manifest is not None and manifest.policy.schedule is not None:
        return _decide_scheduled(manifest, record, policy, now, slots)
    if manifest is not None and record is not None and _unchanged_and_live(manifest, record):
        # The common case at scale, kept cheap: nothing to do.
        return Decision(name, Action.NOOP, "unchanged; job is live", manifest.path,
                        record.job_id, manifest, record)
    if manifest is not None:
        return _decide_present(manifest, record, policy, now)
    assert record is not None  # names come from the records, the manifests or the held
    if desired.is_broken(record.path):
        return _held(name, record, f"{record.path} cannot be read or parsed")
    return _decide_removed(record, policy, now)


def _decide_scheduled(
    manifest: Manifest, record: Record | None, policy: PlanPolicy, now: float, slots: _Slots
) -> Decision:
    """A scheduled manifest runs at its slots, never as a one-shot job; its record is its
    newest run. A spec change affects the next slot (the running run is left alone); an
    in-doubt intent is resolved first, as any other."""
    if record is not None and record.phase is Phase.SUBMITTING:
        return _decide_present(manifest, record, policy, now)
    schedule = manifest.policy.as_schedule()
    assert schedule is not None

    def decision(action: Action, reason: str) -> Decision:
        return Decision(manifest.name, action, reason, manifest.path,
                        record.job_id if record else None, manifest, record)

    tracked = track(schedule, slots.stored.get(manifest.name), slots.when)
    active = record is not None and record.phase in (Phase.ACTIVE, Phase.CANCELLING)
    slot = decide(schedule, manifest.name, tracked, active=active, now=slots.when)
    info = Scheduled(slot, tracked, tracked.after(slot), schedule.keep_runs, schedule.timezone)
    if slot.action == "fire":
        assert slot.slot is not None
        action = Action.REPLACE if slot.stop_active else Action.SUBMIT
        return replace(decision(action, f"slot {local_time(schedule, slot.slot)}: "
                                f"{slot.reason}"), scheduled=info)
    if slot.action in ("skip", "missed"):
        return replace(decision(Action.SKIP, f"{_slot_text(schedule, slot)}: {slot.reason}"),
                       scheduled=info)
    last = f"last run {record.phase}; " if record is not None else ""
    upcoming = (f"next run {local_time(schedule, slot.next_run)}" if slot.next_run
                else "no next run")
    outcome = decision(Action.NOOP, f"scheduled: {last}{slot.reason}; {upcoming}")
    if record is not None:
        outcome = _follow_manifest(outcome, manifest, record, decision)
    return replace(outcome, scheduled=info)


def _slot_text(schedule: Schedule, slot: SlotDecision) -> str:
    if slot.slot is not None:
        return f"slot {local_time(schedule, slot.slot)}"
    newest = slot.missed[0] if slot.missed else None
    return f"slot {local_time(schedule, newest)}" if newest else "slots"


def _settled(decision: Decision, desired: Desired) -> Decision:
    """Defer the effects of a file that changed moments ago (a save may still be under way)."""
    if not decision.is_change or not desired.settling:
        return decision
    paths = (decision.path, decision.record.path if decision.record else None)
    if not any(desired.is_settling(p) for p in paths):
        return decision
    return replace(decision, action=Action.WAIT,
                   reason=f"{decision.reason}; waiting for the file to settle")


def _unchanged_and_live(manifest: Manifest, record: Record) -> bool:
    return (record.phase is Phase.ACTIVE and record.spec_hash == manifest.spec_hash
            and record.path == manifest.path and record.on_remove == manifest.policy.on_remove)


def _held(name: str, record: Record | None, why: str) -> Decision:
    kept = f"; job {record.job_id} is kept as it is" if record and record.job_id else ""
    return Decision(name, Action.HOLD, why + kept, record.path if record else None,
                    record.job_id if record else None, record=record)


def _decide_present(
    manifest: Manifest, record: Record | None, policy: PlanPolicy, now: float
) -> Decision:
    def decision(action: Action, reason: str) -> Decision:
        return Decision(manifest.name, action, reason, manifest.path,
                        record.job_id if record else None, manifest, record)

    if record is None:
        return decision(Action.SUBMIT, "new manifest")
    same = record.spec_hash == manifest.spec_hash
    if record.phase is Phase.SUBMITTING:
        return replace(decision(Action.RESOLVE, f"submission {record.uid} has no job id yet "
                                "(crash or lost reply): adopt the job its uid finds, or submit "
                                "it again under a fresh uid once it is confirmed absent"),
                       if_absent=Action.RESUBMIT)
    if record.phase in (Phase.ACTIVE, Phase.CANCELLING):
        outcome = _decide_live(manifest, record, same, decision, policy, now)
    elif not same:
        return decision(Action.SUBMIT, f"spec changed since job {record.job_id or '-'} ended "
                        f"({record.phase})")
    else:
        outcome = _decide_finished_same(manifest, record, policy, now, decision)
    return _follow_manifest(outcome, manifest, record, decision)


def _follow_manifest(
    outcome: Decision, manifest: Manifest, record: Record, decision: _Make
) -> Decision:
    """Keep the record's path and removal policy in step with the manifest: the path is what
    holds a job when its file breaks later, so it must never be stale."""
    if outcome.action not in (Action.NOOP, Action.WAIT):
        return outcome
    if record.path != manifest.path:
        return decision(Action.UPDATE, f"manifest moved from {record.path} to {manifest.path}")
    if record.on_remove != manifest.policy.on_remove:
        return decision(Action.UPDATE, f"onRemove is now {manifest.policy.on_remove}")
    return outcome


def _decide_live(manifest: Manifest, record: Record, same: bool, decision: _Make,
                 policy: PlanPolicy, now: float) -> Decision:
    if record.phase is Phase.CANCELLING:
        waiting = _cancel_backing_off(record, policy, now, decision)
        return waiting or decision(Action.REPLACE, "an interrupted cancel is finished, then "
                                   "the manifest is submitted again")
    if same:
        return decision(Action.NOOP, "unchanged; job is live")
    if manifest.policy.on_change == "keep":
        return decision(Action.WAIT, "spec changed; onChange=keep lets the running job finish "
                        "before the new spec is submitted")
    if policy.honour_backoff and now < record.next_attempt_at:
        # Only a refused update in place sets a live record's next_attempt_at (engine/
        # executor.py, _failed): the old job runs on meanwhile.
        wait = record.next_attempt_at - now
        return replace(decision(Action.WAIT, f"spec changed, but the last update was refused "
                                f"({record.last_error or 'no reason given'}); the job runs "
                                f"its old spec; backing off {wait:.0f}s more"),
                       retry_at=record.next_attempt_at)
    return decision(Action.REPLACE, "spec changed: cancel the running job, submit the new spec")


def _decide_finished_same(
    manifest: Manifest, record: Record, policy: PlanPolicy, now: float, decision: _Make
) -> Decision:
    phase = record.phase
    if phase is not Phase.ERROR and manifest.long_running:
        return _decide_drifted(manifest, record, policy, now, decision)
    if phase is Phase.COMPLETED:
        return decision(Action.NOOP, "unchanged; job completed")
    if phase is Phase.CANCELLED:
        return decision(Action.NOOP, "unchanged; job was cancelled outside the reconciler "
                        "(change the manifest to run it again)")
    if phase is Phase.ERROR:
        return _retry(decision, record, now, Action.SUBMIT, "earlier submit failed", policy)
    if manifest.policy.on_failure != "resubmit":
        return decision(Action.NOOP, f"job {phase} and onFailure=none")
    if record.attempts > manifest.policy.max_retries:
        return decision(Action.NOOP, f"job {phase}; maxRetries={manifest.policy.max_retries} "
                        "used up")
    return _retry(decision, record, now, Action.RESUBMIT, f"job {phase}; onFailure=resubmit",
                  policy)


#: How a long-running job's recorded end reads in a reason.
_ENDED = {
    Phase.COMPLETED: "completed",
    Phase.FAILED: "failed",
    Phase.CANCELLED: "cancelled (stopped outside the reconciler)",
    Phase.LOST: "lost (the requester no longer knows it)",
}


def _decide_drifted(
    manifest: Manifest, record: Record, policy: PlanPolicy, now: float, decision: _Make
) -> Decision:
    """A service or daemon job is kept running, as a Kubernetes Deployment keeps its pods:
    whatever ended it (a failure, someone's stop, a completion, a requester that lost it) is
    drift. ``onFailure: resubmit`` brings it back under the same backoff and ``maxRetries`` as
    a failed batch job; ``none`` leaves it ended and says so (docs/design.md, "Long-running
    jobs")."""
    kind = manifest.job_type
    drift = (f"drift: {kind} job {record.job_id or '-'} {_ENDED[record.phase]}; "
             f"a {kind} job is kept running")
    if manifest.policy.on_failure != "resubmit":
        return decision(Action.NOOP, f"{drift}, but onFailure=none: the {kind} is not running "
                        "(onFailure: resubmit would bring it back)")
    if record.attempts > manifest.policy.max_retries:
        return decision(Action.NOOP, f"{drift}, but maxRetries={manifest.policy.max_retries} "
                        f"is used up: the {kind} is not running")
    return _retry(decision, record, now, Action.RESUBMIT, f"{drift}; onFailure=resubmit",
                  policy)


def _retry(decision: _Make, record: Record, now: float, action: Action, why: str,
           policy: PlanPolicy) -> Decision:
    if policy.honour_backoff and now < record.next_attempt_at:
        wait = record.next_attempt_at - now
        return replace(decision(Action.WAIT, f"{why}; backing off {wait:.0f}s more "
                                f"(attempt {record.attempts})"),
                       retry_at=record.next_attempt_at)
    return decision(action, f"{why}; attempt {record.attempts + 1}")


def _decide_removed(record: Record, policy: PlanPolicy, now: float) -> Decision:
    def decision(action: Action, reason: str) -> Decision:
        return Decision(record.name, action, reason, record.path, record.job_id, record=record)

    if record.phase is Phase.SUBMITTING:
        return replace(decision(Action.RESOLVE, "manifest removed while its submission is in "
                                "doubt: adopt the job its uid finds (cancelled next pass), or "
                                "forget it once it is confirmed absent"),
                       if_absent=Action.FORGET)
    if record.phase in LIVE_PHASES:
        if record.on_remove == "orphan":
            return decision(Action.FORGET, "manifest removed; onRemove=orphan leaves the job "
                            "running")
        return (_cancel_backing_off(record, policy, now, decision)
                or decision(Action.CANCEL, "manifest removed"))
    assert record.phase in FINISHED_PHASES
    return decision(Action.FORGET, f"manifest removed; job already ended ({record.phase})")


def _cancel_backing_off(record: Record, policy: PlanPolicy, now: float,
                        decision: _Make) -> Decision | None:
    """A cancel that failed (engine/executor.py, _failed) is tried again once its backoff
    is over, not at every pass; the job may still run meanwhile."""
    if (record.phase is not Phase.CANCELLING or not policy.honour_backoff
            or now >= record.next_attempt_at):
        return None
    wait = record.next_attempt_at - now
    return replace(decision(Action.WAIT, f"the last cancel of job {record.job_id or '-'} failed "
                            f"({record.last_error or 'no reason given'}); backing off "
                            f"{wait:.0f}s more"),
                   retry_at=record.next_attempt_at)


def _guard_mass_cancel(
    decisions: list[Decision], records: Mapping[str, Record], policy: PlanPolicy,
    recent: int = 0,
) -> tuple[list[Decision], tuple[Guard, ...]]:
    """The jobs cancelled within the window count as if this pass cancelled them too, out of
    the live jobs there were before them."""
    cancels = [d for d in decisions if d.action is Action.CANCEL]
    if not cancels:
        return decisions, ()
    recent = max(0, recent)
    live = sum(1 for r in records.values() if r.phase in LIVE_PHASES) + recent
    total = len(cancels) + recent
    too_many = total > policy.mass_cancel_min and total > policy.mass_cancel_ratio * live
    if not too_many or policy.allow_mass_cancel:
        return decisions, ()
    earlier = (f", {recent} of them already cancelled in the last "
               f"{_duration(policy.mass_cancel_window)}" if recent else "")
    reason = (f"would cancel {total} of {live} live jobs{earlier} (more than "
              f"{policy.mass_cancel_ratio:.0%} and more than {policy.mass_cancel_min}); "
              "run `reconciler apply --allow-mass-cancel` once to allow it")
    blocked = [
        replace(d, action=Action.BLOCKED,
                reason=f"{d.reason}; blocked by the mass-cancel guard")
        if d.action is Action.CANCEL else d
        for d in decisions
    ]
    return blocked, (Guard("prune.blocked", reason, tuple(d.name for d in cancels)),)


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"


class _Make(Protocol):
    """Type of the small ``decision(action, reason)`` builders above."""

    def __call__(self, action: Action, reason: str) -> Decision: ...
