"""Scheduled manifests, the pure part: slots across DST, missed slots, concurrency, suspend,
schedule edits, run uids, validation. Time is a parameter everywhere: no sleeping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.domain.desired import Desired
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import Action, PlanPolicy, plan
from reconciler.domain.schedule import (
    MAX_MISSED_LISTED,
    Decision,
    Schedule,
    ScheduleState,
    check_expression,
    decide,
    next_run_text,
    run_uid,
    track,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0,
          second: int = 0, fold: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


def slots(schedule: Schedule, start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    t = start
    while (nxt := schedule.next_after(t)) is not None and nxt <= end:
        out.append(nxt)
        t = nxt
    return out


@dataclass
class Clock:
    """A fake daemon loop: wakes at each decision's next_run, records state before acting."""

    schedule: Schedule
    now: datetime
    name: str = "nightly"
    state: ScheduleState | None = None
    active: bool = False
    log: list[Decision] = field(default_factory=list)

    def step(self, now: datetime | None = None) -> Decision:
        if now is not None:
            self.now = now
        self.state = track(self.schedule, self.state, self.now)
        decision = decide(self.schedule, self.name, self.state, active=self.active, now=self.now)
        self.state = self.state.after(decision)
        self.log.append(decision)
        return decision

    def run_until(self, end: datetime) -> list[datetime]:
        """Sleep (by setting the clock) to each next run until ``end``; the slots fired."""
        fired: list[datetime] = []
        decision = self.step()
        while decision.next_run is not None and decision.next_run <= end:
            decision = self.step(decision.next_run)
            if decision.action == "fire" and decision.slot is not None:
                fired.append(decision.slot)
            if decision.action != "wait":  # acted: asking again at once finds nothing to do
                decision = self.step()
                assert decision.action == "wait", decision
        return fired


# --- DST ------------------------------------------------------------------------------------


def test_berlin_spring_forward_skips_the_missing_slot() -> None:
    # 29 Mar 2026: 02:00 CET jumps to 03:00 CEST; 02:30 does not exist that day.
    daily = Schedule("30 2 * * *", "Europe/Berlin")
    got = slots(daily, local(BERLIN, 2026, 3, 27), local(BERLIN, 2026, 3, 31))
    assert [s.astimezone(BERLIN) for s in got] == [
        local(BERLIN, 2026, 3, 27, 2, 30), local(BERLIN, 2026, 3, 28, 2, 30),
        local(BERLIN, 2026, 3, 30, 2, 30)]
    hourly = Schedule("0 * * * *", "Europe/Berlin")
    got = slots(hourly, utc(2026, 3, 28, 23, 30), utc(2026, 3, 29, 2, 30))
    assert [s.astimezone(BERLIN).hour for s in got] == [1, 3, 4]  # no 02:00


def test_berlin_fall_back_runs_the_doubled_slot_once() -> None:
    # 25 Oct 2026: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
    daily = Schedule("30 2 * * *", "Europe/Berlin")
    got = slots(daily, local(BERLIN, 2026, 10, 24), local(BERLIN, 2026, 10, 27))
    assert got == [utc(2026, 10, 24, 0, 30), utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]
    # the run is at the first 02:30 (CEST), and asking from inside the second one finds nothing
    assert got[1].astimezone(BERLIN).tzname() == "CEST"
    second = local(BERLIN, 2026, 10, 25, 2, 40, fold=1)
    assert daily.next_after(second) == utc(2026, 10, 26, 1, 30)
    assert daily.latest_at(second) == utc(2026, 10, 25, 0, 30)
    # inside the second 02:xx every first 02:xx is past, up to 02:59 CEST
    minutely = Schedule("* * * * *", "Europe/Berlin")
    assert minutely.latest_at(second) == utc(2026, 10, 25, 0, 59)
    assert minutely.next_after(second) == local(BERLIN, 2026, 10, 25, 3, 0)
    hourly = Schedule("0 * * * *", "Europe/Berlin")
    got = slots(hourly, utc(2026, 10, 24, 22, 30), utc(2026, 10, 25, 3, 30))
    assert [s.astimezone(BERLIN).strftime("%H%Z") for s in got] == [
        "01CEST", "02CEST", "03CET", "04CET"]  # 02:00 once


