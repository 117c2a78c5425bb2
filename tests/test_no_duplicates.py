"""Invariant 1 under faults, in-process: a store error mid-apply, more than 256 actions, a lost
store, a late arrival, in-doubt intents resolved concurrently (issue 11, items 1, 3, 6)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections import Counter
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from reconciler.backends.legacy import NotFound, OutcomeUnknown, WireJob
from reconciler.backends.legacy import Unreachable as RequesterUnreachable
from reconciler.backends.legacy_jobs import NAME_TAG, UID_TAG, LegacyBackend
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import ApplyReport, Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.sources.folder import FolderSource
from reconciler.store.sqlite import Store, StoreCorrupt, StoreError
from tests.harness import envelope

POLICY = PlanPolicy(mass_cancel_min=10_000)


@dataclass
class FakeJob:
    job_id: str
    annotations: tuple[str, ...]
    created: int
    state: str = "New"

    def info(self) -> WireJob:
        return WireJob(self.job_id, self.state, "me", self.annotations, f"{self.created:012d}")


class FakeRequester:
    """An in-memory requester that records every request, with a fixed latency per submit.
    ``late`` names get one submit whose reply is lost and whose job is stored later."""

    client_id = "me"

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.jobs: dict[str, FakeJob] = {}
        self.in_flight = 0
        self.submits: Counter[str] = Counter()  # by uid
        self.lists = 0
        self.late: dict[str, float] = {}  # name -> seconds until the lost submit is stored
        self._ids = itertools.count(1)

    def _store(self, annotations: tuple[str, ...]) -> str:
        n = next(self._ids)
        job = FakeJob(f"j-{n:05d}", annotations, n)
        self.jobs[job.job_id] = job
        return job.job_id

    async def submit(self, spec: Mapping[str, Any]) -> str:
        annotations = tuple(spec["Annotations"])
        self.submits.update(t.removeprefix(UID_TAG) for t in annotations
                            if t.startswith(UID_TAG))
        name = next(t.removeprefix(NAME_TAG) for t in annotations if t.startswith(NAME_TAG))
        delay = self.late.pop(name, None)
        if delay is not None:
            asyncio.get_running_loop().call_later(delay, self._store, annotations)
            raise OutcomeUnknown("submit: reply lost (test)")
        self.in_flight += 1
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        return self._store(annotations)

    async def cancel(self, job_id: str, reason: str) -> str:
        if job_id not in self.jobs:
            raise NotFound(job_id)
        self.jobs[job_id].state = "Cancelled"
        return "Cancelled"

    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[WireJob]:
        self.lists += 1
        wanted = set(include_tags)
        return [j.info() for j in self.jobs.values()
                if not wanted or wanted.intersection(j.annotations)]

    async def state(self, job_id: str) -> str:
        if job_id not in self.jobs:
            raise NotFound(job_id)
        return self.jobs[job_id].state

    def live_per_name(self) -> Counter[str]:
        return Counter(t.removeprefix(NAME_TAG) for j in self.jobs.values()
                       if j.state == "New" for t in j.annotations if t.startswith(NAME_TAG))


class FailingStore(Store):
    """Outcome saves fail from the ``fail_at``-th one on, ``fail_count`` times."""

    def __init__(self, path: Path, fail_at: int, fail_count: int = 1) -> None:
        super().__init__(path)
        self.saves = 0
        self.fail_at, self.fail_count = fail_at, fail_count

    def save(self, records: Sequence[Record]) -> None:
        self.saves += 1
        if self.fail_at <= self.saves < self.fail_at + self.fail_count:
            raise StoreError(f"{self.path}: database is locked (test)")
        super().save(records)


def folder(root: Path, count: int, image: str = "ubuntu:22.04") -> list[str]:
    root.mkdir(exist_ok=True)
    names = [f"job-{i:03d}" for i in range(count)]
    for name in names:
        (root / f"{name}.yaml").write_text(envelope(name, image))
    return names


async def one_pass(root: Path, store: Store, executor: Executor) -> ApplyReport:
    return (await Reconciler(FolderSource(root), store, POLICY).run_pass(executor)).report


def test_store_failure_mid_apply_waits_for_every_request_and_never_resubmits(
    tmp_path: Path,
) -> None:
    names = folder(tmp_path / "m", 40)
    requester = FakeRequester(latency=0.2)

    async def scenario() -> tuple[int, BaseException | None, list[MutableMapping[str, Any]]]:
        with FailingStore(tmp_path / "s.db", fail_at=3) as store, capture_logs() as events:
            # outcome_batch=1: each outcome its own save, so the third fails mid-apply
            executor = Executor(store, LegacyBackend(requester), POLICY, confirmations=1,
                                resolve_delay=0, outcome_batch=1)
            error: BaseException | None = None
            try:
                await one_pass(tmp_path / "m", store, executor)
            except StoreError as exc:
                error = exc
            in_flight_when_raised = requester.in_flight
            # The next passes: in-doubt intents are resolved first, the rest submitted once.
            await one_pass(tmp_path / "m", store, executor)
            await one_pass(tmp_path / "m", store, executor)
            assert all(r.phase is Phase.ACTIVE for r in store.records())
            assert len(store.records()) == 40
        return in_flight_when_raised, error, events

    in_flight, error, events = asyncio.run(scenario())
    assert error is not None and "locked" in str(error)
    assert in_flight == 0, "apply raised while requests were still in flight"
    assert max(requester.submits.values()) == 1, "a uid was submitted twice"
    assert requester.live_per_name() == Counter({name: 1 for name in names})
    assert any(e["event"] == "action.failed" and "locked" in e["error"] for e in events)


def test_a_failure_among_more_than_256_actions_is_raised_not_dropped(tmp_path: Path) -> None:
    folder(tmp_path / "m", 300)
    requester = FakeRequester()
    unhandled: list[MutableMapping[str, Any]] = []

    async def scenario() -> BaseException | None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unhandled.append(ctx))
        with FailingStore(tmp_path / "s.db", fail_at=5, fail_count=3) as store:
            # outcome_batch=1: three actions fail, each at its own outcome's save
            executor = Executor(store, LegacyBackend(requester), POLICY, concurrency=16,
                                outcome_batch=1)
            try:
                await one_pass(tmp_path / "m", store, executor)
            except StoreError as exc:
                return exc
            finally:
                gc.collect()  # "Task exception was never retrieved" is reported at collection
        return None

    error = asyncio.run(scenario())
    assert error is not None, "the pass reported success despite failed actions"
    assert "2 more actions failed" in "".join(getattr(error, "__notes__", []))
    assert unhandled == []
    assert max(requester.submits.values()) == 1


def lose_store(tmp_path: Path) -> None:
    for path in tmp_path.glob("s.db*"):
        path.unlink()  # the database and its WAL


def lose_store_and_change_a_manifest(tmp_path: Path) -> None:
    lose_store(tmp_path)
    (tmp_path / "m" / "job-000.yaml").write_text(envelope("job-000", "alpine:3"))


def test_lost_store_adopts_live_jobs_by_name_and_submits_nothing(tmp_path: Path) -> None:
    names = folder(tmp_path / "m", 12)
    requester = FakeRequester()

    async def scenario() -> tuple[ApplyReport, ApplyReport, list[MutableMapping[str, Any]]]:
        with Store(tmp_path / "s.db") as store:
            await one_pass(tmp_path / "m", store, Executor(store, LegacyBackend(requester), POLICY))
        lose_store_and_change_a_manifest(tmp_path)
        with Store(tmp_path / "s.db") as store, capture_logs() as events:
            executor = Executor(store, LegacyBackend(requester), POLICY)
            first = await one_pass(tmp_path / "m", store, executor)
            second = await one_pass(tmp_path / "m", store, executor)  # the changed one
        return first, second, events

    first, second, events = asyncio.run(scenario())
    assert first.counts == Counter({"submit.adopted": 12})
    assert second.counts == Counter({"cancel.ok": 1, "submit.ok": 1})  # job-000's new spec
    assert sum(requester.submits.values()) == 12 + 1
    assert requester.live_per_name() == Counter({name: 1 for name in names})
    assert sum(e["event"] == "job.adopted" for e in events) == 12


def test_a_name_held_when_the_lost_store_is_found_is_looked_up_when_submitted(
    tmp_path: Path,
) -> None:
    """Only names without a record at the first ready pass are looked up by name; one that
    was broken (held) then is still looked up once it is fixed, however much later."""
    folder(tmp_path / "m", 2)
    requester = FakeRequester()
    broken = tmp_path / "m" / "job-001.yaml"
    text = broken.read_text()

    async def scenario() -> list[ApplyReport]:
        with Store(tmp_path / "s.db") as store:
            await one_pass(tmp_path / "m", store, Executor(store, LegacyBackend(requester), POLICY))
        lose_store(tmp_path)
        broken.write_text(text.replace("engine: docker", "engine: 7"))
        with Store(tmp_path / "s.db") as store:
            executor = Executor(store, LegacyBackend(requester), POLICY)
            reports = [await one_pass(tmp_path / "m", store, executor)]
            broken.write_text(text)
            reports.append(await one_pass(tmp_path / "m", store, executor))
            (tmp_path / "m" / "new.yaml").write_text(envelope("new"))
            lists = requester.lists
            reports.append(await one_pass(tmp_path / "m", store, executor))
            assert requester.lists == lists  # a manifest added later: no lookup
        return reports

    reports = asyncio.run(scenario())
    assert [r.counts for r in reports] == [
        Counter({"submit.adopted": 1}), Counter({"submit.adopted": 1}), Counter({"submit.ok": 1})]
    assert sum(requester.submits.values()) == 3


def test_duplicates_by_name_are_cancelled_and_the_recorded_job_kept(tmp_path: Path) -> None:
    """A lost reply whose job is stored after its absence was confirmed: the manifest was
    submitted again under a fresh uid, so the late job is a second live job for the name."""
    folder(tmp_path / "m", 3)
    requester = FakeRequester()
    requester.late["job-001"] = 0.3

    async def scenario() -> tuple[Record, list[MutableMapping[str, Any]]]:
        with Store(tmp_path / "s.db") as store, capture_logs() as events:
            executor = Executor(store, LegacyBackend(requester),
                                POLICY, confirmations=2, resolve_delay=0)
            await one_pass(tmp_path / "m", store, executor)
            assert requester.live_per_name()["job-001"] == 1
            await asyncio.sleep(0.4)  # the lost submit lands now
            assert requester.live_per_name()["job-001"] == 2
            await one_pass(tmp_path / "m", store, executor)
            record = {r.name: r for r in store.records()}["job-001"]
        return record, events

    record, events = asyncio.run(scenario())
    assert max(requester.submits.values()) == 1  # a fresh uid for the second submit
    assert requester.live_per_name()["job-001"] == 1
    assert record.job_id is not None and requester.jobs[record.job_id].state == "New"
    [cancelled] = [e for e in events if e["event"] == "job.duplicate_cancelled"]
    assert cancelled["name"] == "job-001" and cancelled["kept_job_id"] == record.job_id
    assert requester.jobs[cancelled["job_id"]].state == "Cancelled"


def test_duplicates_left_by_an_earlier_run_are_cancelled_at_start(tmp_path: Path) -> None:
    folder(tmp_path / "m", 2)
    requester = FakeRequester()

    async def scenario() -> None:
        with Store(tmp_path / "s.db") as store:
            await one_pass(tmp_path / "m", store, Executor(store, LegacyBackend(requester), POLICY))
            [job] = [j for j in requester.jobs.values() if NAME_TAG + "job-000" in j.annotations]
            requester._store((*job.annotations[:2], NAME_TAG + "job-000"))
            assert requester.live_per_name()["job-000"] == 2
            await one_pass(tmp_path / "m", store, Executor(store, LegacyBackend(requester), POLICY))

    asyncio.run(scenario())
    assert requester.live_per_name() == Counter({"job-000": 1, "job-001": 1})


def test_in_doubt_intents_are_resolved_concurrently(tmp_path: Path) -> None:
    names = folder(tmp_path / "m", 60)
    requester = FakeRequester(latency=0.2)  # 60 one after another: 12 s
    texts = {n: (tmp_path / "m" / f"{n}.yaml").read_bytes() for n in names}

    async def scenario() -> float:
        with Store(tmp_path / "s.db") as store:
            store.commit_intents([
                Record(n, Phase.SUBMITTING, load_file(f"{n}.yaml", texts[n]).manifests[0]
                       .spec_hash, f"{n}.yaml", uid=f"{i:032x}", attempts=1)
                for i, n in enumerate(names)])
            executor = Executor(store, LegacyBackend(requester),
                                POLICY, concurrency=8, resolve_delay=0)
            started = time.perf_counter()
            report = await one_pass(tmp_path / "m", store, executor)
            assert report.counts == Counter({"resolve.resubmitted": 60, "submit.ok": 60})
            return time.perf_counter() - started

    elapsed = asyncio.run(scenario())
    assert elapsed < 4.0, f"60 resolves took {elapsed:.1f} s"
    assert requester.live_per_name() == Counter({name: 1 for name in names})


def test_a_corrupt_store_is_refused_at_open(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.commit_intents([Record(f"n{i:05d}", Phase.ACTIVE, "h" * 64, f"n{i}.yaml",
                                     job_id=f"j{i}", uid="u" * 32) for i in range(3000)])
    data = bytearray(path.read_bytes())
    page = 4096
    # The first interior table b-tree page (type 0x05) past the schema page, wherever the
    # schema puts it: its cell pointers overwritten, so quick_check must see it.
    interior = next(n for n in range(1, len(data) // page) if data[n * page] == 0x05)
    data[interior * page + 12 : interior * page + 312] = b"\xff" * 300
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt) as refused:
        Store(path)
    message = str(refused.value)
    assert "\n" not in message and str(path) in message and "quick_check" in message
    Store(path, writer=False).close()  # `status` can still show what it can


def test_a_failed_name_lookup_submits_nothing_new(tmp_path: Path) -> None:
    """Whether a name with no record already has a job is unknown: nothing is submitted for it
    in that pass (the store may have been lost), and the next pass tries again."""
    names = folder(tmp_path / "m", 3)

    class Unreachable(FakeRequester):
        async def list_jobs(
            self, *, include_tags: Sequence[str] = (), job_id: str | None = None
        ) -> list[WireJob]:
            if self.lists == 0:
                self.lists += 1
                raise RequesterUnreachable("list: cannot connect (test)")
            return await super().list_jobs(include_tags=include_tags, job_id=job_id)

    requester = Unreachable()

    async def scenario() -> tuple[ApplyReport, ApplyReport]:
        with Store(tmp_path / "s.db") as store:
            executor = Executor(store, LegacyBackend(requester), POLICY)
            return (await one_pass(tmp_path / "m", store, executor),
                    await one_pass(tmp_path / "m", store, executor))

    first, second = asyncio.run(scenario())
    assert first.counts == Counter({"lookup.failed": 3}) and first.failed
    assert second.counts == Counter({"submit.ok": 3})
    assert requester.live_per_name() == Counter({name: 1 for name in names})


def test_a_cancelled_apply_cuts_its_requests_and_leaves_none_running(tmp_path: Path) -> None:
    """The shutdown deadline cancels the pass: its requests are cancelled with it, and none
    is still running once the cancelled pass has ended."""
    folder(tmp_path / "m", 10)
    requester = FakeRequester(latency=30)

    async def scenario() -> float:
        with Store(tmp_path / "s.db") as store:
            executor = Executor(store, LegacyBackend(requester), POLICY)
            task = asyncio.create_task(one_pass(tmp_path / "m", store, executor))
            await asyncio.sleep(0.5)  # the first 8 submits are in flight by now
            assert requester.in_flight == 8
            started = time.perf_counter()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert requester.in_flight == 0
            return time.perf_counter() - started

    assert asyncio.run(scenario()) < 1.0


def test_a_failed_cancel_of_a_duplicate_keeps_the_recorded_job_recorded(tmp_path: Path) -> None:
    """The sweep finds a second live job for a recorded name and its cancel fails (a 503).
    The record must still name the job it kept: the failure used to be saved as the name's
    record with the duplicate's job id, so the kept job became unrecorded and the next sweep
    cancelled it, leaving the duplicate (which may run an older spec) under the record."""
    from reconciler.backends.errors import ServerError

    folder(tmp_path / "m", 2)
    requester = FakeRequester()
    cancel = requester.cancel
    refused: list[str] = []

    async def unavailable_once(job_id: str, reason: str) -> str:
        if not refused:
            refused.append(job_id)
            raise ServerError("cancel: HTTP 503: Server Timeout! (test)", status=503)
        return await cancel(job_id, reason)

    async def scenario() -> dict[str, Record]:
        with Store(tmp_path / "s.db") as store:
            await one_pass(tmp_path / "m", store, Executor(store, LegacyBackend(requester), POLICY))
            kept = {r.name: r for r in store.records()}["job-000"].job_id
            [job] = [j for j in requester.jobs.values() if j.job_id == kept]
            requester._store((*job.annotations[:2], NAME_TAG + "job-000"))  # a duplicate
            requester.cancel = unavailable_once  # type: ignore[method-assign]
            executor = Executor(store, LegacyBackend(requester), POLICY)
            await one_pass(tmp_path / "m", store, executor)  # the sweep: its cancel fails
            assert refused and refused[0] != kept
            assert {r.name: r for r in store.records()}["job-000"].job_id == kept
            await one_pass(tmp_path / "m", store, executor)  # a suspect: swept again
            return {r.name: r for r in store.records()}

    records = asyncio.run(scenario())
    assert requester.live_per_name() == Counter({"job-000": 1, "job-001": 1})
    job_id = records["job-000"].job_id
    assert job_id is not None and requester.jobs[job_id].state == "New"
    assert requester.jobs[refused[0]].state == "Cancelled"
