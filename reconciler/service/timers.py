"""The daemon's timing rules as small objects with an injected clock, so each is tested
in-process without sleeping (``tests/test_timers.py``); :mod:`reconciler.service.daemon` only
asks them when the next piece of work is due.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

Clock = Callable[[], float]


class Settle:
    """Per-path settling: a changed path is acted on once it has been quiet for ``debounce``
    seconds, or once it has kept changing for ``max_delay`` (a file rewritten nonstop is taken
    as it is then). Why per path and not per folder: ``docs/design.md``, "Departures"."""

    def __init__(self, debounce: float, max_delay: float, clock: Clock = time.monotonic) -> None:
        self.debounce, self.max_delay = debounce, max_delay
        self._clock = clock
        #: path key -> (first, last) event time of changes not yet settled
        self._pending: dict[str, tuple[float, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def changed(self, key: str) -> None:
        now = self._clock()
        first, _ = self._pending.get(key, (now, now))
        self._pending[key] = (first, now)

    def deadline(self) -> float:
        """When the first pending path settles (inf when none is pending)."""
        debounce, max_delay = self.debounce, self.max_delay
        return min((min(last + debounce, first + max_delay)
                    for first, last in self._pending.values()), default=float("inf"))

    def due(self) -> bool:
        return bool(self._pending) and self._clock() >= self.deadline()

    def take_settling(self) -> frozenset[str]:
        """Forget the settled paths; return those still changing, for the planner."""
        now = self._clock()
        debounce, max_delay = self.debounce, self.max_delay
        self._pending = {key: (first, last) for key, (first, last) in self._pending.items()
                         if now - last < debounce and now - first < max_delay}
        return frozenset(self._pending)


class Backoff:
    """A periodic job that backs off while it fails: due every ``interval`` seconds; after
    the n-th failure in a row, ``interval * 2**(n-1)`` seconds, at most ``cap``."""

    def __init__(self, interval: float, cap: float, clock: Clock = time.monotonic,
                 *, first_at: float | None = None) -> None:
        self.interval, self.cap = interval, cap
        self._clock = clock
        self.failures = 0
        #: When it is next due (monotonic); ``first_at`` defaults to at once.
        self.next_at = clock() if first_at is None else first_at

    def due(self) -> bool:
        return self._clock() >= self.next_at

    def failed(self) -> float:
        """Count a failure; returns the delay until the next try."""
        self.failures += 1
        delay = float(min(self.cap, self.interval * 2 ** (self.failures - 1)))
        self.next_at = self._clock() + delay
        return delay

    def succeeded(self) -> bool:
        """Back to the plain interval; True when it had been failing."""
        was_failing, self.failures = self.failures > 0, 0
        self.next_at = self._clock() + self.interval
        return was_failing


class PollBudget:
    """How long until the next poll of live jobs: ``interval``, doubling while the backend
    cannot be reached (up to ``max(interval, 120 s)``), and stretched so that polling uses at
    most ``budget`` of one core (the legacy list has no paging; parsing 10,000 jobs costs
    ~0.2 s of CPU). ``cpu_clock`` measures what a poll cost."""

    FAILING_CAP = 120.0

    def __init__(self, interval: float, budget: float,
                 cpu_clock: Clock = time.process_time) -> None:
        self.interval, self.budget = interval, budget
        self._cpu_clock = cpu_clock
        self.failures = 0
        self.cost = 0.0  # CPU seconds the last poll took

    @contextmanager
    def measuring(self) -> Iterator[None]:
        started = self._cpu_clock()
        try:
            yield
        finally:
            self.cost = self._cpu_clock() - started

    def delay(self) -> float:
        interval = self.interval
        backoff = min(max(interval, self.FAILING_CAP), interval * 2.0 ** self.failures)
        return float(max(backoff, self.cost / self.budget))


#: Test-only: ``SPEED`` or ``SPEED@ANCHOR`` (Unix seconds): schedule time runs ``SPEED`` times
#: faster than the wall clock from ``ANCHOR`` (default: the daemon's start), so restarted
#: daemons given the same anchor agree on it (README, "Schedules"). Never set it in
#: production: slots would fire early.
SCHEDULE_SPEED_ENV = "RECONCILER_TEST_SCHEDULE_SPEED"


class ScheduleClock:
    """The time scheduled manifests' slots are decided at, and how long the daemon sleeps
    until one is due: the wall clock; the daemon's loop wakes at the next slot, no polling.

    ``speed`` and ``anchor`` (tests only, from ``RECONCILER_TEST_SCHEDULE_SPEED``) make schedule
    time ``anchor + (wall - anchor) * speed``: at 60, a ``* * * * *`` schedule fires every
    second of real time. Every other timer (debounce, polls, backoff) keeps real time."""

    def __init__(self, speed: float = 1.0, anchor: float | None = None,
                 wall: Clock = time.time) -> None:
        if not speed > 0:
            raise ValueError("the schedule clock's speed must be positive")
        self.speed = speed
        self._wall = wall
        self.anchor = wall() if anchor is None else anchor

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ScheduleClock:
        text = environ.get(SCHEDULE_SPEED_ENV, "").strip()
        if not text:
            return cls()
        speed, _, anchor = text.partition("@")
        try:
            return cls(float(speed), float(anchor) if anchor else None)
        except ValueError:
            raise ValueError(f"{SCHEDULE_SPEED_ENV}: not SPEED or SPEED@ANCHOR") from None

    def now(self) -> float:
        if self.speed == 1.0:
            return self._wall()
        return self.anchor + (self._wall() - self.anchor) * self.speed

    def seconds_until(self, at: float) -> float:
        """Real seconds until schedule time reaches ``at`` (0 when it has)."""
        return max(0.0, (at - self.now()) / self.speed)


class Renewal:
    """When to campaign for the lease next: ``interval`` after the previous campaign
    *started*, so a slow round trip does not push renewals later and later (a leader renews
    three times per lease; docs/design.md, "High availability"). A campaign that overran its
    interval is followed by the next one at once."""

    def __init__(self, interval: float, clock: Clock = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._started: float | None = None

    def started(self) -> None:
        self._started = self._clock()

    def delay(self) -> float:
        if self._started is None:
            return 0.0
        return max(0.0, self._started + self.interval - self._clock())