def test_new_york_spring_and_fall() -> None:
    # 8 Mar 2026 02:00 EST -> 03:00 EDT; 1 Nov 2026 02:00 EDT -> 01:00 EST.
    spring = Schedule("30 2 * * *", "America/New_York")
    got = slots(spring, local(NEW_YORK, 2026, 3, 7), local(NEW_YORK, 2026, 3, 10))
    assert [s.astimezone(NEW_YORK).day for s in got] == [7, 9]
    fall = Schedule("30 1 * * *", "America/New_York")
    got = slots(fall, local(NEW_YORK, 2026, 10, 31), local(NEW_YORK, 2026, 11, 3))
    assert got == [utc(2026, 10, 31, 5, 30), utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]
    minutely = Schedule("*/20 * * * *", "America/New_York")
    got = slots(minutely, utc(2026, 11, 1, 5, 0), utc(2026, 11, 1, 8, 0))
    # 01:00-01:40 EDT, then the repeated hour is skipped: next is 02:00 EST
    assert [s.astimezone(NEW_YORK).strftime("%H:%M%Z") for s in got] == [
        "01:20EDT", "01:40EDT", "02:00EST", "02:20EST", "02:40EST", "03:00EST"]


@pytest.mark.parametrize(("tz", "expr", "start", "end", "fired"), [
    ("Europe/Berlin", "30 2 * * *", utc(2026, 3, 27), utc(2026, 3, 31), 3),
    ("Europe/Berlin", "30 2 * * *", utc(2026, 10, 23), utc(2026, 10, 27), 4),
    ("America/New_York", "30 2 * * *", utc(2026, 3, 6), utc(2026, 3, 10), 3),
    ("America/New_York", "30 1 * * *", utc(2026, 10, 30), utc(2026, 11, 3), 4),
])
def test_a_fake_clock_daemon_fires_each_existing_slot_once(
        tz: str, expr: str, start: datetime, end: datetime, fired: int) -> None:
    clock = Clock(Schedule(expr, tz), start)
    got = clock.run_until(end)
    assert got == slots(clock.schedule, start, end)
    assert len(got) == fired and len(set(got)) == fired
    assert all(d.action in ("fire", "wait") for d in clock.log)  # on time: nothing missed


# --- downtime and the deadline ---------------------------------------------------------------


def test_after_downtime_only_the_newest_slot_within_the_deadline_runs() -> None:
    daily = Schedule("0 3 * * *", "Europe/Berlin", starting_deadline=600)
    state = ScheduleState(daily.key, utc(2026, 5, 1), last_slot=None)
    # down from 1 May to 4 May 03:05 local: four slots passed, the last 5 minutes ago
    decision = decide(daily, "report", state, active=False,
                      now=local(BERLIN, 2026, 5, 4, 3, 5))
    assert decision.action == "fire"
    assert decision.slot == local(BERLIN, 2026, 5, 4, 3, 0)
    assert decision.missed == (local(BERLIN, 2026, 5, 3, 3), local(BERLIN, 2026, 5, 2, 3),
                               local(BERLIN, 2026, 5, 1, 3))
    assert "3 slots before it missed" in decision.reason
    assert decision.next_run == local(BERLIN, 2026, 5, 5, 3, 0)
    state = state.after(decision)
    # a restart a second later fires nothing more
    again = decide(daily, "report", state, active=False, now=local(BERLIN, 2026, 5, 4, 3, 6))
    assert again.action == "wait" and again.slot is None and again.missed == ()


