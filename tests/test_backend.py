"""The Backend seam: the legacy mapping of states, and the engine driven through a fake."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from reconciler.backends.errors import OutcomeUnknown
from reconciler.backends.legacy_jobs import phase_of
from reconciler.domain.desired import Desired
from reconciler.domain.manifest import Manifest, Policy
from reconciler.domain.plan import PlanPolicy, plan
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import Executor
from reconciler.engine.observe import observe
from reconciler.ports import JobInfo, JobPhase
from reconciler.store.sqlite import Store


@pytest.mark.parametrize(("state", "phase"), [
    ("New", JobPhase.RUNNING), ("Queued", JobPhase.RUNNING), ("InProgress", JobPhase.RUNNING),
    ("Completed", JobPhase.COMPLETED), ("Error", JobPhase.FAILED),
    ("Cancelled", JobPhase.CANCELLED), ("Undefined", JobPhase.UNKNOWN),
    ("SomethingNew", JobPhase.UNKNOWN),
])
def test_legacy_states_map_onto_phases_and_unknown_is_never_running(
    state: str, phase: JobPhase
) -> None:
    assert phase_of(state) is phase


class FakeBackend:
    """A backend in domain terms only: no annotations, no client ids, no wire."""

    def __init__(self, jobs: dict[str, JobInfo]) -> None:
        self.jobs = jobs  # by uid
        self.submitted: list[tuple[str, str]] = []
        self.lose_replies = False

    @property
    def identity(self) -> str:
        return "fake"

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        self.submitted.append((manifest.name, uid))
        job = JobInfo(f"job-{len(self.submitted)}", JobPhase.UNKNOWN, "Accepted")
        self.jobs[uid] = job
        if self.lose_replies:
            raise OutcomeUnknown("reply lost")
        return job

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {uid: [self.jobs[uid]] for uid in uids if uid in self.jobs}

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {}

    async def stop(self, job_id: str, reason: str) -> str:
        raise AssertionError("not used")

    async def status(self, job_id: str) -> JobInfo | None:
        return None

    async def owner_of(self, job_id: str) -> str | None:
        return None


def test_observe_keeps_a_job_in_an_unknown_phase_live_and_records_its_state(
    tmp_path: Path,
) -> None:
    backend = FakeBackend({
        "u1": JobInfo("j1", JobPhase.UNKNOWN, "Mystery"),
        "u2": JobInfo("j2", JobPhase.FAILED, "Broken"),
    })
    with Store(tmp_path / "s.db") as store:
        store.commit_intents([
            Record("a", Phase.ACTIVE, "h", "a.yaml", job_id="j1", uid="u1", job_state="New"),
            Record("b", Phase.ACTIVE, "h", "b.yaml", job_id="j2", uid="u2", job_state="New"),
            Record("c", Phase.ACTIVE, "h", "c.yaml", job_id="j3", uid="u3", job_state="New"),
        ])
        counts = asyncio.run(observe(store, backend, PlanPolicy(), clock=lambda: 100.0))
        records = {r.name: r for r in store.records()}
    assert counts == Counter({"job.failed": 1, "job.lost": 1})
    assert (records["a"].phase, records["a"].job_state) == (Phase.ACTIVE, "Mystery")
    assert (records["b"].phase, records["b"].job_state) == (Phase.FAILED, "Broken")
    assert (records["c"].phase, records["c"].job_state) == (Phase.LOST, None)


def _submit_plan(*names: str) -> tuple[Desired, PlanPolicy]:
    manifests = {n: Manifest(n, b"{}", "h" * 64, f"{n}.yaml", policy=Policy()) for n in names}
    return Desired(True, manifests=manifests, file_count=len(names)), PlanPolicy()


def test_the_executor_submits_through_any_backend_with_the_intents_uid(tmp_path: Path) -> None:
    backend = FakeBackend({})
    desired, policy = _submit_plan("a")
    with Store(tmp_path / "s.db") as store:
        executor = Executor(store, backend, policy, confirmations=1, resolve_delay=0)
        report = asyncio.run(executor.apply(plan(desired, [], policy, 0.0)))
        (record,) = store.records()
    assert report.counts == Counter({"submit.ok": 1})
    assert backend.submitted == [("a", record.uid)]
    assert (record.phase, record.job_id, record.job_state) == (Phase.ACTIVE, "job-1", "Accepted")


def test_a_lost_reply_is_adopted_by_uid_and_an_unknown_phase_stays_live(tmp_path: Path) -> None:
    backend = FakeBackend({})
    backend.lose_replies = True
    desired, policy = _submit_plan("a")
    with Store(tmp_path / "s.db") as store:
        executor = Executor(store, backend, policy, confirmations=1, resolve_delay=0)
        report = asyncio.run(executor.apply(plan(desired, [], policy, 0.0)))
        (record,) = store.records()
    assert report.counts == Counter({"submit.unknown": 1, "resolve.adopted": 1})
    assert len(backend.submitted) == 1  # found by its uid, never sent twice
    assert (record.phase, record.job_id, record.job_state) == (Phase.ACTIVE, "job-1", "Accepted")
