"""Scheduled manifests: the policy model, slot arithmetic and the pure decision (issue 16).

No I/O and no clock: time comes in as ``now`` (timezone-aware). The one outside read is the time
zone database, through :mod:`zoneinfo` (read-only, cached), as any local-time arithmetic needs.

**Slots are wall-clock times.** A slot is a local time in ``timezone`` matching the five-field
cron expression. A wall time that does not exist (DST spring forward) is skipped; one that
exists twice (fall back) runs once, at its first occurrence. This holds for every expression,
so ``0 * * * *`` in Europe/Berlin has a two-hour gap in real time on the fall-back night: the
02:00 that comes round again is the same slot, and a slot runs once (``docs/design.md``,
"Schedules (design)").

**Why cronsim, iterated in naive wall time.** Both maintained parsers were checked against
these rules with timezone-aware datetimes: for ``30 2 * * *`` in Europe/Berlin, croniter 7 runs
the doubled 02:30 of 25 Oct 2026 twice, and both croniter and cronsim run the missing 02:30 of
29 Mar 2026 at 03:00 (Debian cron's catch-up, which the issue does not want). cronsim already
runs the doubled slot once, its parser is strict (it checks that a day of month exists in some
named month: ``0 0 30 2 *`` is refused) and its errors never echo the input. So cronsim walks
naive wall times, which is plain calendar arithmetic with no DST at all, and the mapping of
each wall time to an instant (skip if missing, first occurrence if doubled) is done here, in
one place (:func:`_instant`), instead of relying on a library's DST heuristics. cronsim has no
``@daily``-style macros and also accepts a sixth (seconds) field, so both are handled here.

**The decision** (:func:`decide`): given the schedule, what was recorded (the last slot handled
and when this schedule took effect), whether a previous run is active, and ``now``, say what to
do with a reason: ``fire`` the newest due slot, ``skip`` it (``concurrency: forbid`` and a run
is active), report slots ``missed`` (all due slots older than ``startingDeadline``), or ``wait``
until the next slot. After downtime at most one slot runs, the newest within the deadline; the
older ones are reported missed, never replayed (as Kubernetes CronJob does). Every decision
that acts names the new last slot; slots at or before it are never considered again, so as
long as the caller records it before acting (with the run's intent), no slot fires twice
whatever ``now`` does, and the run's uid is a function of the manifest name and the slot
(:func:`run_uid`), so a crash between intent and request resubmits under the same uid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, available_timezones

from cronsim import CronSim, CronSimError

__all__ = [
    "MACROS",
    "MAX_MISSED_LISTED",
    "Concurrency",
    "Decision",
    "Schedule",
    "ScheduleState",
    "check_expression",
    "check_timezone",
    "decide",
    "local_time",
    "next_run_text",
    "run_uid",
    "track",
]

Concurrency = Literal["forbid", "allow", "replace"]
Action = Literal["fire", "skip", "missed", "wait"]

#: The usual cron shorthands (Vixie cron's, less @reboot, which has no slot).
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: Missed slots listed in one decision (newest first); more are only flagged.
MAX_MISSED_LISTED = 100
# Wall times looked at before giving up on finding an existing slot or one past a bound. Only
# reached by slots that fall in DST gaps year after year, or by a fall-back hour of minutes.
_SEARCH_LIMIT = 10_000
# Zone names that exist in the database but mean the host's setting, or nothing.
_NOT_ZONES = frozenset({"localtime", "Factory", "posixrules", "posix", "right"})
_STEP = timedelta(microseconds=1)


def check_expression(expression: str) -> str:
    """The five-field form of ``expression`` (macros expanded, spaces normalised), or a
    ``ValueError`` whose message never repeats the input."""
    text = " ".join(expression.split())
    if text.startswith("@"):
        cron = MACROS.get(text.lower())
        if cron is None:
            raise ValueError(f"unknown shorthand; use one of {', '.join(sorted(MACROS))} "
                             "or five fields")
        return cron
    if len(text.split(" ")) != 5:
        raise ValueError("a cron expression has five fields (minute hour day-of-month month "
                         "day-of-week), or is one of @hourly, @daily, @weekly, @monthly")
    return _parse(text)


@lru_cache(maxsize=1024)
def _parse(cron: str) -> str:
    try:
        CronSim(cron, datetime(2000, 1, 1))
    except CronSimError as exc:  # messages name the field only: "Bad minute"
        raise ValueError(f"not a valid cron expression: {str(exc).lower()}") from None
    return cron


def check_timezone(name: str) -> str:
    """``name`` if it is an IANA time zone, else a ``ValueError`` (input not repeated)."""
    if name not in _zones():
        raise ValueError("not an IANA time zone name (such as UTC or Europe/Berlin)")
    return name


@lru_cache(maxsize=1)
def _zones() -> frozenset[str]:
    return frozenset(available_timezones()) - _NOT_ZONES


@dataclass(frozen=True, slots=True)
class Schedule:
    """A manifest's schedule policy; invalid values raise ``ValueError`` on construction."""

    expression: str
    timezone: str = "UTC"
    concurrency: Concurrency = "forbid"
    #: Seconds after its time that a slot may still start; ``None``: no limit.
    starting_deadline: int | None = None
    #: Finished runs remembered in status.
    keep_runs: int = 5
    suspend: bool = False
    _cron: str = field(init=False, repr=False, compare=False)
    _tz: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_cron", check_expression(self.expression))
        object.__setattr__(self, "_tz", ZoneInfo(check_timezone(self.timezone)))
        if self.concurrency not in ("forbid", "allow", "replace"):
            raise ValueError("concurrency is one of forbid, allow, replace")
        if self.starting_deadline is not None and self.starting_deadline < 1:
            raise ValueError("startingDeadline is at least 1 second")
        if self.keep_runs < 0:
            raise ValueError("keepRuns is not negative")

    @property
    def key(self) -> tuple[str, str]:
        """What decides the slots; a change of key is a new schedule (see :func:`track`)."""
        return (self._cron, self.timezone)

    def next_after(self, t: datetime) -> datetime | None:
        """The first slot strictly after ``t`` (UTC), or ``None`` if there is none."""
        _aware(t)
        walls = CronSim(self._cron, _wall(t, self._tz))
        for _ in range(_SEARCH_LIMIT):
            wall = next(walls, None)
            if wall is None:
                return None
            instant = _instant(wall, self._tz)
            if instant is not None and instant > t:
                return instant
        return None

    def slots_back(self, t: datetime) -> Iterator[datetime]:
        """Slots at or before ``t``, newest first (UTC)."""
        _aware(t)
        local = t.astimezone(self._tz)
        # When t is the second occurrence of a doubled hour, the rest of that hour's wall times
        # (first occurrences) are also before t: start looking from the end of it.
        ahead = (local.replace(fold=0).utcoffset() or timedelta()) - (
            local.utcoffset() or timedelta())
        start = local.replace(tzinfo=None) + max(ahead, timedelta()) + _STEP
        walls = CronSim(self._cron, start, reverse=True)
        misses = 0
        while misses < _SEARCH_LIMIT:
            wall = next(walls, None)
            if wall is None:
                return
            instant = _instant(wall, self._tz)
            if instant is None or instant > t:
                misses += 1
                continue
            misses = 0
            yield instant

    def latest_at(self, t: datetime) -> datetime | None:
        """The newest slot at or before ``t``."""
        return next(self.slots_back(t), None)