def test_slots_older_than_the_deadline_are_reported_missed_not_run() -> None:
    daily = Schedule("0 3 * * *", "Europe/Berlin", starting_deadline=600)
    state = ScheduleState(daily.key, utc(2026, 5, 1))
    decision = decide(daily, "report", state, active=False,
                      now=local(BERLIN, 2026, 5, 4, 3, 10, 1))
    assert decision.action == "missed" and decision.uid is None
    assert len(decision.missed) == 4 and decision.last_slot == local(BERLIN, 2026, 5, 4, 3)
    assert "startingDeadline (600s)" in decision.reason
    # exactly at the deadline it still runs
    on_time = decide(daily, "report", state, active=False, now=local(BERLIN, 2026, 5, 4, 3, 10))
    assert on_time.action == "fire"
    # without a deadline the newest runs however late
    lenient = Schedule("0 3 * * *", "Europe/Berlin")
    late = decide(lenient, "report", ScheduleState(lenient.key, utc(2026, 5, 1)), active=False,
                  now=local(BERLIN, 2026, 5, 4, 23, 0))
    assert late.action == "fire" and late.slot == local(BERLIN, 2026, 5, 4, 3)


def test_a_long_outage_lists_a_bounded_number_of_missed_slots() -> None:
    every_minute = Schedule("* * * * *")
    state = ScheduleState(every_minute.key, utc(2026, 1, 1))
    decision = decide(every_minute, "x", state, active=False, now=utc(2026, 2, 1))
    assert decision.action == "fire" and decision.slot == utc(2026, 2, 1)
    assert len(decision.missed) == MAX_MISSED_LISTED and decision.missed_more
    assert "more than" in decision.reason


# --- concurrency ------------------------------------------------------------------------------


@pytest.mark.parametrize(("concurrency", "active", "action", "stop"), [
    ("forbid", False, "fire", False),
    ("forbid", True, "skip", False),
    ("allow", True, "fire", False),
    ("replace", True, "fire", True),
    ("replace", False, "fire", False),
])
def test_concurrency_modes(concurrency: str, active: bool, action: str, stop: bool) -> None:
    hourly = Schedule("@hourly", concurrency=concurrency)  # type: ignore[arg-type]
    state = ScheduleState(hourly.key, utc(2026, 1, 1))
    decision = decide(hourly, "imp", state, active=active, now=utc(2026, 1, 1, 1, 0, 2))
    assert (decision.action, decision.stop_active) == (action, stop)
    assert decision.slot == utc(2026, 1, 1, 1) == decision.last_slot
    assert (decision.uid is not None) == (action == "fire")
    assert concurrency in decision.reason or not active
    # whatever was decided, the slot is done with
    after = decide(hourly, "imp", state.after(decision), active=False,
                   now=utc(2026, 1, 1, 1, 0, 3))
    assert after.action == "wait" and after.next_run == utc(2026, 1, 1, 2)


def test_forbid_skips_while_a_run_is_active_then_fires_again() -> None:
    clock = Clock(Schedule("*/10 * * * *"), utc(2026, 1, 1))
    clock.step()
    assert clock.step(utc(2026, 1, 1, 0, 10)).action == "fire"
    clock.active = True
    assert clock.step(utc(2026, 1, 1, 0, 20)).action == "skip"
    clock.active = False
    third = clock.step(utc(2026, 1, 1, 0, 30))
    assert third.action == "fire" and third.slot == utc(2026, 1, 1, 0, 30)


# --- suspend and edits ------------------------------------------------------------------------


def test_suspend_pauses_without_forgetting() -> None:
    running = Schedule("0 3 * * *", starting_deadline=3600)
    clock = Clock(running, utc(2026, 1, 1))
    assert clock.run_until(utc(2026, 1, 2, 12)) == [utc(2026, 1, 1, 3), utc(2026, 1, 2, 3)]
    kept = clock.state
    clock.schedule = Schedule("0 3 * * *", starting_deadline=3600, suspend=True)
    paused = clock.step(utc(2026, 1, 6, 3, 30))
    assert paused == Decision("wait", "suspended")
    assert clock.state == kept  # last slot remembered
    assert "suspended" in next_run_text(clock.schedule, clock.state, clock.now)
    clock.schedule = running
    resumed = clock.step()  # as after downtime: the newest slot in the deadline, others missed
    assert resumed.action == "fire" and resumed.slot == utc(2026, 1, 6, 3)
    assert resumed.missed == (utc(2026, 1, 5, 3), utc(2026, 1, 4, 3), utc(2026, 1, 3, 3))


