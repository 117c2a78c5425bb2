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
by a newer version is refused. The daemon's store is handed a
:class:`~reconciler.ports.Leadership` (:class:`~reconciler.store.lease.FileLease`, an exclusive
``flock`` on ``<db>.lock``) so two daemons never share a store; only while it holds one does the
store keep a write-through copy of the records.

The files (db, ``-wal``, ``-shm``, lock) are private (0600) whatever the umask and whether or
not the folder existed: SQLite creates the database 0644 and gives the ``-wal`` and ``-shm``
files the database's mode, so the database file is created 0600 before SQLite opens it.

A full disk: the WAL only shrinks at a checkpoint, and on a small volume it can fill the volume
before an automatic checkpoint is due, after which every write fails even once space is back.
A write that fails for lack of space therefore checkpoints the WAL (``TRUNCATE``) and is tried
again once.

A writer runs ``PRAGMA quick_check`` when it opens the store and refuses a damaged one.

Errors: :class:`StoreError` (and :class:`StoreLocked`, :class:`StoreTooNew`,
:class:`StoreCorrupt`) of :mod:`reconciler.store.errors`, translated from ``sqlite3`` and
``OSError`` where they enter.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import astuple, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reconciler.domain.records import Approval, Phase, Record, Run, StoredPolicy
from reconciler.domain.schedule import ScheduleState
from reconciler.ports import Leadership
from reconciler.store.errors import StoreCorrupt, StoreError, StoreLocked, StoreTooNew

__all__ = ["SCHEMA_VERSION", "Store", "StoreCorrupt", "StoreError", "StoreLocked", "StoreTooNew"]

SCHEMA_VERSION = 5
#: Cancels older than this are pruned: the longest ``mass_cancel_window`` allowed.
CANCEL_HISTORY = 7 * 86400.0

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
    # When removals were cancelled: the mass-cancel guard counts them over a sliding window,
    # and the count must survive a restart (issue 11 item 6).
    3: """
    CREATE TABLE cancels (name TEXT NOT NULL, at REAL NOT NULL);
    CREATE INDEX cancels_at ON cancels(at);
    """,
    # Scheduled manifests (issue 16): each one's ScheduleState, and its recent runs (keepRuns).
    # The newest run of a name is the job its jobs row records (docs/design.md, "Schedules").
    4: """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        since REAL NOT NULL,
        last_slot REAL
    );
    CREATE TABLE runs (
        name TEXT NOT NULL,
        slot REAL NOT NULL,
        uid TEXT NOT NULL,
        job_id TEXT,
        outcome TEXT NOT NULL,
        PRIMARY KEY (name, slot)
    );
    """,
    # What `status` shows of a job besides its state (issue 14): its version (orchestrator
    # v1.8+ updates in place) and its state message (why it failed or was stopped).
    5: """
    ALTER TABLE jobs ADD COLUMN job_version INTEGER;
    ALTER TABLE jobs ADD COLUMN job_message TEXT;
    """,
}