def _aware(t: datetime) -> None:
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("schedule times must be timezone-aware")


def _wall(t: datetime, tz: ZoneInfo) -> datetime:
    return t.astimezone(tz).replace(tzinfo=None)


def _instant(wall: datetime, tz: ZoneInfo) -> datetime | None:
    """The UTC instant of a wall time; ``None`` when it does not exist there (a DST gap).
    A doubled wall time maps to its first occurrence (``fold=0``): it runs once."""
    instant = wall.replace(tzinfo=tz).astimezone(UTC)
    if _wall(instant, tz) != wall:
        return None
    return instant


def run_uid(name: str, slot: datetime) -> str:
    """The uid of the run of ``name`` for ``slot``: the same on every attempt, after any crash,
    on any replica, so the executor's uid lookup finds a run that was already submitted."""
    stamp = slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return hashlib.sha256(f"{name}\n{stamp}".encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class ScheduleState:
    """What the store keeps per scheduled manifest."""

    #: :attr:`Schedule.key` this state belongs to.
    key: tuple[str, str]
    #: When this schedule took effect: slots at or before it never run.
    since: datetime
    #: The last slot handled (fired, skipped or reported missed).
    last_slot: datetime | None = None

    @property
    def floor(self) -> datetime:
        """Slots at or before this are done with."""
        return self.since if self.last_slot is None else max(self.since, self.last_slot)

    def after(self, decision: Decision) -> ScheduleState:
        """The state to record (before acting) once ``decision`` is taken."""
        if decision.last_slot is None:
            return self
        return replace(self, last_slot=decision.last_slot)


def track(schedule: Schedule, state: ScheduleState | None, now: datetime) -> ScheduleState:
    """The state for ``schedule``: kept while its slots are the same, else begun at ``now``,
    so a new or changed expression or time zone runs its next slot, never a past one. Changing
    only concurrency, deadline, keepRuns or suspend keeps the state: suspend does not forget."""
    _aware(now)
    if state is not None and state.key == schedule.key:
        return state
    return ScheduleState(schedule.key, now, None if state is None else state.last_slot)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do now, and why."""

    action: Action
    reason: str
    #: ``fire``/``skip``: the slot acted on.
    slot: datetime | None = None
    #: ``fire``: the run's uid (:func:`run_uid`).
    uid: str | None = None
    #: ``fire`` with ``concurrency: replace``: stop the active run first.
    stop_active: bool = False
    #: Slots reported missed, newest first, at most :data:`MAX_MISSED_LISTED`.
    missed: tuple[datetime, ...] = ()
    #: More slots were missed than are listed.
    missed_more: bool = False
    #: The new last slot to record; ``None``: nothing handled.
    last_slot: datetime | None = None
    #: When to look again: the next slot. ``None``: suspended, or no slot will ever come.
    next_run: datetime | None = None


def decide(schedule: Schedule, name: str, state: ScheduleState, *, active: bool,
           now: datetime) -> Decision:
    """The decision for one scheduled manifest at ``now`` (see the module docstring)."""
    _aware(now)
    if schedule.suspend:
        return Decision("wait", "suspended")
    floor = state.floor
    due: list[datetime] = []
    more = False
    for slot in schedule.slots_back(now):
        if slot <= floor:
            break
        if len(due) > MAX_MISSED_LISTED:
            more = True
            break
        due.append(slot)
    if not due:
        upcoming = schedule.next_after(max(now, floor))
        return Decision("wait", "no slot due" if upcoming else "the expression has no more slots",
                        next_run=upcoming)
    newest, older = due[0], tuple(due[1:])
    upcoming = schedule.next_after(max(now, newest))
    late = (now - newest).total_seconds()
    deadline = schedule.starting_deadline
    if deadline is not None and late > deadline:
        missed = tuple(due[:MAX_MISSED_LISTED])
        return Decision("missed", f"{_count(len(due), more)} missed by more than "
                        f"startingDeadline ({deadline}s)", missed=missed,
                        missed_more=more or len(due) > MAX_MISSED_LISTED, last_slot=newest,
                        next_run=upcoming)
    older_note = f"; {_count(len(older), more)} before it missed" if older else ""
    if active and schedule.concurrency == "forbid":
        return Decision("skip", f"the previous run is still active (concurrency forbid)"
                        f"{older_note}", slot=newest, missed=older, missed_more=more,
                        last_slot=newest, next_run=upcoming)
    if active:
        how = ("stop the previous run first (concurrency replace)"
               if schedule.concurrency == "replace"
               else "the previous run keeps running (concurrency allow)")
        reason = f"slot due; {how}{older_note}"
    else:
        reason = f"slot due{older_note}"
    return Decision("fire", reason, slot=newest, uid=run_uid(name, newest),
                    stop_active=active and schedule.concurrency == "replace", missed=older,
                    missed_more=more, last_slot=newest, next_run=upcoming)


def _count(n: int, more: bool) -> str:
    return f"{'more than ' if more else ''}{n} slot{'' if n == 1 and not more else 's'}"


def next_run_text(schedule: Schedule, state: ScheduleState | None, now: datetime) -> str:
    """One phrase for ``plan``: when this schedule runs next, in its own time zone."""
    if schedule.suspend:
        return "schedule suspended"
    decision = decide(schedule, "", track(schedule, state, now), active=False, now=now)
    if decision.action == "fire" and decision.slot is not None:
        return f"slot {_local(decision.slot, schedule)} due now"
    if decision.next_run is None:
        return "no further slots"
    return f"next run {_local(decision.next_run, schedule)}"


def local_time(schedule: Schedule, instant: datetime) -> str:
    """``instant`` in the schedule's own time zone, named: what ``plan`` and events show."""
    return _local(instant, schedule)


def _local(instant: datetime, schedule: Schedule) -> str:
    return f"{instant.astimezone(schedule._tz).isoformat()} ({schedule.timezone})"
