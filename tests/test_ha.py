"""High availability on PostgreSQL (issue 15): the fenced backend, the renewal timer, the
wiring of a ``postgresql://`` state, and real daemons sharing one database with the dev
requester: only the leader acts; a kill -9 or a SIGSTOP of the leader hands over within
lease + 5 s with no duplicate and no lost job; a stopped-then-resumed leader sends nothing.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from reconciler.app import wiring
from reconciler.domain.manifest import Manifest
from reconciler.engine.fenced import FencedBackend, NotLeading
from reconciler.ports import JobInfo, JobPhase
from reconciler.service.timers import Renewal
from reconciler.settings import Settings
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess
from tests.pgserver import PgServer, running_server, unavailable_reason
from tests.reliability.common import audit, figures, manifest, seeded, size

_REASON = unavailable_reason()


class _Recording:
    """A Backend that records what reached it."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    @property
    def identity(self) -> str:
        return "me"

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        self.sent.append(uid)
        return JobInfo("j-1", JobPhase.RUNNING)

    async def find(self, uids: object) -> dict[str, list[JobInfo]]:
        self.sent.append("find")
        return {}

    async def find_by_name(self, names: object) -> dict[str, list[JobInfo]]:
        return {}

    async def stop(self, job_id: str, reason: str) -> str:
        self.sent.append(f"stop {job_id}")
        return "Cancelled"

    async def status(self, job_id: str) -> JobInfo | None:
        return None

    async def owner_of(self, job_id: str) -> str | None:
        return None


def test_a_fenced_backend_sends_nothing_once_the_lease_is_not_ours() -> None:
    inner = _Recording()
    leading = [True]
    fenced = FencedBackend(inner, lambda: leading[0])
    asyncio.run(fenced.stop("j-1", "r"))
    leading[0] = False
    with pytest.raises(NotLeading):
        asyncio.run(fenced.stop("j-2", "r"))
    with pytest.raises(NotLeading):
        asyncio.run(fenced.find(["u"]))
    assert inner.sent == ["stop j-1"] and fenced.refused == 2


def test_renewal_counts_from_the_start_of_the_previous_campaign() -> None:
    now = [100.0]
    renewal = Renewal(5.0, clock=lambda: now[0])
    assert renewal.delay() == 0.0  # the first campaign at once
    renewal.started()
    now[0] += 1.5  # the round trip took 1.5 s
    assert renewal.delay() == pytest.approx(3.5)
    now[0] += 10  # a campaign that overran: the next one at once
    assert renewal.delay() == 0.0


def test_a_postgres_state_is_a_url_and_local_files_do_not_derive_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "sd"))
    url = "postgresql://rec:pw@db.example:5432/reconciler"
    settings = Settings(state=url, lease="2s")
    assert settings.state == url and settings.lease == 2.0  # the // kept, the duration read
    assert wiring.is_postgres(settings)
    assert wiring.work_dir(settings) == tmp_path / "sd"
    assert wiring.work_dir(settings.model_copy(update={"work_dir": tmp_path / "w"})) == \
        tmp_path / "w"
    sqlite = Settings(state=str(tmp_path / "s" / "state.db"))
    assert not wiring.is_postgres(sqlite) and wiring.work_dir(sqlite) == tmp_path / "s"


# --- real daemons on one database ----------------------------------------------------------


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    if _REASON is not None:
        pytest.skip(f"PostgreSQL: {_REASON}")
    with running_server() as server:
        yield server


LEASE = 2.0


def _ha_daemon(root: Path, url: str, dev: DevProcess, key: Path, instance: str,
               tmp: Path, **env: str) -> DaemonProcess:
    return DaemonProcess(
        ["--manifests", str(root), "--state", url, "--endpoint", dev.url, "--key", str(key)],
        env={"RECONCILER_LEASE": str(LEASE), "RECONCILER_INSTANCE": instance,
             "RECONCILER_WORK_DIR": str(tmp / instance), "RECONCILER_RESYNC_INTERVAL": "3",
             "RECONCILER_POLL_INTERVAL": "1", **env})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _acted(daemon: DaemonProcess) -> int:
    return len(daemon.named("job.submitted")) + len(daemon.named("job.cancelled"))


