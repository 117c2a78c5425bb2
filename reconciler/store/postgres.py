"""The state store on PostgreSQL: several daemons share one database, one of them leads.

The same records, intents, approval policies and approvals as ``store/sqlite.py``, in the schema
``reconciler`` of the database the URL names. What differs, and why (docs/design.md, "High
availability"):

* Durability: every transaction commits with ``synchronous_commit = on`` (the server's default,
  set explicitly because an operator's database may have turned it off); an intent is on the
  server's disk before its request is sent.
* Fencing: a writer is given the :class:`~reconciler.store.lease.PostgresLease` it acts under.
  Every write transaction first checks, inside the same transaction and under a share lock on
  the lease row, that the lease still carries our epoch and has not expired by the *server's*
  clock. A leader that was paused, cut off or replaced therefore cannot write an intent, and
  what is not recorded as an intent is never sent. Each row remembers the epoch that wrote it.
* Migrations run in one transaction under a transaction-scoped advisory lock, so two daemons
  starting together cannot both migrate.
* The write-through record cache is kept only while the epoch it was filled under is ours: a
  new epoch (ours after a takeover, or someone else's) starts from the database again.

Errors: :class:`~reconciler.store.sqlite.StoreError` and its subclasses, as for SQLite, with
credentials masked; :class:`NotLeader` when a fenced write finds the lease gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any, Protocol

import psycopg
from psycopg.rows import dict_row

from reconciler.domain.records import Approval, Phase, Record, Run, StoredPolicy
from reconciler.domain.schedule import ScheduleState
from reconciler.events import scrub_text
from reconciler.store.errors import NotLeader, StoreError, StoreTooNew
from reconciler.store.sqlite import (
    _CLOSE_RUN,
    _PRUNE_RUNS,
    CANCEL_HISTORY,
    SCHEMA_VERSION,
    _schedule_row,
    _schedule_state,
    _stamped,
)

SCHEMA = "reconciler"
#: ``pg_advisory_xact_lock`` key for migrations: a constant unlikely to clash in a shared database.
MIGRATION_LOCK_KEY = 0x7265636F6E63  # "reconc"
CONNECT_TIMEOUT = 5
#: A statement that takes longer than this fails rather than holding a pass (or a lease) hostage.
STATEMENT_TIMEOUT_MS = 5000

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
        next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
        on_remove TEXT NOT NULL DEFAULT 'cancel',
        revision TEXT,
        updated_at DOUBLE PRECISION NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX jobs_job_id ON jobs(job_id);
    """,
    2: """
    CREATE TABLE approval_policies (
        name TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        body_hash TEXT NOT NULL,
        path TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE approvals (
        job_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        callback TEXT NOT NULL,
        summary TEXT NOT NULL,
        state TEXT NOT NULL,
        rule TEXT NOT NULL,
        reason TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        decided_at DOUBLE PRECISION,
        epoch BIGINT NOT NULL DEFAULT 0
    );
    """,
    3: """
    CREATE TABLE cancels (name TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
    CREATE INDEX cancels_at ON cancels(at);
    """,
    # Scheduled manifests (issue 16): as store/sqlite.py's version 4.
    4: """
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        cron TEXT NOT NULL,
        timezone TEXT NOT NULL,
        since DOUBLE PRECISION NOT NULL,
        last_slot DOUBLE PRECISION,
        epoch BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE runs (
        name TEXT NOT NULL,
        slot DOUBLE PRECISION NOT NULL,
        uid TEXT NOT NULL,
        job_id TEXT,
        outcome TEXT NOT NULL,
        epoch BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (name, slot)
    );
    """,
    # A job's version and state message (issue 14): as store/sqlite.py's version 5.
    5: """
    ALTER TABLE jobs ADD COLUMN job_version BIGINT;
    ALTER TABLE jobs ADD COLUMN job_message TEXT;
    """,
}
assert max(_MIGRATIONS) == SCHEMA_VERSION, "both engines carry the same schema versions"

#: Created before the versioned schema: the lease must exist for fencing from the first write.
_LEASE_TABLE = """
CREATE TABLE IF NOT EXISTS leader_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL DEFAULT '',
    epoch BIGINT NOT NULL DEFAULT 0,
    acquired_at TIMESTAMPTZ,
    renewed_at TIMESTAMPTZ,
    expires_at TIMESTAMPTZ NOT NULL DEFAULT '-infinity'
);
INSERT INTO leader_lease (id) VALUES (1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
"""

