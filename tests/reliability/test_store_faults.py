"""Scenario 4: the state store fails. Disk full, read-only, corrupted, locked by another
process, two daemons on one store: no remote side effect without a durable intent, a clear
error, the daemon degrades (or refuses to start) with an event, nothing half-written after."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.app.wiring import open_store
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import audit, figures, manifest, size
from tests.test_daemon import wait_until


def start(tmp: Path, dev: DevProcess, key: Path, state: Path, names: list[str],
          env: dict[str, str] | None = None) -> tuple[DaemonProcess, Path]:
    root = tmp / "manifests"
    root.mkdir(exist_ok=True)
    for name in names:
        (root / f"{name}.yaml").write_text(manifest(name, f"img:{name}"))
    return DaemonProcess(daemon_args(root, state, dev.url, key), env), root


def test_second_daemon_on_one_store_refuses(tmp_path: Path, dev: DevProcess,
                                            rsa_key: Path) -> None:
    state = tmp_path / "state.db"
    first, _ = start(tmp_path, dev, rsa_key, state, ["a"])
    try:
        first.wait_event("pass.completed")
        second = DaemonProcess(daemon_args(tmp_path / "manifests", state, dev.url, rsa_key))
        assert second.wait(timeout=20) == 1
        assert "in use by another reconciler process" in "".join(second.raw)
    finally:
        first.stop()
    assert len(dev.jobs()) == 1


def test_corrupted_store_is_a_clear_startup_error(tmp_path: Path, dev: DevProcess,
                                                  rsa_key: Path) -> None:
    state = tmp_path / "state.db"
    state.write_bytes(b"this is not a database" * 100)
    daemon, _ = start(tmp_path, dev, rsa_key, state, ["a", "b"])
    assert daemon.wait(timeout=20) == 1
    text = "".join(daemon.raw)
    assert "file is not a database" in text and str(state) in text
    assert dev.jobs() == []  # nothing sent without a store to record it in


def _hold_lock(path: str, seconds: float) -> None:
    """Hold the store's write lock for ``seconds``, or (0) until standard input closes, so a
    test decides when it ends whatever the machine's load."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("held", flush=True)
    if seconds > 0:
        time.sleep(seconds)
    else:
        sys.stdin.read()
    db.execute("ROLLBACK")


def test_store_locked_by_another_process(tmp_path: Path, dev: DevProcess,
                                         rsa_key: Path) -> None:
    state = tmp_path / "state.db"
    open_store(state).close()
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, tests.reliability.test_store_faults as t; "
                               "t._hold_lock(sys.argv[1], 0)", str(state)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    names = [f"l-{i}" for i in range(10)]
    daemon, _ = start(tmp_path, dev, rsa_key, state, names)
    try:
        failed = daemon.wait_event("pass.failed", timeout=30)
        assert "locked" in failed[0]["error"]
        assert dev.jobs() == []  # no intent could be written, so nothing was sent
        assert holder.stdin is not None
        holder.stdin.close()  # the lock is released now, not at a time load could overtake
        holder.wait(30)
        wait_until(lambda: len(dev.jobs()) == 10, timeout=30)
    finally:
        daemon.stop()
        holder.kill()
        holder.wait()
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()
    result = audit(dev.jobs(), {n: f"img:{n}" for n in names})
    figures("store-locked", failed_passes=len(daemon.named("pass.failed")),
            duplicates=result.duplicates, lost=result.lost)
    assert result.clean