def _leader(daemons: list[DaemonProcess], timeout: float = 15.0) -> DaemonProcess:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for d in daemons:
            acquired, lost = d.named("leader.acquired"), d.named("leader.lost")
            if len(acquired) > len(lost) and d.process.poll() is None:
                return d
        time.sleep(0.05)
    raise AssertionError("no leader emerged")


def _wait_all_live(dev: DevProcess, wanted: dict[str, str], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if audit(dev.jobs(), wanted).clean:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"not converged: {audit(dev.jobs(), wanted).problems[:10]}")


def test_three_daemons_one_acts_and_a_kill9_hands_over(
        pg: PgServer, tmp_path: Path, dev_factory: Callable[..., DevProcess],
        rsa_key: Path) -> None:
    rng = seeded("ha-kill9")
    count, trials = size(60, 200), size(3, 20)
    dev = dev_factory("--latency", "0.004", "--job-duration", "3600")
    url = pg.create_database(f"ha_{uuid.uuid4().hex[:10]}")
    root = tmp_path / "manifests"
    root.mkdir()
    wanted: dict[str, str] = {}
    for i in range(count):
        wanted[f"m-{i:04d}"] = f"img:{i}"
        (root / f"m-{i:04d}.yaml").write_text(manifest(f"m-{i:04d}", wanted[f"m-{i:04d}"]))
    daemons = [_ha_daemon(root, url, dev, rsa_key, f"host-{n}", tmp_path) for n in range(3)]
    handovers: list[float] = []
    try:
        for trial in range(trials):
            leader = _leader(daemons)
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere in the cold sync (or after it)
            killed_at = time.monotonic()
            leader.signal(signal.SIGKILL)
            leader.wait()
            standbys = [d for d in daemons if d is not leader]
            before = {id(d): len(d.named("leader.acquired")) for d in standbys}
            # a new manifest, so the next leader has something to do
            name = f"new-{trial}"
            wanted[name] = f"img:new-{trial}"
            (root / f"{name}.yaml").write_text(manifest(name, wanted[name]))
            deadline = killed_at + LEASE + 5
            while not any(len(d.named("leader.acquired")) > before[id(d)] for d in standbys):
                assert time.monotonic() < deadline, "no standby took over within lease + 5 s"
                time.sleep(0.05)
            handovers.append(round(time.monotonic() - killed_at, 2))
            daemons = [*standbys, _ha_daemon(root, url, dev, rsa_key, f"host-r{trial}",
                                             tmp_path)]
        recovery = _wait_all_live(dev, wanted, 120)
        # Between kills only one daemon ever acted: every daemon that acted led at the time.
        for d in daemons:
            if _acted(d):
                assert d.named("leader.acquired"), "a daemon that never led acted"
        result = audit(dev.jobs(), wanted)
        figures("ha_kill9", manifests=len(wanted), trials=trials, handover_s=max(handovers),
                duplicates=result.duplicates, lost=result.lost, recovery_s=round(recovery, 2))
        assert result.clean, result.problems[:10]
    finally:
        for d in daemons:
            d.stop()


