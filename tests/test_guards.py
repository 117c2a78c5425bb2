"""The guards of issue 11 item 6: files still being written, the mass-cancel window, the
removal grace, private store files, key folders, and a store that fills its disk."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from reconciler.app.wiring import open_store
from reconciler.backends.legacy import WireJob
from reconciler.backends.legacy_jobs import LegacyBackend
from reconciler.backends.signing import KeyFileError, check_key_permissions, load_signer
from reconciler.domain.desired import Desired, collect
from reconciler.domain.plan import Action, PlanPolicy, plan
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.service.daemon import Daemon
from reconciler.settings import load_settings
from reconciler.sources.folder import FolderSource
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess
from tests.daemon_proc import Daemons, daemon_args
from tests.harness import envelope

OLD = int(time.time()) - 3600 + 0.25  # an mtime long settled
COARSE = int(time.time()) - 3600  # the same, from a file system that keeps whole seconds


def actions(decisions: Sequence[Any]) -> dict[str, Action]:
    return {d.name: d.action for d in decisions}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeRequester:
    """Cancels and submits in memory: enough for the executor."""

    client_id = "test"

    def __init__(self) -> None:
        self.cancelled: list[str] = []
        self.submitted = 0

    async def submit(self, spec: Mapping[str, Any]) -> str:
        self.submitted += 1
        return f"job-{self.submitted}"

    async def cancel(self, job_id: str, reason: str) -> str:
        self.cancelled.append(job_id)
        return "Cancelled"

    async def list_jobs(self, *, include_tags: Sequence[str] = (),
                        job_id: str | None = None) -> list[WireJob]:
        return []

    async def state(self, job_id: str) -> str:
        return "Running"


def spec_hash_of(root: Path, name: str) -> str:
    return collect(FolderSource(root).read()).manifests[name].spec_hash


# --- a file still being written --------------------------------------------------------------


def test_a_file_written_moments_ago_waits_whatever_triggered_the_pass(
    tmp_path: Path, rsa_key: Path
) -> None:
    """The daemon's pass plans from the folder, not from watcher events: a manifest rewritten
    in place (no event until it is closed; none at all under --watch poll until the next
    scan) is waited for while its mtime is younger than ``debounce``."""
    root = tmp_path / "m"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    old_hash = spec_hash_of(root, "a")
    settings = load_settings(None, manifests=root, debounce=0.5)
    with Store(tmp_path / "s.db") as store:
        store.commit_intents([Record("a", Phase.ACTIVE, old_hash, "a.yaml", job_id="j")])
        daemon = Daemon(settings, load_signer(rsa_key), store)
        reconciler = daemon._reconciler
        clock = Clock()
        assert isinstance(daemon._source, FolderSource)
        daemon._source._monotonic = clock
        # The first half of a rewrite is already a valid manifest, with another image.
        (root / "a.yaml").write_text(envelope("a", image="alpine"))
        (root / "b.yaml").write_text(envelope("b"))
        _, first = reconciler.plan()
        assert actions(first.decisions) == {"a": Action.WAIT, "b": Action.WAIT}
        assert "settle" in first.decisions[0].reason
        assert reconciler.source_settling  # the daemon looks again after `debounce`
        for name in ("a.yaml", "b.yaml"):
            os.utime(root / name, (OLD, OLD))
        _, later = reconciler.plan()
        assert actions(later.decisions) == {"a": Action.REPLACE, "b": Action.SUBMIT}
        assert not reconciler.source_settling


def test_a_stat_that_keeps_changing_settles_by_the_readers_clock(tmp_path: Path) -> None:
    """An mtime that cannot tell (whole seconds, or skewed into the future): a stat that
    changed since the last read still waits for ``settle`` seconds."""
    (tmp_path / "a.yaml").write_text(envelope("a"))
    os.utime(tmp_path / "a.yaml", (COARSE, COARSE))
    clock = Clock()
    source = FolderSource(tmp_path, settle=0.2, monotonic=clock)
    assert source.read().settling == frozenset()  # the first read: nothing changed yet
    (tmp_path / "a.yaml").write_text(envelope("a", image="alpine"))
    os.utime(tmp_path / "a.yaml", (COARSE, COARSE))
    assert source.read().settling == {"a.yaml"}
    clock.now += 0.1
    assert source.read().settling == {"a.yaml"}
    clock.now += 0.15
    assert source.read().settling == frozenset()
    future = time.time() + 3600  # skew: not "young" for an hour, only until it stops changing
    os.utime(tmp_path / "a.yaml", (future, future))
    assert source.read().settling == {"a.yaml"}
    clock.now += 0.25
    assert source.read().settling == frozenset()
    (tmp_path / "a.yaml").write_text(envelope("a", image="busybox"))
    os.utime(tmp_path / "a.yaml", (OLD, OLD))  # a precise, old mtime: written long ago
    assert source.read().settling == frozenset()
    assert FolderSource(tmp_path).read().settling == frozenset()  # one-shot commands: no settle


# --- the mass-cancel window ------------------------------------------------------------------


def test_the_planner_counts_recent_cancels() -> None:
    """One removal of 10 live jobs is fine alone; after 10 cancels within the window it is the
    11th of 20: blocked, as 11 removals at once would be."""
    record = Record("j09", Phase.ACTIVE, "h" * 64, "j09.yaml", job_id="id9")
    others = [Record(f"j{i:02d}", Phase.ACTIVE, "h" * 64, f"j{i:02d}.yaml", job_id=f"id{i}")
              for i in range(9)]
    # j09.yaml is gone; the other nine are held (any non-cancel will do for the count)
    desired = Desired(True, held={r.name: "x" for r in others}, file_count=9)
    recorded = [*others, record]
    alone = plan(desired, recorded, PlanPolicy(), 0.0)
    assert actions(alone.decisions)["j09"] is Action.CANCEL
    blocked = plan(desired, recorded, PlanPolicy(), 0.0, recent_cancels=10)
    assert actions(blocked.decisions)["j09"] is Action.BLOCKED
    assert blocked.blocked and "already cancelled in the last 10 min" in blocked.guards[0].reason
    allowed = plan(desired, recorded, PlanPolicy(allow_mass_cancel=True), 0.0, recent_cancels=10)
    assert actions(allowed.decisions)["j09"] is Action.CANCEL


def test_deleting_one_at_a_time_meets_the_mass_cancel_guard_across_a_restart(
    tmp_path: Path,
) -> None:
    """12 of 20 manifests deleted one at a time, 0.5 s apart, a pass after each: the guard
    counts the cancels of the last 10 minutes (kept in the store), so the 11th is blocked as
    it would have been at once; a restart forgets nothing; the window slides; and
    `apply --allow-mass-cancel` lets them through and starts the window afresh."""
    root = tmp_path / "m"
    root.mkdir()
    for i in range(20):
        (root / f"j{i:02d}.yaml").write_text(envelope(f"j{i:02d}"))
    clock = Clock()
    requester = FakeRequester()
    policy = PlanPolicy()

    def run(store: Store, the_policy: PlanPolicy = policy) -> Any:
        reconciler = Reconciler(FolderSource(root), store, the_policy, clock=clock)
        executor = Executor(store, LegacyBackend(requester), the_policy, clock=clock)
        return asyncio.run(reconciler.run_pass(executor))

    with Store(tmp_path / "s.db") as store:
        run(store)
        assert len(store.records()) == 20
        blocked_at = None
        for i in range(12):
            (root / f"j{i:02d}.yaml").unlink()
            clock.now += 0.5
            result = run(store)
            if result.plan.blocked and blocked_at is None:
                blocked_at = i
        assert blocked_at == 10  # cancels 1-10 are at most half of the 20: the 11th is not
        assert len(requester.cancelled) == 10
    clock.now += 60
    with Store(tmp_path / "s.db") as store:  # a restart
        assert run(store).plan.blocked
        assert len(requester.cancelled) == 10
        clock.now += 600  # the window has slid past them: 2 of 10 live is no mass cancel
        assert not run(store).plan.blocked
        assert len(requester.cancelled) == 12
    for i in range(12, 18):  # 6 of the 8 left at once: blocked
        (root / f"j{i:02d}.yaml").unlink()
    with Store(tmp_path / "s.db") as store:
        assert run(store).plan.blocked
        allowed = run(store, PlanPolicy(allow_mass_cancel=True))
        assert allowed.report.counts["cancel.ok"] == 6
        assert store.recent_cancels(0) == 0  # the operator's allowance starts the window over


# --- the removal grace -----------------------------------------------------------------------


def test_a_manifest_missing_for_less_than_the_removal_grace_keeps_its_job(
    tmp_path: Path, rsa_key: Path
) -> None:
    """A slow editor save (the file gone for 0.5 s) must not cancel: the daemon's default
    grace is a setting of its own, not the 0.15 s debounce."""
    root = tmp_path / "m"
    root.mkdir()
    (root / "keep.yaml").write_text(envelope("keep"))
    settings = load_settings(None, manifests=root)
    assert settings.removal_grace >= 1.0
    with Store(tmp_path / "s.db") as store:
        store.commit_intents([Record("a", Phase.ACTIVE, "h" * 64, "a.yaml", job_id="j")])
        daemon = Daemon(settings, load_signer(rsa_key), store)
        clock = Clock()
        daemon._reconciler._monotonic = clock
        os.utime(root / "keep.yaml", (OLD, OLD))
        for _ in range(6):  # passes every 0.1 s (other files settling) while a.yaml is gone
            _, the_plan = daemon._reconciler.plan()
            assert actions(the_plan.decisions)["a"] is Action.WAIT
            clock.now += 0.1
        clock.now += settings.removal_grace
        _, the_plan = daemon._reconciler.plan()
        assert actions(the_plan.decisions)["a"] is Action.CANCEL
    grace = load_settings(None, manifests=root, removal_grace=7.5)
    with Store(tmp_path / "s2.db") as store:
        assert Daemon(grace, load_signer(rsa_key), store)._reconciler.removal_grace == 7.5


# --- private store files, key folders --------------------------------------------------------


def test_store_files_are_private_in_an_existing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir(mode=0o755)
    old_umask = os.umask(0o022)
    try:
        with open_store(folder / "state.db") as store:  # the lease takes the lock file
            store.commit_intents([Record("a", Phase.ACTIVE, "h" * 64, "a.yaml")])
            names = sorted(p.name for p in folder.iterdir())
            assert names == ["state.db", "state.db-shm", "state.db-wal", "state.db.lock"]
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o600}, modes
        # A store an older version left readable by others is tightened on open.
        for path in folder.iterdir():
            path.chmod(0o644)
        with open_store(folder / "state.db") as store:
            assert store.records()
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert set(modes.values()) == {0o600}, modes
    finally:
        os.umask(old_umask)


def _key_in(folder: Path, source: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    key = folder / "key.pem"
    shutil.copyfile(source, key)
    key.chmod(0o600)
    return key


def test_a_key_someone_else_could_replace_is_refused(tmp_path: Path, rsa_key: Path) -> None:
    """As ssh's StrictModes: a folder writable by others (without the sticky bit), or a key
    or folder owned by another user (not root, not us), is refused with a clear error."""
    tmp_path.chmod(0o700)
    me = os.geteuid()
    fine = _key_in(tmp_path / "fine", rsa_key)
    check_key_permissions(fine)
    load_signer(fine)

    open_folder = tmp_path / "open"
    key = _key_in(open_folder, rsa_key)
    open_folder.chmod(0o777)
    with pytest.raises(KeyFileError, match=r"folder .*open is writable by others \(mode 0777\)"):
        load_signer(key)
    open_folder.chmod(0o775)  # group-writable too
    with pytest.raises(KeyFileError, match="writable by others"):
        check_key_permissions(key)
    open_folder.chmod(0o1777)  # sticky, like /tmp: others cannot rename our file
    check_key_permissions(key)

    above = tmp_path / "above"
    key = _key_in(above / "below", rsa_key)
    above.chmod(0o757)  # a folder higher up counts too
    with pytest.raises(KeyFileError, match=r"folder .*above is writable"):
        check_key_permissions(key)
    above.chmod(0o755)

    link = tmp_path / "fine" / "link.pem"  # a link: the folders of its target count as well
    link.symlink_to(key)
    (above / "below").chmod(0o777)
    with pytest.raises(KeyFileError, match="below is writable"):
        check_key_permissions(link)
    (above / "below").chmod(0o755)

    if me != 0:  # our key, checked as another user, is someone else's key
        with pytest.raises(KeyFileError, match=f"owned by another user \\(uid {me}\\)"):
            check_key_permissions(fine, uid=me + 4242)
    else:  # root can give files away: the real case
        foreign = _key_in(tmp_path / "foreign", rsa_key)
        os.chown(foreign, 4242, -1)
        with pytest.raises(KeyFileError, match="owned by another user"):
            load_signer(foreign)
        os.chown(foreign, 0, -1)
        os.chown(foreign.parent, 4242, -1)
        with pytest.raises(KeyFileError, match=r"folder .*foreign is owned by another user"):
            load_signer(foreign)


# --- a full disk -----------------------------------------------------------------------------

_DISK_FULL = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from reconciler.domain.records import Phase, Record
    from reconciler.store.sqlite import Store, StoreError

    volume = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(volume)], check=True)
    filler = volume / "filler"
    filler.write_bytes(b"x" * 128 * 1024)  # what another program fills, then frees
    store = Store(volume / "state.db")

    def rewrite(round_):  # outcomes: the same 20 records written again and again
        store.save([Record(f"job-{i:02d}", Phase.ACTIVE, "h" * 64, "p" * 300, job_id=str(round_))
                    for i in range(20)])

    round_ = 0
    while True:  # until the WAL fills the volume
        try:
            rewrite(round_)
        except StoreError as exc:
            assert "full" in str(exc), exc
            break
        round_ += 1
        assert round_ < 100_000
    filler.unlink()  # space is back
    failures = 0
    for later in range(1, 2001):
        try:
            rewrite(round_ + later)
        except StoreError:
            failures += 1
    wal = (volume / "state.db-wal").stat().st_size
    print(f"rounds_to_full={round_} failures_after_space_back={failures} wal_bytes={wal}")
    assert {r.job_id for r in store.records()} == {str(round_ + 2000)} or failures
    sys.exit(1 if failures else 0)
""")