#: Not a schema version, as on SQLite (store/sqlite.py): a cache of what ``plan`` may show of
#: a replaced spec (domain/specview.py); without it plans show less.
_VIEWS_TABLE = (
    "CREATE TABLE IF NOT EXISTS spec_views (spec_hash TEXT PRIMARY KEY, view TEXT NOT NULL)")

_COLUMNS = tuple(f.name for f in fields(Record))


def _values(record: Record, now: float) -> tuple[Any, ...]:
    """A record's column values in ``_COLUMNS`` order. Not ``dataclasses.asdict``: it
    deep-copies every field (as in store/sqlite.py, docs/performance.md)."""
    return tuple(str(record.phase) if column == "phase" else now if column == "updated_at"
                 else getattr(record, column) for column in _COLUMNS)


class Fence(Protocol):
    """What a fenced store needs of a lease: the epoch it acts under (None: not leading)."""

    @property
    def epoch(self) -> int | None: ...


def is_postgres_url(value: str) -> bool:
    return value.startswith(("postgresql://", "postgres://"))


def connect(url: str, *, application: str = "reconciler") -> psycopg.Connection[Any]:
    """One autocommit connection with keepalives, so a vanished peer is noticed in seconds
    (docs/operations-notes.md, PostgreSQL). libpq's ``PG*`` variables and ``PGPASSFILE`` apply
    as usual; under systemd the password may also come from
    ``$CREDENTIALS_DIRECTORY/state-password``."""
    extra: dict[str, Any] = {}
    password = _credential_password()
    if password is not None and "password" not in psycopg.conninfo.conninfo_to_dict(url):
        extra["password"] = password
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT, application_name=application,
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS} -c synchronous_commit=on",
            **extra)
    except psycopg.Error as exc:
        raise StoreError(f"{mask_url(url)}: {_message(exc)}") from None
    return conn


def mask_url(url: str) -> str:
    return scrub_text(url)


def _credential_password() -> str | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    path = Path(directory) / "state-password"
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _message(exc: BaseException) -> str:
    """A one-line, credential-free description of a driver error."""
    text = str(exc).strip().splitlines()
    return scrub_text(text[0] if text else type(exc).__name__)[:300]