def test_a_changed_expression_runs_its_next_slot_not_a_past_one() -> None:
    clock = Clock(Schedule("0 3 * * *"), utc(2026, 1, 1, 12))
    assert clock.run_until(utc(2026, 1, 2, 10)) == [utc(2026, 1, 2, 3)]
    # at 10:00 the file now says 04:00: today's 04:00 has passed and must not run
    clock.schedule = Schedule("0 4 * * *")
    edited = clock.step(utc(2026, 1, 2, 10))
    assert edited.action == "wait" and edited.next_run == utc(2026, 1, 3, 4)
    assert clock.state is not None and clock.state.since == utc(2026, 1, 2, 10)
    assert clock.state.last_slot == utc(2026, 1, 2, 3)
    assert clock.run_until(utc(2026, 1, 4, 10)) == [utc(2026, 1, 3, 4), utc(2026, 1, 4, 4)]


def test_a_changed_time_zone_is_a_new_schedule_other_edits_are_not() -> None:
    before = Schedule("0 3 * * *")
    state = track(before, None, utc(2026, 1, 1))
    later = utc(2026, 1, 5)
    for same in (Schedule("0  3 * * *", concurrency="allow", starting_deadline=9,
                          keep_runs=1, suspend=True),):
        assert track(same, state, later) is state
    assert track(Schedule("0 3 * * *", "Europe/Berlin"), state, later).since == later
    assert track(Schedule("@daily"), state, later).since == later


def test_a_new_schedule_does_not_run_its_past_slots() -> None:
    daily = Schedule("0 3 * * *")
    state = track(daily, None, utc(2026, 1, 1, 12))
    decision = decide(daily, "x", state, active=False, now=utc(2026, 1, 1, 12))
    assert decision.action == "wait" and decision.next_run == utc(2026, 1, 2, 3)
    assert next_run_text(daily, None, utc(2026, 1, 1, 12)) == \
        "next run 2026-01-02T03:00:00+00:00 (UTC)"
    berlin = Schedule("0 3 * * *", "Europe/Berlin")
    assert next_run_text(berlin, None, utc(2026, 7, 1)) == \
        "next run 2026-07-01T03:00:00+02:00 (Europe/Berlin)"


def test_a_clock_that_goes_back_does_not_fire_again() -> None:
    clock = Clock(Schedule("0 * * * *"), utc(2026, 1, 1))
    clock.step()
    assert clock.step(utc(2026, 1, 1, 5)).action == "fire"
    back = clock.step(utc(2026, 1, 1, 3, 30))
    assert back.action == "wait" and back.next_run == utc(2026, 1, 1, 6)


def test_times_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Schedule("@daily").next_after(datetime(2026, 1, 1))


# --- uids ---------------------------------------------------------------------------------


def test_run_uid_is_a_function_of_name_and_slot() -> None:
    slot = utc(2026, 10, 25, 0, 30)
    uid = run_uid("report", slot)
    assert len(uid) == 32 and int(uid, 16) >= 0
    assert uid == run_uid("report", slot.astimezone(BERLIN))  # the instant, not its spelling
    assert uid != run_uid("report", slot + timedelta(minutes=1))
    assert uid != run_uid("report2", slot)
    daily = Schedule("30 2 * * *", "Europe/Berlin")
    fired = decide(daily, "report", ScheduleState(daily.key, utc(2026, 10, 24, 12)),
                   active=False, now=utc(2026, 10, 25, 0, 31))
    assert fired.uid == uid


# --- validation -------------------------------------------------------------------------------


