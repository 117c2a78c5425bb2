"""Outcomes saved a batch at a time (engine/executor.py, ``_Writes``; docs/performance.md).

A submit's outcome (job id, state) may wait a moment before it is saved, since its intent,
committed durably before the request, already guards it: these cases check that the waiting
outcomes are saved in few transactions, soon, in order with the other writes, and that a crash
which loses them leaves intents that the next pass resolves by uid, with no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import OUTCOME_BATCH, Executor, _Writes
from reconciler.engine.reconcile import Reconciler
from reconciler.sources.folder import FolderSource
from reconciler.store.errors import StoreError
from reconciler.store.sqlite import Store
from tests.fakes import FakeRequester, FakeStore
from tests.harness import envelope

POLICY = PlanPolicy(mass_cancel_min=10_000)


def folder(root: Path, count: int) -> list[str]:
    root.mkdir(exist_ok=True)
    names = [f"job-{i:03d}" for i in range(count)]
    for name in names:
        (root / f"{name}.yaml").write_text(envelope(name))
    return names


class CountingStore(FakeStore):
    def __init__(self) -> None:
        super().__init__()
        self.saves: list[int] = []  # outcomes (active records) per save call

    def save(self, records: Sequence[Record]) -> None:
        if any(r.phase is Phase.ACTIVE for r in records):
            self.saves.append(len(records))
        super().save(records)


def test_the_outcomes_of_a_cold_sync_are_saved_a_batch_at_a_time(tmp_path: Path) -> None:
    names = folder(tmp_path / "m", 300)
    store, requester = CountingStore(), FakeRequester()
    executor = Executor(store.as_store(), requester.backend(), POLICY)
    result = asyncio.run(Reconciler(FolderSource(tmp_path / "m"), store.as_store(),
                                    POLICY).run_pass(executor))
    assert result.report.counts["submit.ok"] == 300
    # Saved by the end of the apply: every record active, with the job the requester holds.
    assert sorted(store.rows) == names
    for name, record in store.rows.items():
        assert record.phase is Phase.ACTIVE
        assert [job.job_id for job in requester.named(name)] == [record.job_id]
    # Not a transaction per outcome (a commit of intents saves those waiting at the time).
    assert sum(store.saves) == 300
    assert len(store.saves) <= 300 // OUTCOME_BATCH + 4, store.saves


def test_a_waiting_outcome_is_saved_within_the_delay_not_only_at_the_end(
    tmp_path: Path,
) -> None:
    folder(tmp_path / "m", 20)
    store, requester = FakeStore(), FakeRequester(latency=0.05)
    executor = Executor(store.as_store(), requester.backend(), POLICY, concurrency=2,
                        outcome_batch=1000, outcome_delay=0.1)
    seen: list[int] = []  # active records in the store at each submit's arrival
    submit = requester.submit

    async def watched(spec: object) -> str:
        seen.append(sum(r.phase is Phase.ACTIVE for r in store.rows.values()))
        return await submit(spec)  # type: ignore[arg-type]

    requester.submit = watched  # type: ignore[method-assign]
    asyncio.run(Reconciler(FolderSource(tmp_path / "m"), store.as_store(),
                           POLICY).run_pass(executor))
    assert len(seen) == 20
    assert seen[-1] > 0, "no outcome was saved before the apply ended"
    assert all(r.phase is Phase.ACTIVE for r in store.rows.values())


def test_every_other_write_saves_the_waiting_outcomes_first() -> None:
    store = FakeStore()
    writes = _Writes(store.as_store(), batch=100, delay=3600.0)
    intent = Record("a", Phase.SUBMITTING, "h", "a.yaml", uid="u1")
    writes.outcome(Record("a", Phase.ACTIVE, "h", "a.yaml", job_id="j1", uid="u1"))
    assert store.rows == {}  # waiting
    failed = Record("a", Phase.ERROR, "h", "a.yaml", uid="u2", last_error="refused")
    writes.save([failed])
    assert store.rows["a"] == failed  # the later write wins, not the waiting outcome
    writes.outcome(Record("a", Phase.ACTIVE, "h", "a.yaml", job_id="j2", uid="u2"))
    writes.commit_intents([intent])
    assert store.rows["a"] == intent
    writes.outcome(Record("b", Phase.ACTIVE, "h", "b.yaml", job_id="j3", uid="u3"))
    writes.forget(["b"])
    assert "b" not in store.rows


class DyingStore(Store):
    """A store whose process dies after its first ``keep`` outcome saves: the later outcomes
    never reach the file (intents do: they are written before each request)."""

    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path)
        self.keep = keep

    def save(self, records: Sequence[Record]) -> None:
        if self.keep > 0 or not records:
            self.keep -= bool(records)
            super().save(records)


def test_a_crash_with_outcomes_unsaved_resolves_them_by_uid_with_no_duplicate(
    tmp_path: Path,
) -> None:
    names = folder(tmp_path / "m", 150)
    requester = FakeRequester()

    async def scenario() -> None:
        with DyingStore(tmp_path / "s.db", keep=1) as store:
            executor = Executor(store, requester.backend(), POLICY, outcome_batch=64,
                                outcome_delay=3600.0)
            await Reconciler(FolderSource(tmp_path / "m"), store, POLICY).run_pass(executor)
        with Store(tmp_path / "s.db") as store:  # the restart
            phases = [r.phase for r in store.records()]
            assert phases.count(Phase.ACTIVE) == 64  # the one batch saved before the crash
            assert phases.count(Phase.SUBMITTING) == 150 - 64  # intents, guarding the rest
            executor = Executor(store, requester.backend(), POLICY)
            await Reconciler(FolderSource(tmp_path / "m"), store, POLICY).run_pass(executor)
            records = {r.name: r for r in store.records()}
        assert sorted(records) == names
        for name, record in records.items():
            assert record.phase is Phase.ACTIVE
            assert [job.job_id for job in requester.named(name)] == [record.job_id]

    with capture_logs() as events:
        asyncio.run(scenario())
    assert requester.submitted == 150, "a job was submitted twice"
    adopted = [e for e in events if e["event"] == "job.adopted"]
    assert len(adopted) == 150 - 64
    assert all(e["reason"].startswith("found by uid") for e in adopted)


def test_outcomes_waiting_when_the_shutdown_deadline_cuts_the_drain_are_saved(
    tmp_path: Path,
) -> None:
    """SIGTERM: no new action starts, the apply drains those in flight, and the shutdown
    deadline cancels it while one request still hangs. The outcomes of the submits that
    succeeded meanwhile are saved before the cancellation goes on (docs/design.md,
    "Outcomes saved in batches": every apply saves them before it returns, raises or is
    cancelled); they used to be dropped when the cancel came during the final drain."""
    names = folder(tmp_path / "m", 5)
    store, requester = FakeStore(), FakeRequester()
    executor = Executor(store.as_store(), requester.backend(), POLICY, outcome_batch=1000,
                        outcome_delay=3600.0)
    hang, hanging = asyncio.Event(), asyncio.Event()
    submit = requester.submit

    async def one_hangs(spec: object) -> str:
        if requester.submitted == len(names) - 1:
            hanging.set()  # the others answered
            await hang.wait()  # the last request: never answered before the deadline
        return await submit(spec)  # type: ignore[arg-type]

    requester.submit = one_hangs  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(Reconciler(FolderSource(tmp_path / "m"), store.as_store(),
                                              POLICY).run_pass(executor))
        await hanging.wait()
        await asyncio.sleep(0.05)  # the apply now waits in its final drain
        executor.stop()
        task.cancel()  # the shutdown deadline
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    phases = Counter(r.phase for r in store.rows.values())
    assert phases == {Phase.ACTIVE: len(names) - 1, Phase.SUBMITTING: 1}, phases


class RefusingStore(FakeStore):
    """A store that refuses the first save of a batch of outcomes (a full disk, a lost lease)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = 0

    def save(self, records: Sequence[Record]) -> None:
        if not self.refused and len(records) > 1 and all(r.phase is Phase.ACTIVE
                                                           for r in records):
            self.refused = len(records)
            raise StoreError("disk I/O error")
        super().save(records)