_COLUMNS = tuple(f.name for f in fields(Record))


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

    def __init__(
        self, path: Path, *, writer: bool = True, leadership: Leadership | None = None
    ) -> None:
        """Without ``leadership`` a writer writes beside whoever leads (SQLite serializes
        writers): for small updates from the CLI while a daemon runs. The store releases the
        leadership it was handed when it closes."""
        self.path = path
        self._leadership = leadership
        # The only writer (it leads) keeps a write-through copy of the records, so a pass
        # does not read every row back from SQLite; others always read the file.
        self._cache: dict[str, Record] | None = None
        self._writer = writer
        self._reclaim_pending = False  # a write failed for lack of space; see _reclaim
        with _translated(path):
            if writer:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                _make_private(path)
            self._db = self._connect(path, writer)
            if writer:
                self._refuse_if_corrupt()
            self._migrate(writer)
            if writer:
                # Not a schema version: a cache of what plan may show of a replaced spec
                # (domain/specview.py). Older readers ignore it; without it plans show less.
                self._db.execute("CREATE TABLE IF NOT EXISTS spec_views (spec_hash TEXT "
                                 "PRIMARY KEY, view TEXT NOT NULL)")

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

    def _refuse_if_corrupt(self) -> None:
        """``PRAGMA quick_check`` once at open: a damaged page would otherwise fail some
        passes (whichever touch it) forever; refused here, it is one clear message at start.
        It reads every page once: 2.4 ms for 10,000 records (2.7 MB) here."""
        problem = self.check()
        if problem != "ok":
            self.close()
            raise StoreCorrupt(
                f"{self.path}: the database is damaged (quick_check: {problem.splitlines()[0]});"
                " restore it from a backup, or move it away to start afresh: live jobs are "
                "then adopted by their name annotation"
            )

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
            # One transaction a step: a crash mid-migration leaves the previous version
            # intact. The version is read again under the write lock: another writer opening
            # the same old store at the same moment (a daemon restarted after an upgrade, a
            # CLI write beside it) may have migrated it since our first read, and a step run
            # twice fails (schema 5: "duplicate column name").
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if int(self._db.execute("PRAGMA user_version").fetchone()[0]) < step:
                    for statement in _MIGRATIONS[step].split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version={step}")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @property
    def _caching(self) -> bool:
        return self._writer and self._leadership is not None and self._leadership.held

    def close(self) -> None:
        self._db.close()
        if self._leadership is not None:
            self._leadership.release()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    @property
    def location(self) -> str:
        return str(self.path)

    def records(self) -> list[Record]:
        if self._cache is not None and not self._caching:
            self._cache = None  # leadership lost: another writer may write now
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

    def view(self, spec_hash: str) -> dict[str, str] | None:
        """The printable view of a spec this store submitted, when it kept one."""
        try:
            row = self._db.execute("SELECT view FROM spec_views WHERE spec_hash = ?",
                                   (spec_hash,)).fetchone()
        except sqlite3.OperationalError:  # a store written before spec_views existed
            return None
        return dict(json.loads(row[0])) if row else None

    # --- writing ------------------------------------------------------------------------

    def save_views(self, views: Mapping[str, Mapping[str, str]]) -> None:
        """Keep the views of these specs, and only those any record still names."""
        if not views:
            return
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany("INSERT OR REPLACE INTO spec_views VALUES (?, ?)",
                                 [(h, json.dumps(dict(v))) for h, v in views.items()])
            self._db.execute("DELETE FROM spec_views WHERE spec_hash NOT IN "
                             "(SELECT spec_hash FROM jobs)")

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

    def approval_count(self) -> int:
        with _translated(self.path):
            return int(self._db.execute("SELECT count(*) FROM approvals").fetchone()[0])

    def prune_approvals(self, *, before: float, keep: int) -> int:
        """Delete requests decided, or still pending but received, before ``before``; then
        the oldest decided ones beyond ``keep`` rows. Pending requests within their time are
        never dropped for room: an operator may still approve them. Returns rows deleted."""
        with _translated(self.path), self._transaction(durable=False):
            gone = self._db.execute(
                "DELETE FROM approvals WHERE (state = 'pending' AND received_at < ?) "
                "OR (state != 'pending' AND coalesce(decided_at, received_at) < ?)",
                (before, before)).rowcount
            excess = self._db.execute("SELECT count(*) FROM approvals").fetchone()[0] - keep
            if excess > 0:
                gone += self._db.execute(
                    "DELETE FROM approvals WHERE job_id IN (SELECT job_id FROM approvals "
                    "WHERE state != 'pending' ORDER BY decided_at LIMIT ?)", (excess,)).rowcount
        return int(gone)

    def commit_intents(
        self, records: Sequence[Record], *, schedules: Mapping[str, ScheduleState] | None = None,
        runs: Sequence[Run] = (), keep_runs: Mapping[str, int] | None = None,
    ) -> None:
        """Write intents durably (FULL): one fsync for the whole batch. With them, in the same
        transaction: ``schedules`` (the state after a slot's decision) and ``runs`` (new runs;
        each name's previous run is closed with its record's phase and job first, and only the
        newest ``keep_runs[name] + 1`` runs are kept)."""
        self._write(records, durable=True, schedules=schedules or {}, runs=runs,
                    keep_runs=keep_runs or {})

    def schedules(self) -> dict[str, ScheduleState]:
        """The recorded state of every scheduled manifest, by name."""
        with _translated(self.path):
            rows = self._db.execute("SELECT * FROM schedules").fetchall()
        return {row["name"]: _schedule_state(dict(row)) for row in rows}

    def runs(self, name: str | None = None) -> list[Run]:
        """Recent runs, newest first (of one name, or of all)."""
        sql = "SELECT name, slot, uid, job_id, outcome FROM runs"
        sql += " WHERE name = ?" if name is not None else ""
        with _translated(self.path):
            rows = self._db.execute(sql + " ORDER BY name, slot DESC",
                                    (name,) if name is not None else ()).fetchall()
        return [Run(**dict(row)) for row in rows]

    def drop_schedules(self, names: Iterable[str]) -> None:
        """Forget the schedule state and runs of names no longer scheduled."""
        gone = [(n,) for n in names]
        if not gone:
            return
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany("DELETE FROM schedules WHERE name = ?", gone)
            self._db.executemany("DELETE FROM runs WHERE name = ?", gone)

    def save(self, records: Sequence[Record]) -> None:
        """Write outcomes (NORMAL): cheap; an intent already guards each of them."""
        self._write(records, durable=False)

    def recent_cancels(self, since: float) -> int:
        """How many removals were cancelled at or after ``since`` (wall-clock seconds)."""
        with _translated(self.path):
            row = self._db.execute("SELECT count(*) FROM cancels WHERE at >= ?",
                                   (since,)).fetchone()
        return int(row[0])

    def clear_cancels(self) -> None:
        """Start the mass-cancel window afresh (an operator allowed a mass cancel)."""
        with _translated(self.path), self._transaction(durable=False):
            self._db.execute("DELETE FROM cancels")

    def forget(self, names: Iterable[str], *, cancelled_at: float | None = None) -> None:
        """Drop records; ``cancelled_at``: their jobs were just cancelled because their
        manifests were removed, which the mass-cancel guard counts (same transaction)."""
        gone = list(names)
        with _translated(self.path), self._transaction(durable=False):
            self._db.executemany("DELETE FROM jobs WHERE name = ?", [(n,) for n in gone])
            if cancelled_at is not None:
                self._db.executemany("INSERT INTO cancels VALUES (?, ?)",
                                     [(n, cancelled_at) for n in gone])
                self._db.execute("DELETE FROM cancels WHERE at < ?",
                                 (cancelled_at - CANCEL_HISTORY,))
        if self._cache is not None:  # only once the transaction committed
            for name in gone:
                self._cache.pop(name, None)

    def _write(self, records: Sequence[Record], durable: bool,
               schedules: Mapping[str, ScheduleState] | None = None, runs: Sequence[Run] = (),
               keep_runs: Mapping[str, int] | None = None) -> None:
        if not records and not schedules and not runs:
            return
        now = time.time()
        rows = [_row(r, now) for r in records]
        placeholders = ", ".join(f":{c}" for c in _COLUMNS)
        sql = f"INSERT OR REPLACE INTO jobs ({', '.join(_COLUMNS)}) VALUES ({placeholders})"

        def write() -> None:
            # Runs first: a name's previous run is closed from its jobs row before the new
            # intent overwrites that row.
            for run in runs:
                self._db.execute(_CLOSE_RUN, (run.name, run.name))
                self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?)",
                                 (run.name, run.slot, run.uid, run.job_id, run.outcome))
            for name, keep in (keep_runs or {}).items():
                self._db.execute(_PRUNE_RUNS.replace("%s", "?"), (name, name, keep + 1))
            self._db.executemany("INSERT OR REPLACE INTO schedules VALUES (?, ?, ?, ?, ?)",
                                 [_schedule_row(n, s) for n, s in (schedules or {}).items()])
            self._db.executemany(sql, rows)

        with _translated(self.path):
            try:
                with self._transaction(durable):
                    write()
            except sqlite3.DatabaseError as exc:
                if not _out_of_space(exc):
                    raise
                with self._transaction(durable):  # once, after the WAL was checkpointed
                    write()
        if self._cache is not None:  # only once the transaction committed
            for record in records:
                self._cache[record.name] = _stamped(record, now)

    @contextlib.contextmanager
    def _transaction(self, durable: bool) -> Iterator[None]:
        if self._reclaim_pending:  # first, while the space just freed is still free
            self._reclaim()
        self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            # SQLite may have rolled back already (a full disk does); never leave one open,
            # or every later BEGIN fails.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if _out_of_space(exc):
                self._reclaim()
            raise

    def _reclaim(self) -> None:
        """After a write failed for lack of space: copy the WAL into the database and truncate
        it. That needs room for the database to grow, so until it succeeds it is tried again
        before every transaction: the first write after space returns must not spend that
        space on the WAL, or the volume fills again with nothing left to checkpoint into."""
        try:
            busy = self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.DatabaseError:
            busy = 1
        self._reclaim_pending = bool(busy)