class PostgresStore:
    """Records by name in PostgreSQL. ``fence`` (a lease) makes every write check leadership."""

    def __init__(self, url: str, *, writer: bool = True, fence: Fence | None = None) -> None:
        self.path = mask_url(url)  # what error messages and status name
        self._url = url
        self._writer = writer
        self._fence = fence
        self._cache: dict[str, Record] | None = None
        self._cache_epoch: int | None = None
        self._db = connect(url)
        try:
            with self._translated():
                self._prepare()
        except BaseException:  # refused (too new, needs an upgrade): no connection left open
            self._db.close()
            raise

    # --- opening ------------------------------------------------------------------------

    def _prepare(self) -> None:
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            self._db.execute(f"SET LOCAL search_path TO {SCHEMA}")
            self._db.execute(_LEASE_TABLE)
            row = self._db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > SCHEMA_VERSION:
                raise StoreTooNew(
                    f"{self.path}: written by a newer reconciler (schema {version}, this one "
                    f"knows {SCHEMA_VERSION}); upgrade reconciler")
            if version < SCHEMA_VERSION and not self._writer:
                raise StoreError(f"{self.path}: needs a schema upgrade; run the daemon once")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                self._db.execute(_MIGRATIONS[step])
            if row is None:
                self._db.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            elif version < SCHEMA_VERSION:
                self._db.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION,))
            if self._writer:
                self._db.execute(_VIEWS_TABLE)
        self._db.execute(f"SET search_path TO {SCHEMA}")

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StoreError(f"{self.path}: {_message(exc)}") from None

    def _reconnect_if_broken(self) -> None:
        if self._db.broken or self._db.closed:
            with contextlib.suppress(psycopg.Error):
                self._db.close()
            self._db = connect(self._url)
            self._db.execute(f"SET search_path TO {SCHEMA}")

    def close(self) -> None:
        self._db.close()
        # As the SQLite store releases its FileLease: a clean stop hands over at once (the
        # lease wiring handed it is the store's: released, and its connection closed).
        close = getattr(self._fence, "close", None)
        if callable(close):
            close()

    @property
    def fence(self) -> Fence | None:
        """The lease this store's writes are fenced by (the daemon campaigns with it)."""
        return self._fence

    @property
    def location(self) -> str:
        """The URL with its password masked."""
        return self.path

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- reading ------------------------------------------------------------------------

    def records(self) -> list[Record]:
        epoch = self._fence.epoch if self._fence is not None else None
        if self._cache is not None and epoch is not None and epoch == self._cache_epoch:
            return list(self._cache.values())
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY name")
        records = [_record(row) for row in rows]
        # Only a leader is the only writer; its cache lives as long as its epoch.
        if self._writer and epoch is not None:
            self._cache, self._cache_epoch = {r.name: r for r in records}, epoch
        else:
            self._cache = None
        return records

    def check(self) -> str:
        self._query("SELECT 1")
        return "ok"

    def policies(self) -> list[StoredPolicy]:
        rows = self._query("SELECT name, body, body_hash, path FROM approval_policies "
                           "ORDER BY name")
        return [StoredPolicy(**row) for row in rows]

    def approvals(self, state: str | None = None) -> list[Approval]:
        columns = ", ".join(f.name for f in fields(Approval))
        sql = f"SELECT {columns} FROM approvals" + (" WHERE state = %s" if state else "")
        rows = self._query(sql + " ORDER BY received_at", (state,) if state else ())
        return [Approval(**row) for row in rows]

    def approval(self, job_id: str) -> Approval | None:
        columns = ", ".join(f.name for f in fields(Approval))
        rows = self._query(f"SELECT {columns} FROM approvals WHERE job_id = %s", (job_id,))
        return Approval(**rows[0]) if rows else None

    def view(self, spec_hash: str) -> dict[str, str] | None:
        """The printable view of a spec this store submitted, when it kept one."""
        try:
            rows = self._query("SELECT view FROM spec_views WHERE spec_hash = %s", (spec_hash,))
        except StoreError:  # a reader of a store no writer has opened since spec_views came
            return None
        return dict(json.loads(rows[0]["view"])) if rows else None

    def approval_count(self) -> int:
        return int(self._query("SELECT count(*) AS n FROM approvals")[0]["n"])

    def recent_cancels(self, since: float) -> int:
        """How many removals were cancelled at or after ``since`` (wall-clock seconds)."""
        return int(self._query("SELECT count(*) AS n FROM cancels WHERE at >= %s",
                               (since,))[0]["n"])

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        with self._translated():
            self._reconnect_if_broken()
            with self._db.cursor(row_factory=dict_row) as cur:
                return list(cur.execute(sql, params).fetchall())

    # --- writing ------------------------------------------------------------------------

    def save_policies(self, policies: Sequence[StoredPolicy]) -> None:
        now = time.time()
        with self._transaction() as (cur, epoch):
            cur.executemany(
                "INSERT INTO approval_policies VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, "
                "body_hash = EXCLUDED.body_hash, path = EXCLUDED.path, "
                "updated_at = EXCLUDED.updated_at, epoch = EXCLUDED.epoch",
                [(p.name, p.body, p.body_hash, p.path, now, epoch) for p in policies])

    def drop_policies(self, names: Iterable[str]) -> None:
        with self._transaction() as (cur, _):
            cur.executemany("DELETE FROM approval_policies WHERE name = %s", [(n,) for n in names])

    def save_approval(self, approval: Approval) -> None:
        columns = [f.name for f in fields(Approval)]
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in [*columns[1:], "epoch"])
        with self._transaction() as (cur, epoch):
            cur.execute(
                f"INSERT INTO approvals ({', '.join(columns)}, epoch) "
                f"VALUES ({', '.join(['%s'] * (len(columns) + 1))}) "
                f"ON CONFLICT (job_id) DO UPDATE SET {updates}",
                (*astuple(approval), epoch))

    def commit_intents(
        self, records: Sequence[Record], *, schedules: Mapping[str, ScheduleState] | None = None,
        runs: Sequence[Run] = (), keep_runs: Mapping[str, int] | None = None,
    ) -> None:
        """Intents and outcomes alike commit synchronously here: one round trip either way.
        ``schedules``, ``runs`` and ``keep_runs`` as in store/sqlite.py, same transaction."""
        self._write(records, schedules or {}, runs, keep_runs or {})

    def schedules(self) -> dict[str, ScheduleState]:
        rows = self._query("SELECT name, cron, timezone, since, last_slot FROM schedules")
        return {row["name"]: _schedule_state(row) for row in rows}

    def runs(self, name: str | None = None) -> list[Run]:
        sql = "SELECT name, slot, uid, job_id, outcome FROM runs"
        sql += " WHERE name = %s" if name is not None else ""
        rows = self._query(sql + " ORDER BY name, slot DESC", (name,) if name is not None else ())
        return [Run(**row) for row in rows]

    def drop_schedules(self, names: Iterable[str]) -> None:
        gone = list(names)
        if not gone:
            return
        with self._transaction() as (cur, _):
            cur.execute("DELETE FROM schedules WHERE name = ANY(%s)", (gone,))
            cur.execute("DELETE FROM runs WHERE name = ANY(%s)", (gone,))

    def save(self, records: Sequence[Record]) -> None:
        self._write(records)

    def save_views(self, views: Mapping[str, Mapping[str, str]]) -> None:
        """Keep the views of these specs, and only those any record still names."""
        if not views:
            return
        with self._transaction() as (cur, _):
            cur.executemany(
                "INSERT INTO spec_views VALUES (%s, %s) "
                "ON CONFLICT (spec_hash) DO UPDATE SET view = EXCLUDED.view",
                [(h, json.dumps(dict(v))) for h, v in views.items()])
            cur.execute("DELETE FROM spec_views WHERE spec_hash NOT IN "
                        "(SELECT spec_hash FROM jobs)")

    def prune_approvals(self, *, before: float, keep: int) -> int:
        """As on SQLite: requests decided, or pending but received, before ``before``; then
        the oldest decided ones beyond ``keep`` rows. Returns rows deleted."""
        with self._transaction() as (cur, _):
            gone = cur.execute(
                "DELETE FROM approvals WHERE (state = 'pending' AND received_at < %s) "
                "OR (state != 'pending' AND coalesce(decided_at, received_at) < %s)",
                (before, before)).rowcount
            row = cur.execute("SELECT count(*) FROM approvals").fetchone()
            excess = int(row[0] if row else 0) - keep
            if excess > 0:
                gone += cur.execute(
                    "DELETE FROM approvals WHERE job_id IN (SELECT job_id FROM approvals "
                    "WHERE state != 'pending' ORDER BY decided_at LIMIT %s)", (excess,)).rowcount
        return int(gone)

    def clear_cancels(self) -> None:
        """Start the mass-cancel window afresh (an operator allowed a mass cancel)."""
        with self._transaction() as (cur, _):
            cur.execute("DELETE FROM cancels")

    def forget(self, names: Iterable[str], *, cancelled_at: float | None = None) -> None:
        """Drop records; ``cancelled_at``: their jobs were just cancelled because their
        manifests were removed, which the mass-cancel guard counts (same transaction)."""
        gone = list(names)
        if not gone:
            return
        with self._transaction() as (cur, _):
            cur.execute("DELETE FROM jobs WHERE name = ANY(%s)", (gone,))
            if cancelled_at is not None:
                cur.executemany("INSERT INTO cancels VALUES (%s, %s)",
                                [(n, cancelled_at) for n in gone])
                cur.execute("DELETE FROM cancels WHERE at < %s",
                            (cancelled_at - CANCEL_HISTORY,))
        if self._cache is not None:
            for name in gone:
                self._cache.pop(name, None)

    def _write(self, records: Sequence[Record],
               schedules: Mapping[str, ScheduleState] | None = None, runs: Sequence[Run] = (),
               keep_runs: Mapping[str, int] | None = None) -> None:
        if not records and not schedules and not runs:
            return
        now = time.time()
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in [*_COLUMNS[1:], "epoch"])
        sql = (f"INSERT INTO jobs ({', '.join(_COLUMNS)}, epoch) "
               f"VALUES ({', '.join(['%s'] * (len(_COLUMNS) + 1))}) "
               f"ON CONFLICT (name) DO UPDATE SET {updates}")
        if len(records) == 1 and not schedules and not runs and self._fence is not None:
            self._write_one(records[0], now, updates)
        else:
            with self._transaction() as (cur, epoch):
                rows = [(*_values(r, now), epoch) for r in records]
                for run in runs:  # before the jobs rows: see store/sqlite.py
                    cur.execute(_CLOSE_RUN.replace("?", "%s"), (run.name, run.name))
                    cur.execute(
                        "INSERT INTO runs VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT "
                        "(name, slot) DO UPDATE SET uid = EXCLUDED.uid, job_id = "
                        "EXCLUDED.job_id, outcome = EXCLUDED.outcome, epoch = EXCLUDED.epoch",
                        (run.name, run.slot, run.uid, run.job_id, run.outcome, epoch))
                for name, keep in (keep_runs or {}).items():
                    cur.execute(_PRUNE_RUNS, (name, name, keep + 1))
                if schedules:
                    cur.executemany(
                        "INSERT INTO schedules VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT "
                        "(name) DO UPDATE SET cron = EXCLUDED.cron, timezone = "
                        "EXCLUDED.timezone, since = EXCLUDED.since, last_slot = "
                        "EXCLUDED.last_slot, epoch = EXCLUDED.epoch",
                        [(*_schedule_row(n, st), epoch) for n, st in schedules.items()])
                if rows:
                    cur.executemany(sql, rows)
        if self._cache is not None:
            for record in records:
                self._cache[record.name] = _stamped(record, now)

    def _write_one(self, record: Record, now: float, updates: str) -> None:
        """One record (an outcome, saved per request): the fence check and the upsert in one
        statement, its own transaction, so one round trip instead of four (BEGIN, check,
        write, COMMIT): the cold sync ratio on PostgreSQL (docs/performance.md)."""
        if not self._writer:
            raise StoreError(f"{self.path}: opened read-only")
        assert self._fence is not None
        epoch = self._fence.epoch
        if epoch is None:
            raise NotLeader(f"{self.path}: not the leader; nothing written")
        values = (*_values(record, now), epoch)
        # FOR SHARE as in _transaction: a takeover waits for this statement's commit.
        sql = (f"WITH fence AS (SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = %s "
               f"AND expires_at > clock_timestamp() FOR SHARE) "
               f"INSERT INTO jobs ({', '.join(_COLUMNS)}, epoch) "
               f"SELECT {', '.join(['%s'] * (len(_COLUMNS) + 1))} FROM fence "
               f"ON CONFLICT (name) DO UPDATE SET {updates}")
        with self._translated():
            self._reconnect_if_broken()
            written = self._db.execute(sql, (epoch, *values)).rowcount
        if written != 1:
            self._cache = None
            raise NotLeader(f"{self.path}: lease epoch {epoch} is no longer ours; nothing written")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[tuple[psycopg.Cursor[Any], int]]:
        """A write transaction, fenced by the lease when there is one."""
        if not self._writer:
            raise StoreError(f"{self.path}: opened read-only")
        epoch = 0
        if self._fence is not None:
            held = self._fence.epoch
            if held is None:
                raise NotLeader(f"{self.path}: not the leader; nothing written")
            epoch = held
        with self._translated():
            self._reconnect_if_broken()
            with self._db.transaction(), self._db.cursor() as cur:
                if self._fence is not None:
                    # FOR SHARE: a takeover (an UPDATE of this row) waits for this commit, and
                    # this transaction sees the row as the takeover left it, never a stale copy.
                    row = cur.execute(
                        "SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = %s "
                        "AND expires_at > clock_timestamp() FOR SHARE", (epoch,)).fetchone()
                    if row is None:
                        self._cache = None
                        raise NotLeader(
                            f"{self.path}: lease epoch {epoch} is no longer ours; nothing written")
                yield cur, epoch


def _record(row: dict[str, Any]) -> Record:
    values = {column: row[column] for column in _COLUMNS}
    values["phase"] = Phase(values["phase"])
    return Record(**values)
