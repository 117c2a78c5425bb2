"""The daemon as a real process: reaction, editor saves, breakage, bursts, symlink swaps,
signals and shutdown, sd_notify, metrics and the event stream."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, Daemons, daemon_args
from tests.harness import envelope


@pytest.fixture
def started(tmp_path: Path, rsa_key: Path) -> Iterator[Callable[..., DaemonProcess]]:
    daemons = Daemons()

    def start(dev: DevProcess, *extra: str, root: Path | None = None,
              env: dict[str, str] | None = None) -> DaemonProcess:
        manifests = root or tmp_path / "manifests"
        manifests.mkdir(exist_ok=True)
        return daemons.start(daemon_args(manifests, tmp_path / "state.db", dev.url, rsa_key,
                                         *extra), env)

    yield start
    daemons.stop_all()


def by_name(dev: DevProcess) -> dict[str, list[str]]:
    jobs: dict[str, list[str]] = {}
    for job in dev.jobs():
        for tag in job["Job"]["Spec"]["Annotations"]:
            if tag.startswith("reconciler-manifest:"):
                jobs.setdefault(tag.split(":", 1)[1], []).append(job["State"]["State"])
    return {name: sorted(states) for name, states in jobs.items()}


def wait_until(check: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_drop_edit_save_break_delete(tmp_path: Path, dev: DevProcess,
                                     started: Callable[..., DaemonProcess]) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    write_atomic(root / "keep.yaml", envelope("keep"))
    daemon = started(dev)
    (root / "a.yaml").write_text(envelope("a"))
    dropped = time.monotonic()
    wait_until(lambda: by_name(dev).get("a") == ["New"], timeout=1.0)
    assert time.monotonic() - dropped < 1.0

    write_atomic(root / "a.yaml", envelope("a", image="alpine"))  # an editor's atomic save
    wait_until(lambda: by_name(dev).get("a") == ["Cancelled", "New"])

    write_atomic(root / "a.yaml", envelope("a").replace("engine: docker", "engine: [x"))
    daemon.wait_event("manifest.invalid")
    daemon.wait_quiet_after("manifest.invalid")  # the pass that held it, or a later one
    assert by_name(dev)["a"] == ["Cancelled", "New"]  # held, nothing cancelled

    (root / "a.yaml").unlink()
    wait_until(lambda: by_name(dev).get("a") == ["Cancelled", "Cancelled"])
    assert by_name(dev)["keep"] == ["New"]
    submitted = [e["name"] for e in daemon.named("job.submitted")]
    assert Counter(submitted) == {"keep": 1, "a": 2}


def test_delete_then_recreate_save_cancels_nothing(
    tmp_path: Path, dev: DevProcess, started: Callable[..., DaemonProcess]
) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    daemon = started(dev)
    stop = threading.Event()

    def other_files() -> None:  # other files settle all the time, so passes keep running
        index = 0
        while not stop.is_set():
            (root / f"other-{index}.yaml").write_text(envelope(f"other-{index}"))
            index += 1
            time.sleep(0.02)

    writer = threading.Thread(target=other_files)
    writer.start()
    try:
        for _ in range(5):  # an editor that saves by unlink + create, not by rename
            (root / "a.yaml").unlink()
            time.sleep(0.12)
            (root / "a.yaml").write_text(envelope("a"))
            time.sleep(0.3)
    finally:
        stop.set()
        writer.join()
    daemon.wait_for(lambda: len(daemon.named("pass.completed")) >= 10, what="more passes")
    assert by_name(dev)["a"] == ["New"]
    assert not daemon.named("job.cancelled")


@pytest.mark.parametrize("count", [300, pytest.param(1000, marks=pytest.mark.slow)])
def test_burst_of_files(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                        started: Callable[..., DaemonProcess], count: int) -> None:
    dev = dev_factory("--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "seed.yaml").write_text(envelope("seed"))
    daemon = started(dev, env={"RECONCILER_CONCURRENCY": "16"})
    for index in range(count):
        (root / f"job-{index:04d}.yaml").write_text(envelope(f"job-{index:04d}"))
    wait_until(lambda: len(dev.jobs()) >= count + 1, timeout=120)
    daemon.wait_quiet_after("job.submitted", timeout=120)
    jobs = by_name(dev)
    assert len(jobs) == count + 1
    assert all(states == ["New"] for states in jobs.values())
    assert len(daemon.named("job.submitted")) == count + 1


@pytest.mark.parametrize("below", ["", "jobs"], ids=["link-is-folder", "folder-below-link"])
def test_symlink_swaps_never_cancel_shared_jobs(tmp_path: Path, dev: DevProcess,
                                                started: Callable[..., DaemonProcess],
                                                below: str) -> None:
    shared = {f"shared-{i}": envelope(f"shared-{i}") for i in range(17)}
    trees = [shared | {f"only-a-{i}": envelope(f"only-a-{i}") for i in range(3)},
             shared | {f"only-b-{i}": envelope(f"only-b-{i}") for i in range(3)}]
    sync = tmp_path / "sync"
    sync.mkdir()

    def publish(revision: int) -> None:
        """git-sync's way: a new worktree, a new link renamed over the old, old tree deleted."""
        tree = sync / f"rev-{revision:04d}"
        (tree / below).mkdir(parents=True)
        for name, text in trees[revision % 2].items():
            (tree / below / f"{name}.yaml").write_text(text)
        old = os.readlink(sync / "current") if (sync / "current").is_symlink() else None
        os.symlink(tree.name, sync / "current.tmp")
        os.replace(sync / "current.tmp", sync / "current")
        if old:
            shutil.rmtree(sync / old)

    publish(0)
    daemon = started(dev, root=sync / "current" / below if below else sync / "current")
    for revision in range(1, 201):
        publish(revision)
        time.sleep(0.01)
    # Generous: under load the daemon lags the publisher; only a quiet pass of the last
    # revision proves every cancel it would ever make has been made.
    daemon.wait_for(lambda: any(e.get("revision") == "rev-0200" and e.get("changes") == 0
                                and e.get("waiting") == 0
                                for e in daemon.named("pass.completed")),
                    120, "a quiet pass of rev-0200")
    jobs = by_name(dev)
    for name in shared:
        assert jobs[name] == ["New"], (name, jobs[name])
    assert all(jobs[f"only-a-{i}"][-1] == "New" for i in range(3))
    passes = daemon.named("pass.completed")
    revisions = {e.get("revision") for e in passes if e.get("state") != "not ready"}
    assert len(revisions) > 2 and all(r and r.startswith("rev-") for r in revisions)
    # On a busy machine the publisher can swap the link under every attempt of a read: that
    # pass is "not ready", has no revision and changes nothing (docs/operations-notes.md, Git
    # sources). This was the failure seen under load, not a cancel.
    assert all(e["changes"] == 0 for e in passes if e.get("state") == "not ready")