#: Close a name's newest open run with what its jobs row says (phase and job id), before a new
#: run's intent overwrites that row. Shared with store/postgres.py (``%s`` placeholders there).
_CLOSE_RUN = """
UPDATE runs SET outcome = (SELECT phase FROM jobs WHERE jobs.name = runs.name),
                job_id = (SELECT job_id FROM jobs WHERE jobs.name = runs.name)
WHERE name = ? AND outcome = 'current'
  AND slot = (SELECT max(slot) FROM runs r WHERE r.name = ?)
  AND EXISTS (SELECT 1 FROM jobs WHERE jobs.name = runs.name)
"""
_PRUNE_RUNS = """
DELETE FROM runs WHERE name = %s AND slot NOT IN
  (SELECT slot FROM runs r WHERE r.name = %s ORDER BY slot DESC LIMIT %s)
"""


def _schedule_row(name: str, state: ScheduleState) -> tuple[str, str, str, float, float | None]:
    last = state.last_slot.timestamp() if state.last_slot is not None else None
    return (name, state.key[0], state.key[1], state.since.timestamp(), last)


def _schedule_state(row: Mapping[str, Any]) -> ScheduleState:
    def instant(value: float) -> datetime:
        return datetime.fromtimestamp(value, UTC)

    last = row["last_slot"]
    return ScheduleState((row["cron"], row["timezone"]), instant(row["since"]),
                         None if last is None else instant(last))


