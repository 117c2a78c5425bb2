"""The state store: one SQLite file holding a record per managed name.

Durability rules (docs/operations-notes.md, SQLite durability, Intent before effect):

* WAL journal; an explicit ``BEGIN IMMEDIATE`` per transaction; one writer connection.
* Intents (what we are about to do remotely) are committed with ``synchronous=FULL``, so they
  survive a power loss: an intent is what lets a restarted daemon find a job whose reply was
  lost instead of submitting it twice. Several intents share one commit (one fsync) when a
  pass submits many jobs.
* Outcomes (job ids, states) are committed with ``synchronous=NORMAL``: losing one to a power
  cut only means resolving its intent again by uid.

The schema is versioned (``PRAGMA user_version``) and migrated forward on open; a store written
by a newer version is refused. A writer takes an exclusive ``flock`` on ``<db>.lock`` so two
daemons never share a store.

Errors: :class:`StoreError` (and :class:`StoreLocked`, :class:`StoreTooNew`), translated from
``sqlite3`` and ``OSError`` where they enter.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, astuple, fields, replace
from pathlib import Path
from typing import Any

from reconciler.domain.records import Approval, Phase, Record, StoredPolicy

SCHEMA_VERSION = 2

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        spec_hash TEXT NOT NULL,
        path TEXT NOT NULL,
        job_id TEXT,
        uid TEXT,
        job_state TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        on_remove TEXT NOT NULL DEFAULT 'cancel',
        revision TEXT,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_job_id ON jobs(job_id);
    """,
    2: """
    CREATE TABLE approval_policies (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        path TEXT NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE approvals (
        job_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        callback TEXT NOT NULL,
        summary TEXT NOT NULL,
        state TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        received_at REAL NOT NULL,
        decided_at REAL
    );
    """,
}

_COLUMNS = tuple(f.name for f in fields(Record))


class StoreError(Exception):
    """The state store cannot be used."""


class StoreLocked(StoreError):
    pass


class StoreTooNew(StoreError):
    pass


def default_path() -> Path:
    """``$STATE_DIRECTORY/state.db`` under systemd, else ``~/.local/state/reconciler``."""
    state_dirs = os.environ.get("STATE_DIRECTORY")
    if state_dirs:
        return Path(state_dirs.split(":")[0]) / "state.db"
    return Path.home() / ".local/state/reconciler/state.db"


@contextlib.contextmanager
def _translated(path: Path) -> Iterator[None]:
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from exc


