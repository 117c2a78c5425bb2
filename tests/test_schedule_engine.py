"""Scheduled manifests driven through the engine in-process: the pure planner, the executor,
a real SQLite store and a fake backend, with a fake clock (no sleeping). Issue 16."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from reconciler.app.cli import main
from reconciler.backends.errors import AlreadyTerminal
from reconciler.domain.desired import Desired
from reconciler.domain.manifest import Manifest, Policy
from reconciler.domain.plan import Action, Plan, PlanPolicy, plan
from reconciler.domain.records import Phase
from reconciler.domain.schedule import run_uid
from reconciler.engine.executor import ApplyReport, Executor
from reconciler.ports import JobInfo, JobPhase
from reconciler.store.sqlite import Store
from tests.harness import envelope

POLICY = PlanPolicy()


def at(hhmm: str, day: int = 1) -> float:
    hour, minute = hhmm.split(":")
    return datetime(2026, 6, day, int(hour), int(minute), tzinfo=UTC).timestamp()


def slot(hhmm: str) -> datetime:
    return datetime.fromtimestamp(at(hhmm), UTC)


class Jobs:
    """A backend in domain terms: jobs by uid, stoppable; ``hang`` keeps submits waiting."""

    def __init__(self) -> None:
        self.by_uid: dict[str, JobInfo] = {}
        self.names: dict[str, str] = {}  # uid -> manifest name
        self.specs: dict[str, str] = {}  # uid -> spec hash
        self.stopped: list[str] = []
        self.hang = False
        self.store_before_hang = False

    @property
    def identity(self) -> str:
        return "fake"

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        if self.hang and not self.store_before_hang:
            await asyncio.Event().wait()  # killed before the request left
        job = JobInfo(f"job-{len(self.by_uid) + 1}", JobPhase.RUNNING, "Running", uid=uid)
        self.by_uid[uid], self.names[uid], self.specs[uid] = job, manifest.name, manifest.spec_hash
        if self.hang:
            await asyncio.Event().wait()  # killed after the requester stored it
        return job

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {uid: [self.by_uid[uid]] for uid in uids if uid in self.by_uid}

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        found: dict[str, list[JobInfo]] = {}
        for uid, job in self.by_uid.items():
            if self.names[uid] in names:
                found.setdefault(self.names[uid], []).append(job)
        return found

    async def stop(self, job_id: str, reason: str) -> str:
        for uid, job in self.by_uid.items():
            if job.job_id == job_id:
                if job.phase is not JobPhase.RUNNING:
                    raise AlreadyTerminal(job_id)
                self.by_uid[uid] = JobInfo(job_id, JobPhase.CANCELLED, "Cancelled", uid=uid)
                self.stopped.append(job_id)
                return "Cancelled"
        raise AlreadyTerminal(job_id)

    async def status(self, job_id: str) -> JobInfo | None:
        return next((j for j in self.by_uid.values() if j.job_id == job_id), None)

    async def owner_of(self, job_id: str) -> str | None:
        return "fake"

    def running(self) -> list[str]:
        return [u for u, j in self.by_uid.items() if j.phase is JobPhase.RUNNING]

    def finish_all(self) -> None:
        for uid, job in list(self.by_uid.items()):
            if job.phase is JobPhase.RUNNING:
                self.by_uid[uid] = JobInfo(job.job_id, JobPhase.COMPLETED, "Completed", uid=uid)


def manifest(name: str = "nightly", spec: str = "a", **policy: Any) -> Manifest:
    fields = {"schedule": "*/5 * * * *", **policy}
    return Manifest(name, b"{}", spec * 64, f"{name}.yaml",
                    policy=Policy.model_validate(fields))


class World:
    def __init__(self, tmp_path: Path) -> None:
        self.store = Store(tmp_path / "state.db")
        self.jobs = Jobs()
        self.manifests: dict[str, Manifest] = {}

    def plan_at(self, now: float) -> Plan:
        desired = Desired(True, manifests=dict(self.manifests), file_count=1)
        return plan(desired, self.store.records(), POLICY, now,
                    schedules=self.store.schedules())

    def tick(self, now: float) -> tuple[Plan, ApplyReport]:
        """Observe the jobs, then one pass at ``now``."""
        from reconciler.engine.observe import observe

        executor = Executor(self.store, self.jobs, POLICY, confirmations=2, resolve_delay=0,
                            clock=lambda: now)
        asyncio.run(observe(self.store, self.jobs, POLICY, clock=lambda: now))
        the_plan = self.plan_at(now)
        return the_plan, asyncio.run(executor.apply(the_plan))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def test_a_slot_runs_once_under_its_uid_and_the_next_slot_after_it(world: World) -> None:
    world.manifests["nightly"] = manifest()
    first, _ = world.tick(at("10:02"))
    (d,) = first.decisions
    assert d.action is Action.NOOP and "next run 2026-06-01T10:05:00+00:00" in d.reason
    assert first.next_slot == at("10:05")
    assert world.tick(at("10:04"))[1].counts == {}
    with capture_logs() as logs:
        _, report = world.tick(at("10:05") + 1)
    assert report.counts["schedule.fired"] == 1 and report.counts["submit.ok"] == 1
    assert list(world.jobs.by_uid) == [run_uid("nightly", slot("10:05"))]
    fired = [e for e in logs if e["event"] == "schedule.fired"]
    assert fired[0]["slot"] == "2026-06-01T10:05:00+00:00"
    assert fired[0]["next_run"] == "2026-06-01T10:10:00+00:00"
    assert world.tick(at("10:05") + 30)[1].counts == {}  # the same slot never again
    world.jobs.finish_all()
    world.tick(at("10:10"))
    assert list(world.jobs.by_uid)[1] == run_uid("nightly", slot("10:10"))
    runs = world.store.runs("nightly")
    assert [(r.slot, r.outcome) for r in runs] == [(at("10:10"), "current"),
                                                  (at("10:05"), "completed")]
    assert runs[1].job_id == "job-1"


def test_forbid_skips_a_slot_while_the_previous_run_is_active(world: World) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    with capture_logs() as logs:
        the_plan, report = world.tick(at("10:10"))
    assert the_plan.by_action(Action.SKIP)
    assert report.counts == {"schedule.skipped": 1}
    assert [e["slot"] for e in logs if e["event"] == "schedule.skipped"] == [
        "2026-06-01T10:10:00+00:00"]
    assert len(world.jobs.by_uid) == 1
    world.jobs.finish_all()  # ends within the deadline: the skipped slot stays skipped
    assert world.tick(at("10:11"))[1].counts.get("schedule.fired") is None
    world.tick(at("10:15"))
    assert len(world.jobs.by_uid) == 2


def test_allow_runs_both_and_leaves_the_earlier_run_alone(world: World) -> None:
    world.manifests["nightly"] = manifest(concurrency="allow")
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    _, report = world.tick(at("10:10"))
    assert report.counts["schedule.fired"] == 1
    assert len(world.jobs.running()) == 2 and world.jobs.stopped == []
    # A restart's first apply sweeps for duplicates by name: allowed overlaps are not ones.
    world.tick(at("10:11"))
    assert len(world.jobs.running()) == 2


def test_replace_stops_the_previous_run_first(world: World) -> None:
    world.manifests["nightly"] = manifest(concurrency="replace")
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    the_plan, report = world.tick(at("10:10"))
    assert the_plan.by_action(Action.REPLACE)
    assert world.jobs.stopped == ["job-1"]
    assert world.jobs.running() == [run_uid("nightly", slot("10:10"))]
    assert report.counts["schedule.fired"] == 1


def test_after_downtime_only_the_newest_slot_within_the_deadline_runs(world: World) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    with capture_logs() as logs:
        world.tick(at("11:01"))  # down from 10:02 to 11:01: 12 slots passed
    assert list(world.jobs.by_uid) == [run_uid("nightly", slot("11:00"))]
    fired = next(e for e in logs if e["event"] == "schedule.fired")
    assert fired["missed"] == 11


def test_slots_older_than_starting_deadline_are_reported_missed(world: World) -> None:
    world.manifests["nightly"] = manifest(startingDeadline=60)
    world.tick(at("10:02"))
    with capture_logs() as logs:
        _, report = world.tick(at("10:33"))
    assert world.jobs.by_uid == {}
    assert report.counts == {"schedule.missed": 1}
    (missed,) = [e for e in logs if e["event"] == "schedule.missed"]
    assert (missed["slot"], missed["count"]) == ("2026-06-01T10:30:00+00:00", 6)
    assert world.tick(at("10:34"))[1].counts == {}  # reported once
    world.tick(at("10:35"))
    assert len(world.jobs.by_uid) == 1


def test_a_spec_change_affects_the_next_slot_and_a_new_expression_starts_afresh(
    world: World,
) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    world.manifests["nightly"] = manifest(spec="b")
    _, report = world.tick(at("10:07"))
    assert report.counts == {} and world.jobs.stopped == []  # the running run is left alone
    world.jobs.finish_all()
    world.tick(at("10:10"))
    assert world.jobs.specs[run_uid("nightly", slot("10:10"))] == "b" * 64
    world.jobs.finish_all()
    world.manifests["nightly"] = manifest(spec="b", schedule="0 * * * *")
    world.tick(at("10:12"))
    assert world.tick(at("10:15"))[1].counts == {}  # the old expression's slot: gone
    world.tick(at("11:00"))
    assert run_uid("nightly", slot("11:00")) in world.jobs.by_uid


def test_suspend_pauses_without_forgetting(world: World) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    world.manifests["nightly"] = manifest(suspend=True)
    the_plan, _ = world.tick(at("10:20"))
    assert world.jobs.by_uid == {} and the_plan.next_slot is None
    assert "suspended" in the_plan.decisions[0].reason
    world.manifests["nightly"] = manifest()
    world.tick(at("10:21"))  # resumed: the newest passed slot runs, as after downtime
    assert list(world.jobs.by_uid) == [run_uid("nightly", slot("10:20"))]


def test_removing_the_manifest_cancels_the_active_run_and_forgets_the_schedule(
    world: World,
) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    del world.manifests["nightly"]
    world.manifests["other"] = manifest("other", schedule="0 0 1 1 *")
    world.tick(at("10:06"))
    assert world.jobs.stopped == ["job-1"]
    assert set(world.store.schedules()) == {"other"} and world.store.runs("nightly") == []


def test_keep_runs_bounds_the_runs_remembered(world: World) -> None:
    world.manifests["nightly"] = manifest(keepRuns=2)
    world.tick(at("10:02"))
    for minute in range(5, 35, 5):
        world.tick(at(f"10:{minute:02d}"))
        world.jobs.finish_all()
    runs = world.store.runs("nightly")
    assert [r.slot for r in runs] == [at("10:30"), at("10:25"), at("10:20")]
    assert [r.outcome for r in runs] == ["current", "completed", "completed"]


@pytest.mark.parametrize("reached", [False, True], ids=["before-request", "after-request"])
def test_a_crash_between_intent_and_request_never_runs_a_slot_twice(
    world: World, reached: bool,
) -> None:
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    world.jobs.hang, world.jobs.store_before_hang = True, reached
    executor = Executor(world.store, world.jobs, POLICY, confirmations=2, resolve_delay=0,
                        clock=lambda: at("10:05"))

    async def killed() -> None:
        task = asyncio.create_task(executor.apply(world.plan_at(at("10:05"))))
        await asyncio.sleep(0.05)
        task.cancel()  # as a kill -9 would: the store keeps what was committed
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(killed())
    (record,) = world.store.records()
    assert (record.phase, record.uid) == (Phase.SUBMITTING, run_uid("nightly", slot("10:05")))
    world.jobs.hang = False
    for now in (at("10:05") + 1, at("10:06"), at("10:09")):
        world.tick(now)
    assert len(world.jobs.by_uid) == 1  # adopted by its uid, or sent once after the lookups
    assert world.store.records()[0].phase is Phase.ACTIVE


def test_a_fired_slot_not_started_at_shutdown_runs_at_the_next_pass(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # SIGTERM between a batch's intents and its requests: a plain submit's intent is given
    # back, a slot's stays (its state committed with it) and is resolved, then sent once.
    world.manifests["nightly"] = manifest()
    world.tick(at("10:02"))
    executor = Executor(world.store, world.jobs, POLICY, confirmations=2, resolve_delay=0,
                        clock=lambda: at("10:05"))
    the_plan = world.plan_at(at("10:05"))
    commit = world.store.commit_intents

    def commit_then_stop(*args: Any, **kwargs: Any) -> None:
        commit(*args, **kwargs)
        executor.stop()  # SIGTERM right after the batch's intents committed

    monkeypatch.setattr(world.store, "commit_intents", commit_then_stop)
    asyncio.run(executor.apply(the_plan))
    monkeypatch.undo()
    assert world.jobs.by_uid == {}
    assert world.store.records()[0].phase is Phase.SUBMITTING
    world.tick(at("10:06"))
    assert len(world.jobs.by_uid) == 1
    assert world.tick(at("10:07"))[1].counts == {}


def test_plan_shows_the_next_run_of_a_scheduled_manifest(tmp_path: Path) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "nightly.yaml").write_text(envelope(
        "nightly", policy='schedule: "0 3 * * *";timezone: Europe/Berlin'))
    args = ["plan", "--manifests", str(root), "--state", str(tmp_path / "state.db")]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0, text.output
    assert "next run " in text.output and "T03:00:00+0" in text.output
    assert "(Europe/Berlin)" in text.output
    shown = CliRunner().invoke(main, [*args, "--json"])
    (decision,) = json.loads(shown.output)["decisions"]
    assert decision["action"] == "noop" and decision["next_run"].endswith("+00:00")


class InPlaceJobs(Jobs):
    """A backend that changes a job in place (the orchestrator by name): a submit of a name
    that has a live job updates that job."""

    updates_in_place = True

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        for old, job in list(self.by_uid.items()):
            if self.names[old] == manifest.name and job.phase is JobPhase.RUNNING:
                del self.by_uid[old]
                updated = JobInfo(job.job_id, JobPhase.RUNNING, "Running", uid=uid)
                self.by_uid[uid], self.names[uid] = updated, manifest.name
                self.specs[uid] = manifest.spec_hash
                return updated
        return await super().submit(manifest, uid)


def test_a_replace_done_in_place_records_its_slot_with_the_run(world: World) -> None:
    """concurrency: replace on a backend that updates in place fires the slot as one submit,
    no cancel: the slot's state must commit with that intent, or the next pass fires the same
    slot again under the same uid (found in review after the merge of issues 14 and 16)."""
    world.jobs = InPlaceJobs()
    world.manifests["nightly"] = manifest(concurrency="replace")
    world.tick(at("10:02"))
    world.tick(at("10:05"))
    the_plan, report = world.tick(at("10:10"))
    assert the_plan.by_action(Action.REPLACE) and report.counts["schedule.fired"] == 1
    assert world.jobs.stopped == []  # updated in place, not cancelled
    again, report = world.tick(at("10:10") + 1)
    assert not again.changes and report.counts["schedule.fired"] == 0
    assert world.store.schedules()["nightly"].last_slot == slot("10:10")
    assert world.store.runs("nightly")[0].uid == run_uid("nightly", slot("10:10"))