def test_a_stopped_leader_sends_nothing_when_it_resumes(
        pg: PgServer, tmp_path: Path, dev_factory: Callable[..., DevProcess],
        rsa_key: Path) -> None:
    dev = dev_factory("--job-duration", "3600")
    url = pg.create_database(f"ha_{uuid.uuid4().hex[:10]}")
    root = tmp_path / "manifests"
    root.mkdir()
    wanted = {f"m-{i}": f"img:{i}" for i in range(10)}
    for name, image in wanted.items():
        (root / f"{name}.yaml").write_text(manifest(name, image))
    # a password in the URL (the test server trusts loopback): it must never be shown
    secret = url.replace("postgres@", "postgres:s3cret-pw@")
    a = _ha_daemon(root, secret, dev, rsa_key, "a", tmp_path)
    b = _ha_daemon(root, secret, dev, rsa_key, "b", tmp_path)
    try:
        old = _leader([a, b])
        other = b if old is a else a
        _wait_all_live(dev, wanted, 60)
        # Its events trail its requests: stop it only once they are all out (a quiet pass
        # after the last submit), or a request sent before the stop would count as after.
        old.wait_quiet_after("job.submitted")
        old.signal(signal.SIGSTOP)
        other.wait_event("leader.acquired", timeout=LEASE + 5)
        for i in range(10, 15):  # work the new leader does while the old one is stopped
            wanted[f"m-{i}"] = f"img:{i}"
            (root / f"m-{i}.yaml").write_text(manifest(f"m-{i}", f"img:{i}"))
        time.sleep(2 * LEASE)
        acted = _acted(old)
        old.signal(signal.SIGCONT)
        old.wait_event("leader.lost", timeout=LEASE + 5)
        _wait_all_live(dev, wanted, 60)
        time.sleep(LEASE)
        assert _acted(old) == acted, "the old leader acted after it lost the lease"
        assert audit(dev.jobs(), wanted).clean
        assert not any("s3cret-pw" in line for line in a.raw + b.raw)
        assert any("[redacted]" in str(e.get("state")) for e in a.named("daemon.started"))
        figures("ha_sigstop", stopped_s=2 * LEASE, old_leader_requests_after=_acted(old) - acted)
    finally:
        a.signal(signal.SIGCONT)
        a.stop()
        b.stop()


def test_cut_connections_and_a_database_outage_stop_all_action(
        pg: PgServer, tmp_path: Path, dev_factory: Callable[..., DevProcess],
        rsa_key: Path) -> None:
    dev = dev_factory("--job-duration", "3600")
    database = f"ha_{uuid.uuid4().hex[:10]}"
    url = pg.create_database(database)
    root = tmp_path / "manifests"
    root.mkdir()
    wanted = {f"m-{i}": f"img:{i}" for i in range(10)}
    for name, image in wanted.items():
        (root / f"{name}.yaml").write_text(manifest(name, image))
    ports = {"a": _free_port(), "b": _free_port()}
    daemons = [_ha_daemon(root, url, dev, rsa_key, n, tmp_path,
                          RECONCILER_METRICS_LISTEN=f"127.0.0.1:{ports[n]}") for n in ("a", "b")]
    try:
        leader = _leader(daemons)
        _wait_all_live(dev, wanted, 60)
        # both ready (a healthy standby too); the metric says who leads
        for daemon, name in zip(daemons, ("a", "b"), strict=True):
            base = f"http://127.0.0.1:{ports[name]}"
            # A standby may still be starting while the leader converged: poll only once its
            # listener is up, or the probe meets a refused connection instead of a "no".
            daemon.wait_event("metrics.listening")
            def ready(url: str = base) -> bool:
                return httpx.get(url + "/readyz").status_code == 200

            daemon.wait_for(ready, what=f"{name} ready")
            metrics = httpx.get(base + "/metrics").text
            found = re.search(r"^reconciler_leader (\S+)$", metrics, re.MULTILINE)
            assert found is not None and float(found[1]) == (1.0 if daemon is leader else 0.0)
        # pg_terminate_backend of every connection: the leader's renewal fails, it stops acting
        pg.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               f"WHERE datname = '{database}' AND pid <> pg_backend_pid()")
        leader.wait_event("leader.lost", timeout=LEASE + 5)
        _leader(daemons)  # someone leads again
        # the database down: nobody acts while it is, everything recovers after
        down = size(6, 30)
        pg.stop("immediate")
        stopped = time.monotonic()
        acted = [_acted(d) for d in daemons]
        for i in range(10, 13):
            wanted[f"m-{i}"] = f"img:{i}"
            (root / f"m-{i}.yaml").write_text(manifest(f"m-{i}", f"img:{i}"))
        time.sleep(down)
        assert [_acted(d) for d in daemons] == acted, "a daemon acted with the database down"
        pg.start()
        recovery = _wait_all_live(dev, wanted, 60)
        result = audit(dev.jobs(), wanted)
        figures("ha_db_down", down_s=round(time.monotonic() - stopped - recovery, 1),
                recovery_s=round(recovery, 2), duplicates=result.duplicates, lost=result.lost)
        assert result.clean, result.problems[:10]
    finally:
        for d in daemons:
            d.stop()