def test_the_store_recovers_once_space_is_back_on_a_real_full_volume(tmp_path: Path) -> None:
    """A 1 MiB tmpfs (in a private mount namespace): the WAL fills it before SQLite's automatic
    checkpoint is due (1000 pages), so without a checkpoint every write fails forever, even
    after the other program's 128 KiB are freed."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    volume = tmp_path / "volume"
    volume.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cannot create a mount namespace here")
    result = subprocess.run(["unshare", "-rm", sys.executable, "-c", _DISK_FULL, str(volume)],
                            capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failures_after_space_back=0" in result.stdout


# --- the same, against a real daemon and dev requester -----------------------------------------


def _annotated(dev: DevProcess, name: str) -> list[dict[str, Any]]:
    return dev.jobs(include_tags=[f"reconciler-manifest:{name}"])


def test_a_half_written_file_is_never_submitted_by_a_pass_run_for_another_reason(
    tmp_path: Path, dev: DevProcess, rsa_key: Path
) -> None:
    """A live manifest rewritten in place, its first half already a valid manifest (another
    image): a SIGUSR1 pass under ``--watch poll`` runs while it is half written (no event
    has come: an in-place write sends none until it is closed, and polling comes later).
    The pass waits for it; the job is replaced once, by the whole file."""
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    daemons = Daemons()
    try:
        daemon = daemons.start(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key,
                                           "--watch", "poll"),
                               {"RECONCILER_DEBOUNCE": "1.0"})  # room for a loaded machine
        daemon.wait_for(daemon.quiet, what="a quiet pass")
        whole = envelope("a", image="alpine", env=("STAGE=full",))
        half = whole[:whole.index("    environmentVariables:")]
        assert collect(FolderSource(root).read()).manifests  # (the half alone is valid)
        passes = len(daemon.named("pass.completed"))
        with (root / "a.yaml").open("w") as out:
            out.write(half)
            out.flush()
            daemon.signal(signal.SIGUSR1)
            daemon.wait_for(lambda: len(daemon.named("pass.completed")) > passes,
                            what="the SIGUSR1 pass")
            during = daemon.named("pass.completed")[passes]
            out.write(whole[len(half):])
        assert during["waiting"] >= 1 and during["changes"] == 0, during
        daemon.wait_for(lambda: len(_annotated(dev, "a")) == 2, what="the replace")
        daemon.wait_for(daemon.quiet, what="a quiet pass")
    finally:
        daemons.stop_all()
    jobs = _annotated(dev, "a")
    assert sorted(j["State"]["State"] for j in jobs) == ["Cancelled", "New"]
    [live] = [j for j in jobs if j["State"]["State"] == "New"]
    assert live["Job"]["Spec"]["Docker"]["EnvironmentVariables"] == ["STAGE=full"]
    assert len(daemon.named("job.submitted")) == 2  # the first job, and the whole file


@pytest.mark.slow
def test_a_slow_deletion_meets_the_mass_cancel_guard_in_the_daemon(
    tmp_path: Path, dev: DevProcess, rsa_key: Path
) -> None:
    """The issue's scenario: 12 of 20 manifests deleted one at a time, 0.5 s apart, under a
    running daemon. Cancels 1-10 are at most half of the 20 live jobs; the 11th and 12th are
    blocked, and stay blocked across a restart."""
    root = tmp_path / "manifests"
    root.mkdir()
    for i in range(20):
        (root / f"j{i:02d}.yaml").write_text(envelope(f"j{i:02d}"))
    args = daemon_args(root, tmp_path / "state.db", dev.url, rsa_key)
    env = {"RECONCILER_REMOVAL_GRACE": "0.3"}
    daemons = Daemons()
    try:
        daemon = daemons.start(args, env)
        daemon.wait_for(lambda: len(daemon.named("job.submitted")) == 20, what="20 submits")
        for i in range(12):
            (root / f"j{i:02d}.yaml").unlink()
            time.sleep(0.5)
        daemon.wait_event("prune.blocked", timeout=30)
        time.sleep(1.0)
        assert len(daemon.named("job.cancelled")) == 10
        daemon.stop()
        again = daemons.start(args, env)
        again.wait_event("prune.blocked")
        assert not again.named("job.cancelled")
    finally:
        daemons.stop_all()
    states = [j["State"]["State"] for j in dev.jobs()]
    assert (states.count("Cancelled"), states.count("New")) == (10, 10)


def test_a_problem_reported_once_is_not_repeated_after_its_file_settles_again(
    tmp_path: Path,
) -> None:
    """Settling is common now (every young file): a broken file already reported, then seen
    settling for a pass (a late watcher event), must not be reported a second time."""
    from structlog.testing import capture_logs

    (tmp_path / "bad.yaml").write_text(envelope("bad").replace("engine: docker", "engine: 7"))
    os.utime(tmp_path / "bad.yaml", (OLD, OLD))
    with Store(tmp_path / "s.db") as store:
        reconciler = Reconciler(FolderSource(tmp_path), store, PlanPolicy())
        with capture_logs() as logs:
            asyncio.run(reconciler.run_pass(None))
            asyncio.run(reconciler.run_pass(None, frozenset({"bad.yaml"})))
            asyncio.run(reconciler.run_pass(None))
    assert [e["event"] for e in logs].count("manifest.invalid") == 1
