"""The PostgreSQL store and its lease, against a real server started for these tests.

The store contract (what the engine relies on) runs against both engines; the lease tests
check exclusivity, takeover only after expiry, fencing of writes, and that a paused or cut-off
leader stops believing before anyone else can lead.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reconciler.domain.records import Approval, Phase, Record, Run, StoredPolicy
from reconciler.domain.schedule import ScheduleState
from reconciler.store.errors import NotLeader, StoreError
from reconciler.store.sqlite import Store
from tests.pgserver import PgServer, running_server, unavailable_reason

try:
    from reconciler.store.pglease import PostgresLease
    from reconciler.store.postgres import PostgresStore
except ImportError:  # psycopg missing: the skip below says so
    pass

_REASON = unavailable_reason()
needs_pg = pytest.mark.skipif(_REASON is not None, reason=f"PostgreSQL: {_REASON}")


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    if _REASON is not None:
        pytest.skip(f"PostgreSQL: {_REASON}")
    with running_server() as server:
        yield server


@pytest.fixture
def pg_url(pg: PgServer) -> str:
    return pg.create_database(f"t_{uuid.uuid4().hex[:12]}")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(name: str, phase: Phase = Phase.SUBMITTING, **extra: Any) -> Record:
    return Record(name=name, phase=phase, spec_hash="h" * 64, path=f"{name}.yaml",
                  uid=uuid.uuid4().hex, **extra)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        store: Any = Store(tmp_path / "state.db")
    else:
        if _REASON is not None:
            pytest.skip(f"PostgreSQL: {_REASON}")
        store = PostgresStore(request.getfixturevalue("pg_url"))
    try:
        yield store
    finally:
        store.close()


# --- the store contract, both engines ------------------------------------------------------


def test_intents_outcomes_and_forgetting(any_store: Any) -> None:
    a, b = _record("a"), _record("b")
    any_store.commit_intents([a, b])
    assert [r.name for r in any_store.records()] == ["a", "b"]
    any_store.save([Record(**{**a.__dict__, "phase": Phase.ACTIVE, "job_id": "j-1"})])
    got = {r.name: r for r in any_store.records()}
    assert got["a"].phase is Phase.ACTIVE and got["a"].job_id == "j-1"
    assert got["b"].uid == b.uid and got["b"].phase is Phase.SUBMITTING
    any_store.forget(["a"])
    assert [r.name for r in any_store.records()] == ["b"]


def test_records_round_trip_every_field(any_store: Any) -> None:
    record = _record("x", Phase.ERROR, job_id="j-9", job_state="Error", attempts=3,
                     last_error="boom", next_attempt_at=12345.5, on_remove="orphan",
                     revision="abc123", job_version=2, job_message="stopped: maintenance")
    any_store.commit_intents([record])
    (got,) = any_store.records()
    assert {k: v for k, v in got.__dict__.items() if k != "updated_at"} == \
           {k: v for k, v in record.__dict__.items() if k != "updated_at"}
    assert got.updated_at > 0


def test_schedule_state_and_runs_commit_with_the_intent(any_store: Any) -> None:
    # Issue 16: one transaction carries a slot's state, its run and the run's intent; a new
    # run closes the previous one with what the record says; keepRuns bounds the rest.
    def state(last: int | None) -> ScheduleState:
        return ScheduleState(("*/5 * * * *", "Europe/Berlin"), datetime.fromtimestamp(0, UTC),
                             None if last is None else datetime.fromtimestamp(last, UTC))

    any_store.commit_intents([], schedules={"n": state(None)})
    assert any_store.schedules() == {"n": state(None)}
    for slot in (300, 600, 900):
        intent = _record("n")
        assert intent.uid is not None
        any_store.commit_intents([intent], schedules={"n": state(slot)},
                                 runs=[Run("n", float(slot), intent.uid)], keep_runs={"n": 1})
        any_store.save([replace(intent, phase=Phase.COMPLETED, job_id=f"j{slot}")])
    assert any_store.schedules() == {"n": state(900)}
    runs = any_store.runs("n")
    assert [(r.slot, r.outcome, r.job_id) for r in runs] == [
        (900.0, "current", None), (600.0, "completed", "j600")]
    any_store.drop_schedules(["n"])
    assert any_store.schedules() == {} and any_store.runs() == []


def test_policies_and_approvals(any_store: Any) -> None:
    any_store.save_policies([StoredPolicy("p", "{}", "h1", "p.yaml")])
    any_store.save_policies([StoredPolicy("p", '{"a":1}', "h2", "q.yaml")])
    assert any_store.policies() == [StoredPolicy("p", '{"a":1}', "h2", "q.yaml")]
    any_store.drop_policies(["p"])
    assert any_store.policies() == []
    pending = Approval("j-1", "n-1", "http://n/cb", "docker", "pending", "", "", 1.0)
    any_store.save_approval(pending)
    decided = Approval("j-1", "n-1", "http://n/cb", "docker", "approved", "r", "ok", 1.0, 2.0)
    any_store.save_approval(decided)
    assert any_store.approval("j-1") == decided
    assert any_store.approvals("pending") == [] and any_store.approvals() == [decided]
    assert any_store.approval("nope") is None


def test_spec_views_kept_only_while_a_record_names_them(any_store: Any) -> None:
    a = _record("a")
    any_store.commit_intents([a])
    any_store.save_views({a.spec_hash: {"image": "ubuntu"}, "gone" * 16: {"image": "x"}})
    assert any_store.view(a.spec_hash) == {"image": "ubuntu"}
    assert any_store.view("gone" * 16) is None  # no record names it
    any_store.save_views({a.spec_hash: {"image": "debian"}})
    assert any_store.view(a.spec_hash) == {"image": "debian"}


def test_cancels_are_counted_in_the_forget_transaction(any_store: Any) -> None:
    any_store.commit_intents([_record("a"), _record("b"), _record("c")])
    any_store.forget(["a", "b"], cancelled_at=1000.0)
    any_store.forget(["c"])  # not a cancel: not counted
    assert any_store.records() == []
    assert any_store.recent_cancels(1000.0) == 2
    assert any_store.recent_cancels(1000.5) == 0
    any_store.clear_cancels()
    assert any_store.recent_cancels(0.0) == 0


def test_approvals_counted_and_pruned(any_store: Any) -> None:
    for i, (state, received) in enumerate([("pending", 1.0), ("approved", 2.0),
                                           ("rejected", 3.0), ("pending", 50.0),
                                           ("approved", 60.0), ("approved", 70.0)]):
        decided = None if state == "pending" else received
        any_store.save_approval(Approval(f"j-{i}", "n", "http://n/cb", "s", state, "", "",
                                         received, decided))
    assert any_store.approval_count() == 6
    # before 10: j-0 (pending, old), j-1, j-2 go; then keep 2: the oldest decided (j-4) goes
    assert any_store.prune_approvals(before=10.0, keep=2) == 4
    assert sorted(a.job_id for a in any_store.approvals()) == ["j-3", "j-5"]
    assert any_store.approval_count() == 2


# --- PostgreSQL specifics ------------------------------------------------------------------


@needs_pg
def test_a_version_4_schema_is_migrated_with_its_records(pg_url: str) -> None:
    """Schema 5 (issue 14) adds each job's version and state message to a store of schema 4:
    the rows are kept, the new columns start empty and are written from then on."""
    import psycopg

    from reconciler.store import postgres

    with psycopg.connect(pg_url, autocommit=True) as db, db.transaction():
        db.execute(f"CREATE SCHEMA {postgres.SCHEMA}")
        db.execute(f"SET LOCAL search_path TO {postgres.SCHEMA}")
        db.execute(postgres._LEASE_TABLE)
        for step in range(1, 5):
            db.execute(postgres._MIGRATIONS[step])
        db.execute("INSERT INTO schema_version VALUES (4)")
        db.execute("INSERT INTO jobs (name, phase, spec_hash, path, job_id, job_state, "
                   "updated_at) VALUES ('kept', 'active', 'h', 'kept.yaml', 'j-1', 'Running', 0)")
    with pytest.raises(StoreError, match="needs a schema upgrade"):
        PostgresStore(pg_url, writer=False)
    with PostgresStore(pg_url) as store:
        [kept] = store.records()
        assert (kept.name, kept.job_state, kept.job_version, kept.job_message) == (
            "kept", "Running", None, None)
        store.save([replace(kept, job_version=2, job_message="stopped: maintenance")])
    with PostgresStore(pg_url, writer=False) as reader:
        [kept] = reader.records()
        assert (kept.job_version, kept.job_message) == (2, "stopped: maintenance")
        assert reader._query("SELECT version FROM schema_version")[0]["version"] == 5


@needs_pg
def test_two_daemons_starting_together_migrate_once(pg_url: str) -> None:
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            PostgresStore(pg_url).close()
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@needs_pg
def test_password_never_in_errors(pg: PgServer) -> None:
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{pg.port}/no_such_db"
    with pytest.raises(StoreError) as info:
        PostgresStore(url)
    assert "s3cret-pw" not in str(info.value)
    assert "no_such_db" in str(info.value)


@needs_pg
def test_only_one_leads_and_a_standby_takes_over_after_expiry(pg_url: str) -> None:
    a_clock, b_clock = FakeClock(), FakeClock()
    a = PostgresLease(pg_url, "host-a", duration=1.0, clock=a_clock)
    b = PostgresLease(pg_url, "host-b", duration=1.0, clock=b_clock)
    try:
        assert a.campaign() is True
        first = a.epoch
        assert first is not None
        assert b.campaign() is False and b.epoch is None
        info = b.info()
        assert info is not None and info.holder == "host-a" and info.epoch == first
        # a stops renewing (killed, paused): b takes over only once the server's expiry passed
        _wait_until(lambda: b.campaign(), timeout=5.0)
        assert b.epoch == first + 1
        # a wakes up: by its own clock the lease is gone (paused past it), and renewing fails
        a_clock.now += 10
        assert a.epoch is None
        assert a.campaign() is False
    finally:
        a.close()
        b.close()


@needs_pg
def test_a_write_under_a_lost_epoch_is_refused(pg_url: str) -> None:
    clock = FakeClock()
    old = PostgresLease(pg_url, "old", duration=1.0, clock=clock)
    new = PostgresLease(pg_url, "new", duration=1.0)
    store = PostgresStore(pg_url, fence=old)
    try:
        assert old.campaign()
        store.commit_intents([_record("a")])
        _wait_until(lambda: new.campaign(), timeout=5.0)  # old never renewed: it expired
        # old still believes (its clock did not move), but the database says otherwise
        assert old.epoch is not None
        with pytest.raises(NotLeader):
            store.commit_intents([_record("b")])  # one record: one fenced statement
        with pytest.raises(NotLeader):
            store.commit_intents([_record("c"), _record("d")])  # a fenced transaction
        assert [r.name for r in store.records()] == ["a"]
    finally:
        store.close()
        old.close()
        new.close()


@needs_pg
def test_a_standby_writes_nothing(pg_url: str) -> None:
    leader = PostgresLease(pg_url, "leader", duration=5.0)
    standby = PostgresLease(pg_url, "standby", duration=5.0)
    store = PostgresStore(pg_url, fence=standby)
    try:
        assert leader.campaign() and not standby.campaign()
        with pytest.raises(NotLeader):
            store.commit_intents([_record("a")])
        assert store.records() == []
    finally:
        store.close()
        leader.close()
        standby.close()


@needs_pg
def test_a_leader_cut_off_from_the_database_stops_leading(pg: PgServer, pg_url: str) -> None:
    lease = PostgresLease(pg_url, "cut", duration=1.0, clock=FakeClock())
    other = PostgresLease(pg_url, "other", duration=1.0)
    try:
        assert lease.campaign()
        database = pg_url.rsplit("/", 1)[1]
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               f"WHERE datname = '{database}' AND application_name = 'reconciler-lease'")
        # its next renewal fails on the dead connection: it steps down at once
        assert lease.campaign() is False and lease.epoch is None
        _wait_until(lambda: other.campaign(), timeout=5.0)
        assert lease.campaign() is False  # and cannot come back while other leads
        assert other.epoch is not None and other.epoch > 1
    finally:
        lease.close()
        other.close()


@needs_pg
def test_release_hands_over_at_once(pg_url: str) -> None:
    a = PostgresLease(pg_url, "a", duration=30.0)
    b = PostgresLease(pg_url, "b", duration=30.0)
    try:
        assert a.campaign()
        a.release()
        assert b.campaign()
    finally:
        a.close()
        b.close()


def _wait_until(condition: Any, timeout: float) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@needs_pg
def test_the_password_comes_from_the_systemd_credential(
        pg: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A role that needs a password: the URL names none, ``$CREDENTIALS_DIRECTORY/
    state-password`` supplies it; without it the error is one line without any secret."""
    role = f"pw_{uuid.uuid4().hex[:8]}"
    pg.sql(f"CREATE ROLE {role} LOGIN PASSWORD 'cred-s3cret'")
    database = pg.create_database(f"t_{uuid.uuid4().hex[:12]}").rsplit("/", 1)[1]
    pg.sql(f'ALTER DATABASE "{database}" OWNER TO {role}')
    hba = pg.folder / "data" / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    reload = pg._run("pg_ctl", "-D", str(pg.folder / "data"), "reload")
    assert reload.returncode == 0, reload.stderr
    try:
        url = f"postgresql://{role}@127.0.0.1:{pg.port}/{database}"
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
        with pytest.raises(StoreError) as refused:
            PostgresStore(url)
        message = str(refused.value)
        assert "cred-s3cret" not in message and database in message
        assert "password" in message and "\n" not in message
        (tmp_path / "creds").mkdir()
        (tmp_path / "creds" / "state-password").write_text("cred-s3cret\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
        with PostgresStore(url) as store:
            store.commit_intents([_record("a")])
            assert [r.name for r in store.records()] == ["a"]
    finally:
        hba.write_text(original)
        pg._run("pg_ctl", "-D", str(pg.folder / "data"), "reload")