def _out_of_space(exc: BaseException) -> bool:
    """SQLITE_FULL, or an I/O error (a file-size limit gives EFBIG, reported as IOERR)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and (code & 0xFF) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)


def _make_private(path: Path) -> None:
    """Create the database 0600 (SQLite's -wal and -shm follow its mode), and tighten files an
    older version left readable by others."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for suffix in ("", "-wal", "-shm", ".lock"):
        member = path.with_name(path.name + suffix)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(member).st_mode & 0o077:
                os.chmod(member, 0o600)


def _row(record: Record, now: float) -> dict[str, Any]:
    """A record's column values. Not ``dataclasses.asdict``: it deep-copies every field, and
    it was half the cost of saving an outcome (docs/performance.md)."""
    row = {column: getattr(record, column) for column in _COLUMNS}
    row["phase"] = str(record.phase)
    row["updated_at"] = now
    return row


def _stamped(record: Record, now: float) -> Record:
    """``replace(record, updated_at=now)`` for the write-through cache, cheaply
    (:meth:`Record.evolve`; two records are written per submitted job)."""
    return record.evolve(updated_at=now)


def _record(row: sqlite3.Row) -> Record:
    values: dict[str, Any] = {column: row[column] for column in _COLUMNS}
    values["phase"] = Phase(values["phase"])
    return Record(**values)