def envelope(policy: str) -> bytes:
    return ("apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: nightly\n"
            "spec:\n  engine: noop\n  publisher: noop\n"
            f"policy:\n{policy}").encode()


@pytest.mark.parametrize(("policy", "error"), [
    ('  schedule: "61 3 * * *"\n',
     "jobs/n.yaml:9: policy.schedule: not a valid cron expression: bad minute"),
    ('  schedule: "0 3 * *"\n',
     "jobs/n.yaml:9: policy.schedule: a cron expression has five fields"),
    ('  schedule: "0 0 30 2 *"\n',
     "jobs/n.yaml:9: policy.schedule: not a valid cron expression: bad day-of-month"),
    ('  schedule: "0 3 * * * 2026"\n', "jobs/n.yaml:9: policy.schedule: a cron expression"),
    ("  schedule: '@fortnightly'\n", "jobs/n.yaml:9: policy.schedule: unknown shorthand"),
    ('  schedule: "@daily"\n  timezone: Europe/Berlín\n',
     "jobs/n.yaml:10: policy.timezone: not an IANA time zone name"),
    ('  schedule: "@daily"\n  timezone: localtime\n',
     "jobs/n.yaml:10: policy.timezone: not an IANA time zone name"),
    ('  schedule: "@daily"\n  concurrency: sometimes\n',
     "jobs/n.yaml:10: policy.concurrency: Input should be 'forbid', 'allow' or 'replace'"),
    ('  schedule: "@daily"\n  startingDeadline: 0\n',
     "jobs/n.yaml:10: policy.startingDeadline: Input should be greater than or equal to 1"),
    ('  schedule: "@daily"\n  suspend: "yes"\n',
     "jobs/n.yaml:10: policy.suspend: Input should be a valid boolean"),
    ("  onChange: keep\n  timezone: UTC\n  keepRuns: 3\n",
     "jobs/n.yaml:9: policy: keepRuns, timezone only apply with schedule"),
])
def test_validate_names_file_line_and_field(policy: str, error: str) -> None:
    result = load_file("jobs/n.yaml", envelope(policy))
    assert result.manifests == ()
    [got] = result.errors
    assert str(got).startswith(error), str(got)
    assert got.names == ("nightly",)  # a broken schedule still holds its job


def test_schedule_errors_never_echo_the_value() -> None:
    secret = "tok3n-s3cret"
    for policy in (f'  schedule: "{secret} * * * *"\n', f'  schedule: "{secret}"\n',
                   f'  schedule: "@daily"\n  timezone: "{secret}"\n'):
        [error] = load_file("n.yaml", envelope(policy)).errors
        assert secret not in str(error)


def test_a_valid_schedule_loads() -> None:
    result = load_file("n.yaml", envelope(
        '  schedule: "0 3 * * *"\n  timezone: Europe/Berlin\n  concurrency: replace\n'
        "  startingDeadline: 600\n  keepRuns: 2\n  suspend: false\n"))
    assert result.errors == ()
    [manifest] = result.manifests
    assert manifest.policy.as_schedule() == Schedule(
        "0 3 * * *", "Europe/Berlin", "replace", 600, 2, False)
    unscheduled = load_file("m.yaml", envelope("  onChange: keep\n")).manifests[0]
    assert unscheduled.policy.as_schedule() is None
    for macro, cron in (("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"),
                        ("@weekly", "0 0 * * 0"), ("@monthly", "0 0 1 * *")):
        assert check_expression(macro) == cron


def test_the_planner_never_runs_a_scheduled_manifest_as_a_one_shot_job() -> None:
    # A new scheduled manifest waits for its first slot (a no-op naming it), never runs now.
    [scheduled] = load_file("n.yaml", envelope('  schedule: "@daily"\n')).manifests
    [once] = load_file("m.yaml", envelope("  onChange: keep\n").replace(
        b"name: nightly", b"name: once")).manifests
    desired = Desired(True, manifests={"nightly": scheduled, "once": once}, file_count=2)
    the_plan = plan(desired, [], PlanPolicy(), now=3600)
    actions = {d.name: d.action for d in the_plan.decisions}
    assert actions == {"nightly": Action.NOOP, "once": Action.SUBMIT}
    assert "next run 1970-01-02T00:00:00+00:00 (UTC)" in the_plan.decisions[0].reason
    assert the_plan.next_slot == 86400.0
    assert the_plan.schedule_updates["nightly"].since.timestamp() == 3600