def test_store_locked_mid_apply_never_duplicates(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    """Issue 11, item 1: the store is locked (longer than SQLite's 5 s busy timeout) while a
    pass has submits in flight at 1 s latency. The pass fails; no later pass may start before
    those requests end, nor send a uid twice; the requester must end with one live job per
    name."""
    count = size(40, 100)  # 4 at a time: submits take 10 s (25 s full)
    dev = dev_factory("--latency", "1.0", "--job-duration", "3600")
    state = tmp_path / "state.db"
    open_store(state).close()
    names = [f"m-{i:03d}" for i in range(count)]
    daemon, _ = start(tmp_path, dev, rsa_key, state, names, {"RECONCILER_CONCURRENCY": "4"})
    holder = None
    try:
        daemon.wait_event("daemon.started")
        wait_until(lambda: dev.stats().get("/requester/submit", 0) >= 1, timeout=30)
        # Held until the pass failed, not for a fixed time: outcomes are saved a batch at a
        # time (every 0.25 s at most), so the first write inside a fixed window could come
        # late enough into it to outlast it within SQLite's busy timeout and succeed.
        holder = subprocess.Popen([sys.executable, "-c",
                                   "import sys, tests.reliability.test_store_faults as t; "
                                   "t._hold_lock(sys.argv[1], 0)", str(state)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        daemon.wait_event("pass.failed", timeout=60)
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(30)
        wait_until(lambda: len(dev.jobs()) >= count and daemon.quiet(), timeout=120)
        started = time.monotonic()
        wait_until(lambda: time.monotonic() - started > 2.0)  # a late arrival would land now
    finally:
        daemon.stop()
        if holder is not None:
            holder.kill()
            holder.wait()
            for pipe in (holder.stdin, holder.stdout):
                if pipe is not None:
                    pipe.close()
    jobs = dev.jobs()
    result = audit(jobs, {n: f"img:{n}" for n in names})
    figures("store-locked-mid-apply", manifests=count, latency_s=1.0,
            failed_passes=len(daemon.named("pass.failed")), jobs=len(jobs),
            adopted=len(daemon.named("job.adopted")),
            duplicates_cancelled=len(daemon.named("job.duplicate_cancelled")),
            duplicates=result.duplicates, lost=result.lost)
    assert not [line for line in daemon.raw if "never retrieved" in line]
    assert result.clean, result.problems[:20]


def test_lost_store_adopts_instead_of_resubmitting(tmp_path: Path, dev: DevProcess,
                                                   rsa_key: Path) -> None:
    """Issue 11, item 3: the database (and its WAL) removed while the daemon is stopped: the
    restarted daemon adopts every live job by its name annotation; nothing is submitted
    again."""
    state = tmp_path / "state.db"
    names = [f"s-{i:02d}" for i in range(size(30, 100))]
    daemon, root = start(tmp_path, dev, rsa_key, state, names)
    try:
        daemon.wait_for(daemon.quiet, 60, "the first sync")
    finally:
        daemon.stop()
    before = len(dev.jobs())
    for path in tmp_path.glob("state.db*"):
        path.unlink()
    second = DaemonProcess(daemon_args(root, state, dev.url, rsa_key))
    try:
        second.wait_for(second.quiet, 60, "convergence after the loss")
    finally:
        second.stop()
    result = audit(dev.jobs(), {n: f"img:{n}" for n in names})
    figures("store-lost", manifests=len(names), jobs_before=before,
            submitted_after=len(dev.jobs()) - before, adopted=len(second.named("job.adopted")))
    assert len(dev.jobs()) == before == len(names)
    assert len(second.named("job.adopted")) == len(names)
    assert result.clean, result.problems[:20]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root): " + done.stderr.decode().strip())
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    # Unbuffered: a buffered file's close flushes what the full disk refused, and raises.
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


def test_disk_full_mid_run(tmp_path: Path, dev: DevProcess, rsa_key: Path,
                           small_disk: Path) -> None:
    state = small_disk / "state.db"
    daemon, root = start(tmp_path, dev, rsa_key, state, ["first"])
    try:
        wait_until(lambda: len(dev.jobs()) == 1)
        filler = _fill(small_disk)
        names = [f"w-{i}" for i in range(20)]
        for name in names:
            (root / f"{name}.yaml").write_text(manifest(name, f"img:{name}"))
        failed = daemon.wait_event("pass.failed", timeout=30)
        assert "full" in failed[0]["error"]
        time.sleep(1.0)
        sent_while_full = len(dev.jobs()) - 1
        assert sent_while_full == 0, "a submit went out without a durable intent"
        assert daemon.process.poll() is None  # degraded, not dead
        filler.unlink()
        wait_until(lambda: len(dev.jobs()) == 21, timeout=30)
    finally:
        daemon.stop()
    with open_store(state) as store:
        assert store.check() == "ok"
        assert len(store.records()) == 21
    result = audit(dev.jobs(), {n: f"img:{n}" for n in ["first", *names]})
    figures("store-disk-full", sent_while_full=sent_while_full, duplicates=result.duplicates,
            lost=result.lost, integrity="ok")
    assert result.clean, result.problems


def test_read_only_state_directory(tmp_path: Path, dev: DevProcess, rsa_key: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    open_store(state_dir / "state.db").close()
    view = tmp_path / "ro"
    view.mkdir()
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(state_dir), str(view)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        daemon, _ = start(tmp_path, dev, rsa_key, view / "state.db", ["a", "b"])
        assert daemon.wait(timeout=20) == 1
        text = "".join(daemon.raw)
        assert "Read-only file system" in text and str(view) in text
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
    assert dev.jobs() == []
    figures("store-read-only", exit_code=1, sent=0)


def test_store_files_never_world_readable(tmp_path: Path) -> None:
    state = tmp_path / "sub" / "state.db"
    open_store(state).close()
    assert os.stat(state.parent).st_mode & 0o077 == 0