def test_sigterm_mid_sync_then_restart_has_no_duplicates(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    dev = dev_factory("--latency", "0.02", "--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    for index in range(500):
        (root / f"m-{index:03d}.yaml").write_text(envelope(f"m-{index:03d}"))
    args = daemon_args(root, tmp_path / "state.db", dev.url, rsa_key)
    env = {"RECONCILER_SHUTDOWN_DEADLINE": "3"}
    first = DaemonProcess(args, env)
    first.wait_event("job.submitted", 50, timeout=30)
    signalled = time.monotonic()
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=10) == 0  # wait: stop() would send a second signal
    first.stop()
    assert time.monotonic() - signalled < 3 + 2
    assert first.named("daemon.stopped")
    done_before = len(dev.jobs())
    assert 50 <= done_before < 500

    second = DaemonProcess(args, env)
    try:
        wait_until(lambda: len(dev.jobs()) >= 500, timeout=60)
        second.wait_for(second.quiet, 30, "a quiet pass")
    finally:
        second.stop()
    jobs = by_name(dev)
    assert len(jobs) == 500 and all(states == ["New"] for states in jobs.values())


def test_second_signal_exits_at_once_and_the_store_survives(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    dev = dev_factory("--latency", "0.5", "--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    for index in range(40):
        (root / f"m-{index}.yaml").write_text(envelope(f"m-{index}"))
    args = daemon_args(root, tmp_path / "state.db", dev.url, rsa_key)
    first = DaemonProcess(args, {"RECONCILER_SHUTDOWN_DEADLINE": "30"})
    first.wait_event("job.submitted", 1, timeout=30)
    first.signal(signal.SIGTERM)
    first.wait_event("daemon.stopping")
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=5) == 128 + signal.SIGTERM
    first.stop()
    second = DaemonProcess(args)
    try:
        wait_until(lambda: len(by_name(dev)) == 40, timeout=60)
        second.wait_for(second.quiet, 30, "a quiet pass")
    finally:
        second.stop()
    assert all(states == ["New"] for states in by_name(dev).values())


def test_sighup_reloads_the_config(tmp_path: Path, dev: DevProcess,
                                   started: Callable[..., DaemonProcess]) -> None:
    config = tmp_path / "config.toml"
    config.write_text("mass_cancel_min = 3\n")
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    daemon = started(dev, "--config", str(config))
    config.write_text("mass_cancel_min = 7\nresync_interval = 30.0\n")
    daemon.signal(signal.SIGHUP)
    [reloaded] = daemon.wait_event("config.reloaded")
    assert reloaded["changed"] == ["mass_cancel_min", "resync_interval"]
    # What the open backend was built with is not half-applied: it needs a restart
    config.write_text('mass_cancel_min = 7\nresync_interval = 30.0\nnamespace = "other"\n')
    daemon.signal(signal.SIGHUP)
    second = daemon.wait_event("config.reloaded", count=2)[1]
    assert (second["changed"], second["needs_restart"]) == ([], ["namespace"])
    config.write_text("mass_cancel_min = 'many'\n")
    daemon.signal(signal.SIGHUP)
    [failed] = daemon.wait_event("config.reload_failed")
    assert "mass_cancel_min" in failed["error"]
    assert daemon.process.poll() is None  # the old configuration stays in force


class NotifySocket:
    """A unix datagram socket bound the way systemd binds NOTIFY_SOCKET."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()

    def with_key(self, key: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if any(line.startswith(key + "=")
                                                        for line in m.split("\n"))]


@pytest.mark.parametrize("address", ["path", "@abstract"])
def test_sd_notify_protocol(tmp_path: Path, dev: DevProcess,
                            started: Callable[..., DaemonProcess], address: str) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock") if address == "path"
                          else f"@reconciler-test-{os.getpid()}-{time.monotonic_ns()}")
    address_text = str(tmp_path / "notify.sock") if address == "path" else \
        "@" + notify.sock.getsockname()[1:].decode()
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    try:
        daemon = started(dev, env={"NOTIFY_SOCKET": address_text, "WATCHDOG_USEC": "400000"})
        wait_until(lambda: notify.with_key("READY"))
        ready = notify.with_key("READY")[0][1]
        assert "STATUS=ready; 1 manifests" in ready
        time.sleep(2.0)
        pings = [t for t, _ in notify.with_key("WATCHDOG")]
        assert 6 <= len(pings) <= 14, pings  # every 0.2 s
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: notify.with_key("RELOADING"))
        reloading = notify.with_key("RELOADING")[0][1]
        assert "MONOTONIC_USEC=" in reloading
        wait_until(lambda: len(notify.with_key("READY")) >= 2)
        (root / "b.yaml").write_text(envelope("b"))
        wait_until(lambda: any("2 manifests" in m for _, m in notify.with_key("STATUS")))
        assert daemon.stop() == 0
        assert notify.with_key("STOPPING")
    finally:
        notify.close()


def test_metrics_health_and_events(tmp_path: Path, dev: DevProcess,
                                   started: Callable[..., DaemonProcess]) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    (root / "bad.yaml").write_text("apiVersion: reconciler/v1\nkind: Job\n")
    daemon = started(dev, "--metrics-listen", "127.0.0.1:0")
    [listening] = daemon.wait_event("metrics.listening")
    base = "http://" + listening["listen"]
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/readyz").status_code == 200
    text = httpx.get(base + "/metrics").text
    assert 'reconciler_actions_total{action="submit",outcome="ok"} 1' in text
    assert 'reconciler_jobs{phase="active"} 1' in text
    assert "reconciler_held_manifests 0" in text  # bad.yaml never produced a job
    assert 'reconciler_requests_total{operation="submit",status="200"} 1' in text
    assert "reconciler_pass_duration_seconds_count" in text
    assert httpx.post(base + "/sync").status_code == 202
    daemon.wait_event("pass.completed", 2)
    for event in daemon.events:
        assert {"event", "level", "timestamp"} <= set(event)
    [submitted] = daemon.named("job.submitted")
    assert {"name", "job_id", "path", "reason", "uid", "revision"} <= set(submitted)
    invalid = daemon.named("manifest.invalid")  # every problem of the file, once each
    assert {(e["path"], e["field"]) for e in invalid} == {("bad.yaml", "metadata"),
                                                          ("bad.yaml", "spec")}
    [completed] = daemon.named("pass.completed")[:1]
    assert {"state", "duration_ms", "manifests", "held", "changes", "waiting"} <= set(completed)


def test_requester_down_then_back(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                                  started: Callable[..., DaemonProcess]) -> None:
    dev = dev_factory("--job-duration", "600")
    port = dev.url.rsplit(":", 1)[1]
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    daemon = started(dev, env={"RECONCILER_BACKOFF_BASE": "0.3", "RECONCILER_POLL_INTERVAL": "0.5",
                               "RECONCILER_REQUEST_TIMEOUT": "2"})
    wait_until(lambda: by_name(dev).get("a") == ["New"])
    dev.stop()
    (root / "b.yaml").write_text(envelope("b"))
    failed = daemon.wait_event("action.failed")
    assert failed[0]["name"] == "b" and failed[0]["action"] == "submit"
    daemon.wait_for(lambda: any(e["state"] == "degraded" for e in daemon.named("pass.completed")),
                    what="a degraded pass")
    back = dev_factory("--port", port, "--job-duration", "600")  # empty: memory-only store
    wait_until(lambda: by_name(back).get("b") == ["New"], timeout=20)
    [lost] = daemon.wait_event("job.lost")
    assert lost["name"] == "a"
    daemon.wait_quiet_after("job.lost")  # a whole pass after the loss was recorded
    assert "a" not in by_name(back)  # lost, and onFailure=none: not blindly resubmitted
    assert not daemon.named("job.cancelled")
    assert daemon.process.poll() is None


def test_poll_mode_sees_changes(tmp_path: Path, dev: DevProcess,
                                started: Callable[..., DaemonProcess]) -> None:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    # No periodic resync within the test: only the polling watcher can see these changes, so
    # the timeouts can be generous (a busy machine slows polling; it does not stop it).
    started(dev, "--watch", "poll", env={"RECONCILER_RESYNC_INTERVAL": "3600"})
    (root / "b.yaml").write_text(envelope("b"))
    wait_until(lambda: by_name(dev).get("b") == ["New"])
    (root / "a.yaml").unlink()
    wait_until(lambda: by_name(dev).get("a") == ["Cancelled"])


@pytest.mark.parametrize("version", ["1.0", "1.9"])
def test_run_dev_quick_start(tmp_path: Path, version: str) -> None:
    """The README's first command, minus the install: `reconciler run --dev` in a folder with
    ./manifests reconciles it against an embedded requester, says so first, cleans up after;
    with --bacalhau-version 1.9 on the orchestrator API."""
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "hello.yaml").write_text(envelope("hello"))
    process = subprocess.Popen([sys.executable, "-m", "reconciler", "--log-format", "json",
                                "run", "--dev", "--bacalhau-version", version], cwd=tmp_path,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(json.loads(line))
        if lines[-1]["event"] == "pass.completed":
            break
    process.send_signal(signal.SIGTERM)
    assert process.wait(15) == 0
    process.stderr.close()
    assert lines[0]["event"] == "dev.started"
    assert "embedded dev requester" in lines[0]["note"]
    submitted = [e for e in lines if e["event"] == "job.submitted"]
    assert [e["name"] for e in submitted] == ["hello"]
    [started] = [e for e in lines if e["event"] == "daemon.started"]
    assert started["api_mode"] == ("name" if version == "1.9" else "legacy")
    assert not Path(lines[0]["key"]).exists()  # the throwaway key is gone


def test_polling_stays_within_its_cpu_budget(tmp_path: Path, rsa_key: Path) -> None:
    from reconciler.app.wiring import open_store
    from reconciler.backends.signing import load_signer
    from reconciler.service.daemon import Daemon
    from reconciler.settings import load_settings

    settings = load_settings(None, manifests=tmp_path, poll_interval=10.0, poll_budget=0.005)
    with open_store(tmp_path / "s.db") as store:
        daemon = Daemon(settings, load_signer(rsa_key), store)
        assert daemon._poll.delay() == 10.0  # a cheap poll keeps the interval
        daemon._poll.cost = 0.2  # a list of 10,000 jobs
        assert daemon._poll.delay() == pytest.approx(40.0)
        daemon._poll.cost, daemon._poll.failures = 0.0, 3  # requester unreachable
        assert daemon._poll.delay() == 80.0


def test_a_removal_must_outlast_the_settle_period(tmp_path: Path) -> None:
    """Deterministic form of the race CI found: the read that sees a file missing may come
    before the daemon hears of the unlink; the removal only counts once it has lasted."""
    from reconciler.app.wiring import open_store
    from reconciler.domain.plan import Action, PlanPolicy
    from reconciler.domain.records import Phase, Record
    from reconciler.engine.reconcile import Reconciler
    from reconciler.sources.folder import FolderSource

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.yaml").write_text(envelope("keep"))
    with open_store(tmp_path / "s.db") as store:
        store.commit_intents([Record("a", Phase.ACTIVE, "h" * 64, "a.yaml", job_id="j")])
        reconciler = Reconciler(FolderSource(tmp_path / "m"), store, PlanPolicy())
        reconciler.removal_grace = 0.2
        _, first = reconciler.plan()
        assert {d.name: d.action for d in first.decisions}["a"] is Action.WAIT
        assert reconciler.next_removal_check() is not None
        time.sleep(0.25)
        _, later = reconciler.plan()
        assert {d.name: d.action for d in later.decisions}["a"] is Action.CANCEL
        reconciler.removal_grace = 0.0  # one-shot commands: one read is all they have
        _, once = Reconciler(FolderSource(tmp_path / "m"), store, PlanPolicy()).plan()
        assert {d.name: d.action for d in once.decisions}["a"] is Action.CANCEL


def test_a_file_removed_while_stopped_is_cancelled_after_its_grace(
    tmp_path: Path, dev: DevProcess, started: Callable[..., DaemonProcess]
) -> None:
    """After a restart the first pass defers the cancel of a file removed meanwhile (it says
    so: ``waiting``), then cancels it once the settle period has passed, unprompted."""
    root = tmp_path / "manifests"
    root.mkdir()
    for name in ("keep", "gone"):
        (root / f"{name}.yaml").write_text(envelope(name))
    first = started(dev)
    first.wait_for(first.quiet, what="a quiet pass")
    first.stop()
    (root / "gone.yaml").unlink()
    second = started(dev, env={"RECONCILER_REMOVAL_GRACE": "0.5"})
    second.wait_for(second.quiet, what="a quiet pass")
    passes = second.named("pass.completed")
    assert (passes[0]["changes"], passes[0]["waiting"]) == (0, 1)
    cancelled = second.named("job.cancelled")
    assert [e["name"] for e in cancelled] == ["gone"]
    assert cancelled[0]["timestamp"] >= passes[0]["timestamp"]
    assert by_name(dev) == {"keep": ["New"], "gone": ["Cancelled"]}


# --- every Bacalhau profile (issue 14) ------------------------------------------------------


def states_by_name(dev: DevProcess) -> dict[str, list[str]]:
    """Like by_name, for jobs of any API: states in legacy terms, New, Queued and InProgress
    all ``live`` (an orchestrator job is Pending, then Running once read)."""
    from tests.reliability.common import as_legacy

    jobs: dict[str, list[str]] = {}
    for job in map(as_legacy, dev.jobs()):
        state = job["State"]["State"]
        for tag in job["Job"]["Spec"]["Annotations"]:
            if tag.startswith("reconciler-manifest:"):
                jobs.setdefault(tag.split(":", 1)[1], []).append(
                    "live" if state in ("New", "Queued", "InProgress") else state)
    return {name: sorted(states) for name, states in jobs.items()}


@pytest.mark.parametrize("profile", ["1.0", "1.6", "1.9"])
def test_add_change_remove_on_every_profile(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
    started: Callable[..., DaemonProcess], profile: str,
) -> None:
    dev = dev_factory("--job-duration", "600", "--bacalhau-version", profile)
    root = tmp_path / "manifests"
    root.mkdir()
    write_atomic(root / "keep.yaml", envelope("keep"))
    daemon = started(dev, "--metrics-listen", "127.0.0.1:0")
    [event] = daemon.wait_event("daemon.started")
    expected = {"1.0": ("legacy", "legacy"), "1.6": ("orchestrator", "label"),
                "1.9": ("orchestrator", "name")}[profile]
    assert (event["api"], event["api_mode"]) == expected
    [listening] = daemon.wait_event("metrics.listening")
    metrics = httpx.get("http://" + listening["listen"] + "/metrics").text
    assert f'reconciler_api_info{{api="{expected[0]}",mode="{expected[1]}"' in metrics
    live = "live"
    (root / "a.yaml").write_text(envelope("a"))
    wait_until(lambda: states_by_name(dev).get("a") == [live])
    write_atomic(root / "a.yaml", envelope("a", image="alpine"))
    # By name (1.9) the job is updated in place: still one job.
    after_change = [live] if profile == "1.9" else ["Cancelled", live]
    daemon.wait_event("job.submitted", 3)
    wait_until(lambda: states_by_name(dev).get("a") == after_change)
    (root / "a.yaml").unlink()
    wait_until(lambda: live not in states_by_name(dev).get("a", [live]))
    assert states_by_name(dev)["keep"] == [live]
    submitted = Counter(e["name"] for e in daemon.named("job.submitted"))
    assert submitted == {"keep": 1, "a": 2}  # 0 duplicates, 0 lost


def test_a_server_upgrade_is_followed_at_the_next_resync(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
    started: Callable[..., DaemonProcess],
) -> None:
    dev = dev_factory("--job-duration", "600")  # 1.0: legacy
    port = dev.url.rsplit(":", 1)[1]
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("a"))
    daemon = started(dev, env={"RECONCILER_RESYNC_INTERVAL": "0.5"})
    wait_until(lambda: states_by_name(dev).get("a") == ["live"])
    dev.stop()
    upgraded = dev_factory("--port", port, "--job-duration", "600", "--bacalhau-version", "1.9")
    [changed] = daemon.wait_event("api.changed", timeout=20)
    assert (changed["api_mode"], changed["previous_mode"]) == ("name", "legacy")
    (root / "b.yaml").write_text(envelope("b"))
    wait_until(lambda: states_by_name(upgraded).get("b") == ["live"], timeout=20)
    assert daemon.process.poll() is None
