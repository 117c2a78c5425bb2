"""Leadership is its own seam: the lease is taken by the wiring, not by opening the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.app.wiring import open_store
from reconciler.domain.records import Phase, Record
from reconciler.store.errors import StoreLocked
from reconciler.store.lease import FileLease
from reconciler.store.sqlite import Store


def _record(name: str) -> Record:
    return Record(name, Phase.ACTIVE, "h" * 64, f"{name}.yaml", job_id=f"j-{name}")


def test_opening_a_store_takes_no_lock(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Store(path) as one, Store(path) as two:  # SQLite serializes the writers
        one.save([_record("a")])
        assert [r.name for r in two.records()] == ["a"]
    assert not (tmp_path / "s.db.lock").exists()


def test_a_lease_is_exclusive_until_released(tmp_path: Path) -> None:
    first, second = FileLease(tmp_path / "s.db"), FileLease(tmp_path / "s.db")
    first.acquire()
    assert first.held
    with pytest.raises(StoreLocked, match="in use by another reconciler"):
        second.acquire()
    assert not second.held
    first.release()
    second.acquire()
    assert second.held
    second.release()


def test_only_the_leader_caches_and_it_stops_when_the_lease_goes(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with open_store(path) as leader:
        leader.save([_record("a")])
        assert [r.name for r in leader.records()] == ["a"]  # now cached
        with Store(path) as other:  # a writer beside the leader (e.g. the CLI)
            other.save([_record("b")])
        assert [r.name for r in leader.records()] == ["a"]  # the leader trusts its copy
        leader._leadership.release()  # type: ignore[union-attr]
        assert [r.name for r in leader.records()] == ["a", "b"]  # no lease, no cache
    lease = FileLease(path)
    lease.acquire()  # closing the store released its lease
    lease.release()