class Store:
    """Records by name. ``writer=False`` opens read-only (``plan``, ``status``)."""

    def __init__(self, path: Path, *, writer: bool = True, exclusive: bool = True) -> None:
        """``exclusive=False`` writes without the daemon lock (SQLite still serializes
        writers): for small updates from the CLI while a daemon runs."""
        self.path = path
        self._lock_fd: int | None = None
        # The only writer (it holds the lock) keeps a write-through copy of the records, so a
        # pass does not read every row back from SQLite; others always read the file.
        self._cache: dict[str, Record] | None = None
        self._caching = writer and exclusive
        with _translated(path):
            if writer and exclusive:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._lock_fd = _take_lock(path)
            self._db = self._connect(path, writer)
            self._migrate(writer)

    # --- opening ------------------------------------------------------------------------

    @staticmethod
    def _connect(path: Path, writer: bool) -> sqlite3.Connection:
        if not writer and not path.exists():
            db = sqlite3.connect(":memory:", isolation_level=None)
        elif writer:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
        else:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                                 check_same_thread=False)
        db.execute("PRAGMA busy_timeout=5000")
        db.row_factory = sqlite3.Row
        return db

    def _migrate(self, writer: bool) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise StoreTooNew(
                f"{self.path}: written by a newer reconciler (schema {version}, this one "
                f"knows {SCHEMA_VERSION}); upgrade reconciler or use another --state"
            )
        if version == SCHEMA_VERSION:
            return
        if not writer:
            if self.path.exists():
                raise StoreError(f"{self.path}: needs a schema upgrade; run the daemon or "
                                 "`reconciler apply` once")
            for step in range(1, SCHEMA_VERSION + 1):  # an empty in-memory view
                self._db.executescript(_MIGRATIONS[step])
            return
        for step in range(version + 1, SCHEMA_VERSION + 1):
            # executescript commits whatever is open first, so the script carries its own
            # transaction: a crash mid-migration leaves the previous version intact.
            self._db.executescript(
                f"BEGIN IMMEDIATE; {_MIGRATIONS[step]}; PRAGMA user_version={step}; COMMIT;"
            )

    def close(self) -> None:
        self._db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def records(self) -> list[Record]:
        if self._cache is not None:
            return list(self._cache.values())
        with _translated(self.path):
            rows = self._db.execute("SELECT * FROM jobs ORDER BY name").fetchall()
        records = [_record(row) for row in rows]
        if self._caching:
            self._cache = {r.name: r for r in records}
        return records

    def check(self) -> str:
        """``PRAGMA quick_check``: "ok" or the first problem found."""
        with _translated(self.path):
            return str(self._db.execute("PRAGMA quick_check").fetchone()[0])

    def policies(self) -> list[StoredPolicy]:
        with _translated(self.path):
            rows = self._db.execute("SELECT name, body, body_hash, path FROM approval_policies "
                                    "ORDER BY name").fetchall()
        return [StoredPolicy(*row) for row in rows]

    def approvals(self, state: str | None = None) -> list[Approval]:
        sql = "SELECT * FROM approvals" + (" WHERE state = ?" if state else "")
        with _translated(self.path):
            rows = self._db.execute(sql + " ORDER BY received_at", (state,) if state else ())
        return [Approval(**dict(row)) for row in rows]

    def approval(self, job_id: str) -> Approval | None:
        with _translated(self.path):
            row = self._db.execute("SELECT * FROM approvals WHERE job_id = ?",
                                   (job_id,)).fetchone()
        return Approval(**dict(row)) if row else None

    # --- writing ------------------------------------------------------------------------

    def save_policies(self, policies: Sequence[StoredPolicy]) -> None:
        now = time.time()
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany(
                "INSERT OR REPLACE INTO approval_policies VALUES (?, ?, ?, ?, ?)",
                [(p.name, p.body, p.body_hash, p.path, now) for p in policies])

    def drop_policies(self, names: Iterable[str]) -> None:
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany("DELETE FROM approval_policies WHERE name = ?",
                                 [(n,) for n in names])

    def save_approval(self, approval: Approval) -> None:
        with _translated(self.path), self._transaction(durable=True):
            self._db.execute("INSERT OR REPLACE INTO approvals VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             astuple(approval))

    def commit_intents(self, records: Sequence[Record]) -> None:
        """Write intents durably (FULL): one fsync for the whole batch."""
        self._write(records, durable=True)

    def save(self, records: Sequence[Record]) -> None:
        """Write outcomes (NORMAL): cheap; an intent already guards each of them."""
        self._write(records, durable=False)

    def forget(self, names: Iterable[str]) -> None:
        gone = list(names)
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany("DELETE FROM jobs WHERE name = ?", [(n,) for n in gone])
        if self._cache is not None:  # only once the transaction committed
            for name in gone:
                self._cache.pop(name, None)

    def _write(self, records: Sequence[Record], durable: bool) -> None:
        if not records:
            return
        now = time.time()
        rows = [asdict(r) | {"phase": str(r.phase), "updated_at": now} for r in records]
        placeholders = ", ".join(f":{c}" for c in _COLUMNS)
        sql = f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
        with _translated(self.path), self._transaction(durable):
            self._db.executemany(sql, rows)
        if self._cache is not None:  # only once the transaction committed
            for record in records:
                self._cache[record.name] = replace(record, updated_at=now)

    @contextlib.contextmanager
    def _transaction(self, durable: bool) -> Iterator[None]:
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _take_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLocked(
            f"{path}: in use by another reconciler process (lock {lock_path}); "
            "two daemons must not share a store"
        ) from None
    return fd


def _record(row: sqlite3.Row) -> Record:
    values: dict[str, Any] = {column: row[column] for column in _COLUMNS}
    values["phase"] = Phase(values["phase"])
    return Record(**values)
