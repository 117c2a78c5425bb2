"""The daemon's timers, in-process with a fake clock: no sleeping."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest

from reconciler.app.wiring import open_store
from reconciler.backends.signing import load_signer
from reconciler.ports import Backend
from reconciler.service.daemon import Daemon
from reconciler.service.timers import (
    SCHEDULE_SPEED_ENV,
    Backoff,
    PollBudget,
    ScheduleClock,
    Settle,
)
from reconciler.settings import load_settings


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_a_path_settles_once_quiet_for_the_debounce() -> None:
    clock = FakeClock()
    settle = Settle(debounce=0.15, max_delay=1.0, clock=clock)
    assert not settle and not settle.due() and settle.deadline() == float("inf")
    settle.changed("a.yaml")
    assert settle and not settle.due()
    assert settle.deadline() == pytest.approx(1000.15)
    clock.advance(0.1)
    settle.changed("a.yaml")  # still being written: the quiet period starts again
    clock.advance(0.1)
    assert not settle.due()
    clock.advance(0.06)
    assert settle.due()
    assert settle.take_settling() == frozenset()  # settled: handed over, forgotten
    assert not settle


def test_a_path_that_never_stops_changing_is_taken_after_max_delay() -> None:
    clock = FakeClock()
    settle = Settle(debounce=0.15, max_delay=1.0, clock=clock)
    for _ in range(10):  # rewritten every 0.1 s: never quiet
        settle.changed("busy.yaml")
        clock.advance(0.1)
    assert settle.deadline() == pytest.approx(1001.0)
    assert settle.due()


def test_paths_still_changing_go_to_the_planner_as_settling() -> None:
    clock = FakeClock()
    settle = Settle(debounce=0.15, max_delay=1.0, clock=clock)
    settle.changed("old.yaml")
    clock.advance(0.2)
    settle.changed("new.yaml")
    assert settle.due()  # old.yaml settled
    assert settle.take_settling() == frozenset({"new.yaml"})
    assert settle.deadline() == pytest.approx(1000.35)


def test_fetch_backoff_doubles_up_to_its_cap_and_resets_on_success() -> None:
    clock = FakeClock()
    fetches = Backoff(interval=30.0, cap=300.0, clock=clock)
    assert fetches.due()  # the first fetch runs at once
    assert [fetches.failed() for _ in range(6)] == [30.0, 60.0, 120.0, 240.0, 300.0, 300.0]
    assert fetches.next_at == pytest.approx(1300.0) and not fetches.due()
    clock.advance(300.0)
    assert fetches.due()
    assert fetches.succeeded() is True  # it had been failing: a pass shows the recovery
    assert fetches.failures == 0 and fetches.next_at == pytest.approx(1330.0)
    assert fetches.succeeded() is False


def test_a_backoff_can_start_disarmed() -> None:
    fetches = Backoff(interval=30.0, cap=300.0, clock=FakeClock(), first_at=float("inf"))
    assert not fetches.due()


def test_polling_stretches_to_stay_within_its_cpu_budget() -> None:
    cpu = FakeClock(0.0)
    poll = PollBudget(interval=10.0, budget=0.005, cpu_clock=cpu)
    with poll.measuring():
        cpu.advance(0.01)  # a cheap poll keeps the interval
    assert poll.delay() == 10.0
    with poll.measuring():
        cpu.advance(0.2)  # a list of 10,000 jobs
    assert poll.cost == pytest.approx(0.2) and poll.delay() == pytest.approx(40.0)


def test_polling_backs_off_while_failing_up_to_two_minutes() -> None:
    poll = PollBudget(interval=10.0, budget=0.005, cpu_clock=FakeClock(0.0))
    delays = []
    for failures in range(6):
        poll.failures = failures
        delays.append(poll.delay())
    assert delays == [10.0, 20.0, 40.0, 80.0, 120.0, 120.0]
    long = PollBudget(interval=300.0, budget=0.005)
    long.failures = 3
    assert long.delay() == 300.0  # the cap never shortens a long interval


def test_the_cost_is_measured_even_when_the_poll_fails() -> None:
    cpu = FakeClock(0.0)
    poll = PollBudget(interval=10.0, budget=0.005, cpu_clock=cpu)
    with pytest.raises(RuntimeError), poll.measuring():
        cpu.advance(0.1)
        raise RuntimeError("unreachable")
    assert poll.cost == pytest.approx(0.1)


def test_a_reload_retimes_the_daemon(tmp_path: Path, rsa_key: Path) -> None:
    """The daemon read these settings at every deadline; its timers must follow a reload."""
    settings = load_settings(None, manifests=tmp_path)
    fresh = load_settings(None, manifests=tmp_path, debounce=0.5, max_delay=2.0,
                          git_interval=60.0, poll_interval=20.0, poll_budget=0.01)
    with open_store(tmp_path / "s.db") as store:
        daemon = Daemon(settings, load_signer(rsa_key), store, reload=lambda: fresh)
        daemon._backend = cast(Backend, object())  # only run() opens the real one
        daemon._apply_reload()
        assert (daemon._settle.debounce, daemon._settle.max_delay) == (0.5, 2.0)
        assert (daemon._fetches.interval, daemon._fetches.cap) == (60.0, 600.0)
        assert (daemon._poll.interval, daemon._poll.budget) == (20.0, 0.01)


def test_the_schedule_clock_is_the_wall_clock_unless_a_test_speeds_it_up() -> None:
    wall = [1000.0]
    plain = ScheduleClock(wall=lambda: wall[0])
    fast = ScheduleClock(60, anchor=900.0, wall=lambda: wall[0])
    assert (plain.now(), plain.seconds_until(1060.0)) == (1000.0, 60.0)
    assert fast.now() == 900.0 + 100 * 60
    assert fast.seconds_until(fast.now() + 60) == 1.0  # one schedule minute: one real second
    assert fast.seconds_until(0.0) == 0.0
    restarted = ScheduleClock.from_environment({SCHEDULE_SPEED_ENV: "60@900"})
    assert (restarted.speed, restarted.anchor) == (60.0, 900.0)
    with pytest.raises(ValueError, match=SCHEDULE_SPEED_ENV):
        ScheduleClock.from_environment({SCHEDULE_SPEED_ENV: "fast"})