def test_apply_and_status_on_a_postgres_state(
        pg: PgServer, tmp_path: Path, dev: DevProcess, rsa_key: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from reconciler.app.cli import main
    from reconciler.store.pglease import PostgresLease

    url = pg.create_database(f"ha_{uuid.uuid4().hex[:10]}")
    secret_url = url.replace("postgres@", "postgres:s3cret-pw@")  # trust auth ignores it
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(manifest("a", "img:a"))
    monkeypatch.setenv("RECONCILER_WORK_DIR", str(tmp_path / "work"))
    common = ["--state", secret_url, "--manifests", str(root)]
    other = PostgresLease(url, "elsewhere", duration=30.0)
    try:
        assert other.campaign()
        refused = CliRunner().invoke(main, ["apply", *common, "--endpoint", dev.url,
                                            "--key", str(rsa_key)])
        assert refused.exit_code != 0 and "another reconciler leads (elsewhere)" in \
            refused.output, refused.output
        assert dev.jobs() == []  # nothing sent
        other.release()
        done = CliRunner().invoke(main, ["apply", *common, "--endpoint", dev.url,
                                         "--key", str(rsa_key)])
        assert done.exit_code == 0, done.output
        assert len(dev.jobs()) == 1
        status = CliRunner().invoke(main, ["status", *common])
        assert status.exit_code == 0, status.output
        assert "leader: " in status.output and "a " in status.output
        assert "s3cret-pw" not in refused.output + done.output + status.output
    finally:
        other.close()


class _FakeLease:
    """Campaigning that leads until told otherwise."""

    instance = "fake"
    interval = 1.0

    def __init__(self) -> None:
        self._epoch: int | None = 7

    @property
    def epoch(self) -> int | None:
        return self._epoch

    def campaign(self) -> bool:
        return self._epoch is not None

    def step_down(self) -> None:
        self._epoch = None


class _RetiringExecutor:
    """What of the executor a lost lease reaches: it is retired."""

    def retire(self) -> None:
        pass


def test_not_leader_in_a_pass_means_standby_not_a_failure(tmp_path: Path,
                                                          rsa_key: Path) -> None:
    from structlog.testing import capture_logs

    from reconciler.app.wiring import open_store
    from reconciler.backends.signing import load_signer
    from reconciler.service.daemon import Daemon
    from reconciler.settings import load_settings
    from reconciler.store.errors import NotLeader

    settings = load_settings(None, manifests=tmp_path)
    lease = _FakeLease()
    with open_store(tmp_path / "s.db") as store:
        daemon = Daemon(settings, load_signer(rsa_key), store, leader=lease)
        daemon._leading = True
        daemon._executor = _RetiringExecutor()  # type: ignore[assignment]
        daemon._watcher = None
        assert daemon.may_act()

        async def fenced_out(*args: object) -> object:
            raise NotLeader("state: lease epoch 7 is no longer ours; nothing written")

        daemon._reconciler.run_pass = fenced_out  # type: ignore[method-assign,assignment]
        with capture_logs() as logs:
            assert asyncio.run(daemon._guarded_pass()) is False
        assert not daemon.may_act() and lease.epoch is None
        names = [e["event"] for e in logs]
        assert "leader.lost" in names and "pass.failed" not in names


def test_a_standby_probe_decides_nothing(tmp_path: Path) -> None:
    from reconciler.service.probe import ProbeService
    from reconciler.store.sqlite import Store
    from tests.test_hostile_input import no_client_id, probe, probe_body

    acting = [False]
    with Store(tmp_path / "state.db") as store:
        service = ProbeService(store, no_client_id, acting=lambda: acting[0])
        refused = probe(service, probe_body())
        assert refused.status == 503 and b"standby" in refused.body
        assert store.approvals() == []  # nothing recorded, nothing decided
        acting[0] = True
        assert probe(service, probe_body()).status == 200
        assert len(store.approvals()) == 1


def test_the_fence_keeps_the_backends_capabilities() -> None:
    """The executor decides by a backend's optional capabilities (an update in place, a
    manifest refused before anything is cancelled); the lease's wrapper must not hide them
    (found in review after the merge of issues 14 and 15)."""
    from reconciler.ports import Refusing, UpdatesInPlace

    class Capable:
        updates_in_place = True

        def refusal(self, manifest: Manifest) -> str | None:
            return f"{manifest.path}: job: needs the orchestrator API"

    fenced = FencedBackend(cast(Any, Capable()), lambda: False)
    assert isinstance(fenced, UpdatesInPlace) and fenced.updates_in_place
    assert isinstance(fenced, Refusing)
    some = Manifest("a", b"{}", "h" * 64, "a.yaml")
    assert fenced.refusal(some) == "a.yaml: job: needs the orchestrator API"
    plain = FencedBackend(cast(Any, object()), lambda: True)
    assert not plain.updates_in_place and plain.refusal(some) is None


def test_a_pass_begun_under_a_lost_lease_carries_nothing_on_once_it_leads_again(
        tmp_path: Path, rsa_key: Path) -> None:
    """A leader's pass outlives its lease (a renewal failed while a request hung): another
    daemon may take over, act (resolve this one's intents, replace or remove jobs) and go,
    and this daemon lead again, all before the pass ends. That pass, planned under the old
    lease, must then send nothing more and write nothing more: with the lease back, the
    fenced backend and the fenced store would let it through, and its waiting outcomes
    (outcomes saved in batches) or its stale plan would overwrite what the other leader
    recorded, or send a manifest the other already submitted again. Its intents stay for
    the fresh executor of the new lease to resolve by uid (docs/design.md, "High
    availability")."""
    from structlog.testing import capture_logs

    from reconciler.app.wiring import open_store
    from reconciler.backends.signing import load_signer
    from reconciler.domain.records import Phase
    from reconciler.service.daemon import Daemon
    from reconciler.settings import load_settings
    from tests.fakes import FakeRequester
    from tests.harness import envelope

    root = tmp_path / "m"
    root.mkdir()
    for i in range(6):
        path = root / f"job-{i}.yaml"
        path.write_text(envelope(f"job-{i}"))
        os.utime(path, (time.time() - 60, time.time() - 60))  # settled
    settings = load_settings(None, manifests=root, concurrency=1)
    lease = _FakeLease()
    requester = FakeRequester()
    submit = requester.submit

    async def scenario() -> None:
        release, hanging = asyncio.Event(), asyncio.Event()

        async def second_hangs(spec: object) -> str:
            if requester.submitted == 1:  # the first answered (its outcome waits)
                hanging.set()
                await release.wait()
            return await submit(spec)  # type: ignore[arg-type]

        requester.submit = second_hangs  # type: ignore[method-assign]
        daemon._backend = FencedBackend(requester.backend(), daemon.may_act)
        daemon._executor = daemon._new_executor()
        daemon._wake = asyncio.Event()
        pass_ = asyncio.create_task(daemon._guarded_pass())
        await asyncio.wait_for(hanging.wait(), 10)
        daemon._lost("renewal failed")
        lease._epoch = 9  # another leader came and went; this one leads again
        daemon._acquired(lease)
        release.set()
        assert await asyncio.wait_for(pass_, 10) is False

    with open_store(tmp_path / "s.db") as store:
        daemon = Daemon(settings, load_signer(rsa_key), store, leader=lease)
        daemon._leading = True
        daemon._watcher = None
        with capture_logs() as logs:
            asyncio.run(scenario())
        assert requester.submitted == 2, "the old pass went on submitting under the new lease"
        assert {r.phase for r in store.records()} == {Phase.SUBMITTING}  # nothing stale
        assert daemon.may_act(), "the pass of the lost lease stepped the new one down"
        assert [e["event"] for e in logs].count("leader.lost") == 1