def test_a_refused_batch_of_outcomes_fails_the_pass_and_the_next_adopts_them_by_uid(
    tmp_path: Path,
) -> None:
    """The outcomes a store refuses are dropped with the transaction; the pass must fail (not
    report success over intents left in doubt) and the next pass resolve them by uid: each
    job adopted, none sent twice."""
    names = folder(tmp_path / "m", 40)
    store, requester = RefusingStore(), FakeRequester()
    reconciler = Reconciler(FolderSource(tmp_path / "m"), store.as_store(), POLICY)

    async def scenario() -> None:
        executor = Executor(store.as_store(), requester.backend(), POLICY, outcome_batch=16,
                            outcome_delay=3600.0)
        with pytest.raises(StoreError):
            await reconciler.run_pass(executor)
        assert store.refused == 16
        in_doubt = [r for r in store.rows.values() if r.phase is Phase.SUBMITTING]
        assert len(in_doubt) >= 16
        await reconciler.run_pass(executor)

    with capture_logs() as events:
        asyncio.run(scenario())
    assert requester.submitted == len(names), "a job was submitted twice"
    for name in names:
        record = store.rows[name]
        assert record.phase is Phase.ACTIVE
        assert [job.job_id for job in requester.named(name)] == [record.job_id]
    adopted = [e for e in events if e["event"] == "job.adopted"]
    assert len(adopted) >= 16