# --- properties -----------------------------------------------------------------------------

EXPRESSIONS = ["* * * * *", "*/7 * * * *", "0 * * * *", "30 2 * * *", "30 1 * * *",
               "0 2-3 * * *", "15,45 0-4 * * 1-5", "0 0 29 2 *", "@daily", "@weekly",
               "59 23 L * *"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu",
         "America/Santiago"]
START = utc(2026, 3, 1)
# fake clock readings: mostly forward in small steps around DST dates, sometimes back
STEPS = st.lists(st.tuples(st.integers(-7200, 4 * 86400), st.booleans()), max_size=40)


@settings(max_examples=150, deadline=None)
@given(expr=st.sampled_from(EXPRESSIONS), tz=st.sampled_from(ZONES),
       concurrency=st.sampled_from(["forbid", "allow", "replace"]),
       deadline=st.none() | st.integers(1, 7200), steps=STEPS,
       offset=st.integers(0, 300 * 86400), suspends=st.lists(st.booleans(), max_size=40))
def test_no_slot_fires_twice(expr: str, tz: str, concurrency: str, deadline: int | None,
                             steps: Sequence[tuple[int, bool]], offset: int,
                             suspends: Sequence[bool]) -> None:
    now = START + timedelta(seconds=offset)
    name = "p"
    state: ScheduleState | None = None
    fired: list[datetime] = []
    handled: list[datetime] = []
    for i, (delta, active) in enumerate(steps):
        now += timedelta(seconds=delta)
        suspend = suspends[i] if i < len(suspends) else False
        schedule = Schedule(expr, tz, concurrency, deadline, suspend=suspend)  # type: ignore[arg-type]
        state = track(schedule, state, now)
        decision = decide(schedule, name, state, active=active, now=now)
        state = state.after(decision)
        if decision.action != "wait":
            assert decision.slot is None or decision.slot <= now
            handled.extend([*([decision.slot] if decision.slot else []), *decision.missed])
            if decision.action == "fire":
                assert decision.slot is not None and decision.uid == run_uid(name, decision.slot)
                fired.append(decision.slot)
            # one acting decision covers every due slot: asking again at once finds nothing
            decision = decide(schedule, name, state, active=active, now=now)
            assert decision.action == "wait", decision
        assert decision.next_run is None or decision.next_run > now
    assert len(fired) == len(set(fired))
    assert len(handled) == len(set(handled))  # nothing fired, skipped or missed twice


@settings(max_examples=100, deadline=None)
@given(expr=st.sampled_from(EXPRESSIONS), tz=st.sampled_from(ZONES),
       offset=st.integers(0, 365 * 86400))
def test_slots_are_distinct_existing_wall_times(expr: str, tz: str, offset: int) -> None:
    schedule = Schedule(expr, tz)
    zone = ZoneInfo(tz)
    t = START + timedelta(seconds=offset)
    walls = []
    previous = None
    for _ in range(30):
        slot = schedule.next_after(t)
        if slot is None:
            break
        assert slot > t and (previous is None or slot > previous)
        assert schedule.latest_at(slot) == slot
        assert schedule.latest_at(slot - timedelta(microseconds=1)) in (previous, None) \
            or previous is None
        wall = slot.astimezone(zone).replace(tzinfo=None)
        # it exists: the wall time maps back to the same instant
        assert wall.replace(tzinfo=zone).astimezone(UTC) == slot
        walls.append(wall)
        previous = t = slot
    assert len(walls) == len(set(walls))
