"""A fresh PostgreSQL state for the benchmarks' ``--state postgresql://…`` option: a new
database on that server per run, and a store fenced by a lease this process takes first, as
a leading daemon's is (every write checks the epoch in its transaction)."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from reconciler.store.pglease import PostgresLease
from reconciler.store.postgres import PostgresStore


def fresh_store(server_url: str) -> PostgresStore:
    """A leading, fenced store on a new database of the server ``server_url`` names."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = server_url.rsplit("/", 1)[0] + "/" + name
    lease = PostgresLease(url, "bench", duration=600.0)
    assert lease.campaign(), "the fresh database's lease is free"
    return PostgresStore(url, fence=lease)


def start_server() -> Any:
    """A throwaway local server (tests/pgserver.py), for ``--state postgresql``."""
    from tests.pgserver import running_server

    return running_server()
