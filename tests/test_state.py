"""The state store: schema versions, the writer lock, durability across SIGKILL."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reconciler.app.wiring import open_store
from reconciler.domain.records import Phase, Record
from reconciler.store import sqlite as sqlite_store
from reconciler.store.sqlite import SCHEMA_VERSION, Store, StoreLocked, StoreTooNew


def record(name: str, phase: Phase = Phase.ACTIVE) -> Record:
    return Record(name, phase, "h" * 64, f"{name}.yaml", job_id=f"id-{name}", uid="u")


def test_round_trip_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with open_store(path) as store:
        store.commit_intents([record("a", Phase.SUBMITTING), record("b")])
        store.save([record("a")])
        store.forget(["b"])
        assert [(r.name, r.phase) for r in store.records()] == [("a", Phase.ACTIVE)]
        assert store.check() == "ok"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_newer_store_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    open_store(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreTooNew, match="newer reconciler"):
        open_store(path)
    with pytest.raises(StoreTooNew):
        Store(path, writer=False)


def test_second_writer_is_refused(tmp_path: Path, rsa_key: Path) -> None:
    path = tmp_path / "state.db"
    with open_store(path):
        with pytest.raises(StoreLocked, match="in use by another reconciler"):
            open_store(path)
        (tmp_path / "m").mkdir()
        result = subprocess.run(
            [sys.executable, "-m", "reconciler", "apply", "--state", str(path), "--manifests",
             str(tmp_path / "m"), "--key", str(rsa_key)], capture_output=True, text=True)
        assert result.returncode == 1
        assert "in use by another reconciler process" in result.stderr
        with Store(path, writer=False) as reader:  # readers are never locked out
            assert reader.records() == []
    open_store(path).close()  # released with its holder


def _commit_then_die(path: str) -> None:
    store = open_store(Path(path))
    store.commit_intents([record("survives", Phase.SUBMITTING)])
    store._db.execute("BEGIN IMMEDIATE")
    store._db.execute("DELETE FROM jobs")  # an uncommitted change, then a hard kill
    os.kill(os.getpid(), signal.SIGKILL)


def test_committed_intent_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    child = multiprocessing.get_context("spawn").Process(target=_commit_then_die,
                                                          args=(str(path),))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with open_store(path) as store:
        assert [r.name for r in store.records()] == ["survives"]
        assert store.check() == "ok"


def test_reader_of_a_missing_store_sees_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "absent.db", writer=False) as store:
        assert store.records() == []
    assert not (tmp_path / "absent.db").exists()


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    from reconciler.store.sqlite import StoreError

    with pytest.raises(StoreError, match="file"):
        open_store(blocker / "state.db")


def test_version_4_store_gains_job_version_and_message(tmp_path: Path) -> None:
    """Schema 5 (issue 14): each job's version and state message, empty for older rows."""
    from reconciler.store.sqlite import _MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("".join(_MIGRATIONS[step] for step in range(1, 5)) +
                     "PRAGMA user_version=4;")
    db.execute("INSERT INTO jobs (name, phase, spec_hash, path, job_id, job_state, updated_at) "
               "VALUES ('kept', 'active', 'h', 'kept.yaml', 'j-1', 'Running', 0)")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="needs a schema upgrade"):
        Store(path, writer=False)
    with open_store(path) as store:
        [kept] = store.records()
        assert (kept.job_state, kept.job_version, kept.job_message) == ("Running", None, None)
        store.save([Record(**{**kept.__dict__, "job_version": 2, "job_message": "stopped"})])
    with Store(path, writer=False) as reader:
        [kept] = reader.records()
        assert (kept.job_version, kept.job_message) == (2, "stopped")
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_two_writers_opening_a_version_4_store_together_migrate_once(tmp_path: Path) -> None:
    """A daemon restarted after an upgrade and a CLI write beside it open the old store at the
    same moment: both read schema 4, one migrates, the other must not run the step again
    (schema 5's ALTER TABLE failed with "duplicate column name" in 18 of 20 real races)."""
    import threading
    import time

    from reconciler.store.sqlite import _MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")  # as a writer left it
    db.executescript("".join(_MIGRATIONS[step] for step in range(1, 5)) +
                     "PRAGMA user_version=4;")
    db.execute("BEGIN IMMEDIATE")  # the other writer: holds the write lock, migrating
    outcome: list[BaseException | Store] = []

    def second_writer() -> None:
        try:
            outcome.append(Store(path))  # reads version 4, then waits for the lock
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=second_writer)
    thread.start()
    time.sleep(0.5)
    for statement in ("ALTER TABLE jobs ADD COLUMN job_version INTEGER",
                      "ALTER TABLE jobs ADD COLUMN job_message TEXT",
                      "PRAGMA user_version=5", "COMMIT"):
        db.execute(statement)
    thread.join(10)
    db.close()
    [store] = outcome
    assert isinstance(store, Store), store
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_version_1_store_is_migrated_with_its_records(tmp_path: Path) -> None:
    from reconciler.store.sqlite import _MIGRATIONS

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(_MIGRATIONS[1] + "PRAGMA user_version=1;")
    db.execute("INSERT INTO jobs (name, phase, spec_hash, path, updated_at) VALUES "
               "('kept', 'active', 'h', 'kept.yaml', 0)")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="needs a schema upgrade"):
        Store(path, writer=False)
    with open_store(path) as store:
        assert [r.name for r in store.records()] == ["kept"]
        assert store.policies() == [] and store.approvals() == []
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_cached_records_are_stamped_copies_without_dataclasses_replace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write-through cache keeps each written record as written, stamped with its write
    time, as the database has it; a copy, not ``dataclasses.replace`` (docs/performance.md)."""
    with open_store(tmp_path / "state.db") as store:
        store.records()  # the cache is filled from here on
        def refuse(*args: object, **kwargs: object) -> object:
            raise AssertionError("dataclasses.replace")

        monkeypatch.setattr(sqlite_store, "replace", refuse, raising=False)
        written = record("a")
        store.save([written])
        [cached] = store.records()
        assert cached is not written and written.updated_at == 0.0 and cached.updated_at > 0
        assert dataclasses.asdict(cached) | {"updated_at": 0.0} == dataclasses.asdict(written)
        monkeypatch.undo()
    with open_store(tmp_path / "state.db") as reopened:
        assert reopened.records() == [cached]


def test_record_evolve_is_replace_for_every_field() -> None:
    """Record.evolve copies the instance dict instead of running __init__ (the hot paths:
    reconciler/domain/records.py). A __post_init__, a default_factory or slots added to
    Record later would make that copy differ from replace: this fails first."""
    assert not hasattr(Record, "__post_init__") and not hasattr(Record, "__slots__")
    assert all(f.default_factory is dataclasses.MISSING and f.init
               for f in dataclasses.fields(Record))
    base = record("a")
    for field in dataclasses.fields(Record):
        value: Any = {"phase": Phase.FAILED, "attempts": 7, "next_attempt_at": 1.5,
                         "updated_at": 2.5, "job_version": 3}.get(field.name, "x")
        evolved = base.evolve(**{field.name: value})
        replaced = dataclasses.replace(base, **{field.name: value})
        assert evolved == replaced and hash(evolved) == hash(replaced)
        assert dataclasses.asdict(evolved) == dataclasses.asdict(replaced)
        assert pickle.loads(pickle.dumps(evolved)) == replaced
        assert type(evolved) is Record and vars(evolved) == vars(replaced)
    assert base == record("a")  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.evolve(attempts=1).attempts = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="job_msg"):
        base.evolve(job_msg="typo")
