"""Leadership among daemons sharing one PostgreSQL database: a lease row with an epoch.

One row (``reconciler.leader_lease``) says who leads, under which epoch (a fencing token that
only grows), and until when by the *server's* clock. A standby takes the lease only once it has
expired there, raising the epoch; a leader renews it every ``duration / 3`` seconds.

Why this is safe (docs/design.md, "High availability"):

* A leader believes in its lease only until ``t0 + duration - margin`` on its own clock, where
  ``t0`` is read *before* the renewing statement is sent. The server stamps the expiry after it
  receives that statement, so the server's expiry is later than the leader's belief by at least
  ``margin``, less any drift between the two clocks' rates. A standby can only take over once
  the server's expiry has passed, when the old leader has already stopped believing.
* The leader's clock is ``CLOCK_BOOTTIME``: it keeps counting while the process is stopped
  (``SIGSTOP``) or the machine is suspended, so a leader that wakes up after a long pause sees
  its lease as gone before it sends anything.
* Belief is not enough to write: every write to the store checks the epoch and expiry inside
  its own transaction (``store/postgres.py``), so an intent is recorded only under a live lease,
  and nothing is ever sent without an intent.

A clean stop releases the lease (expiry set to the past), so a standby takes over at its next
campaign instead of waiting for the lease to run out.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from reconciler.store.errors import StoreError
from reconciler.store.postgres import SCHEMA, PostgresStore, connect, mask_url


def boottime() -> float:
    """Seconds on a clock that does not stop while the process or the machine sleeps."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class LeaseInfo:
    """The lease row as the database holds it."""

    holder: str
    epoch: int
    acquired_at: datetime | None
    expires_at: datetime | None


class PostgresLease:
    """Campaign for, renew and release the lease. ``epoch`` is ours only while it is valid."""

    def __init__(
        self,
        url: str,
        instance: str | None = None,
        duration: float = 15.0,
        *,
        clock: Callable[[], float] = boottime,
    ) -> None:
        if duration < 1.0:
            raise ValueError("lease must be at least 1 s")
        self.instance = instance or socket.gethostname()
        self.duration = duration
        #: Believe in the lease this much less than the server grants it.
        self.margin = max(0.5, duration * 0.2)
        self._url = url
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._epoch: int | None = None
        self._valid_until = 0.0
        #: Last error met while campaigning (masked), for status and events.
        self.last_error: str | None = None

    @property
    def interval(self) -> float:
        """How often to campaign: a leader renews three times per lease."""
        return self.duration / 3

    @property
    def epoch(self) -> int | None:
        """Our epoch while our lease is valid on our own clock, else None."""
        if self._epoch is not None and self._clock() < self._valid_until:
            return self._epoch
        return None

    @property
    def leading(self) -> bool:
        return self.epoch is not None

    def campaign(self) -> bool:
        """Renew the lease if we hold it, else take it if it has expired. True if we lead."""
        started = self._clock()
        try:
            row = self._renew() if self._epoch is not None else self._acquire()
        except (psycopg.Error, OSError, StoreError) as exc:
            self.last_error = mask_url(str(exc).strip().splitlines()[0] if str(exc) else
                                       type(exc).__name__)[:300]
            self._drop_connection()
            # A leader that cannot reach the database steps down at once rather than acting on
            # a belief it cannot renew; whoever leads next resolves what it left in doubt.
            self._epoch = None
            return False
        self.last_error = None
        if row is None:
            self._epoch = None
            return False
        self._epoch = int(row[0])
        self._valid_until = started + self.duration - self.margin
        return True

    def step_down(self) -> None:
        """Stop believing at once: a fenced write found the lease is no longer ours."""
        self._epoch = None

    def release(self) -> None:
        """Give the lease up now (a clean stop): a standby need not wait for it to expire."""
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        with contextlib.suppress(psycopg.Error, OSError, StoreError):
            self._connection().execute(
                "UPDATE leader_lease SET expires_at = '-infinity' "
                "WHERE id = 1 AND epoch = %s AND holder = %s", (epoch, self.instance))

    def info(self) -> LeaseInfo | None:
        """Who leads, by the database (None when it cannot be read)."""
        try:
            row = self._connection().execute(
                "SELECT holder, epoch, acquired_at, expires_at FROM leader_lease WHERE id = 1"
            ).fetchone()
        except (psycopg.Error, OSError, StoreError):
            self._drop_connection()
            return None
        return LeaseInfo(*row) if row else None

    def close(self) -> None:
        self.release()
        self._drop_connection()

    # --- statements -----------------------------------------------------------------------

    def _acquire(self) -> tuple[Any, ...] | None:
        return self._connection().execute(
            "UPDATE leader_lease SET holder = %s, epoch = epoch + 1, "
            "acquired_at = clock_timestamp(), renewed_at = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => %s) "
            "WHERE id = 1 AND expires_at <= clock_timestamp() RETURNING epoch",
            (self.instance, self.duration)).fetchone()

    def _renew(self) -> tuple[Any, ...] | None:
        return self._connection().execute(
            "UPDATE leader_lease SET renewed_at = clock_timestamp(), "
            "expires_at = clock_timestamp() + make_interval(secs => %s) "
            "WHERE id = 1 AND epoch = %s AND holder = %s AND expires_at > clock_timestamp() "
            "RETURNING epoch",
            (self.duration, self._epoch, self.instance)).fetchone()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.broken or self._conn.closed:
            self._drop_connection()
            # Creates the schema and the lease row on a fresh database.
            PostgresStore(self._url, writer=True).close()
            self._conn = connect(self._url, application="reconciler-lease")
            self._conn.execute(f"SET search_path TO {SCHEMA}")
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                self._conn.close()
            self._conn = None
