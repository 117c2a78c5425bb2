"""Scenario 1: kill -9 anywhere. A daemon reconciling hundreds of manifests is SIGKILLed at
random moments and restarted; the folder changes between trials. After convergence: one live
job per manifest, no uid submitted twice, removed manifests' jobs cancelled."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import audit, figures, manifest, seeded, size


def converge(args: list[str], timeout: float = 180) -> tuple[DaemonProcess, float]:
    started = time.monotonic()
    daemon = DaemonProcess(args)
    daemon.wait_for(daemon.quiet, timeout, "a quiet pass")
    return daemon, time.monotonic() - started


#: Bacalhau 1.0 (legacy API), 1.6 (orchestrator, by label), 1.9 (orchestrator, by name).
PROFILES = ["1.0", "1.6", "1.9"]


@pytest.mark.usefixtures("scale")
@pytest.mark.parametrize("profile", PROFILES)
def test_kill9_anywhere(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                        rsa_key: Path, profile: str) -> None:
    rng = seeded("kill9")
    # The orchestrator profiles run a smaller short form (issue 14: the added default-suite
    # time stays small); RELIABILITY_FULL=1 runs each at full size.
    count, trials = (size(80, 500), size(3, 30)) if profile == "1.0" else (size(60, 500),
                                                                         size(3, 30))
    dev = dev_factory("--latency", "0.004", "--job-duration", "3600",
                      "--bacalhau-version", profile)
    root = tmp_path / "manifests"
    root.mkdir()
    wanted: dict[str, str] = {}
    version = 0

    def write(name: str) -> None:
        nonlocal version
        version += 1
        wanted[name] = f"img:{version}"  # images never repeat: a cancel of one is a replace
        (root / f"{name}.yaml").write_text(manifest(name, wanted[name]))

    for index in range(count):
        write(f"m-{index:04d}")
    args = daemon_args(root, tmp_path / "state.db", dev.url, rsa_key)
    kills = []
    for trial in range(trials):
        step = max(1, count // 50)
        for name in rng.sample(sorted(wanted), step):  # removed
            (root / f"{name}.yaml").unlink()
            del wanted[name]
        for name in rng.sample(sorted(wanted), step):  # changed
            write(name)
        for _ in range(step):  # added
            write(f"new-{trial}-{rng.randrange(10**6)}")
        daemon = DaemonProcess(args)
        delay = rng.uniform(0.05, 1.5)
        time.sleep(delay)
        daemon.signal(signal.SIGKILL)
        assert daemon.stop() == -signal.SIGKILL
        kills.append((round(delay, 2), len(daemon.named("job.submitted")),
                      len(daemon.named("job.cancelled"))))
    daemon, recovery = converge(args)
    daemon.stop()
    result = audit(dev.jobs(), wanted)
    figures(f"kill9-{profile}", manifests=len(wanted), trials=trials, duplicates=result.duplicates,
            lost=result.lost, wrongful_cancels=result.wrongful_cancels, stale=result.stale,
            recovery_s=round(recovery, 2), requester_jobs=len(dev.jobs()))
    print("kills (delay s, submitted, cancelled before the kill):", kills)
    assert result.clean, result.problems[:20]


def _phases(db: Path) -> dict[str, int]:
    """The store's records by phase, read straight from the file of a dead daemon."""
    with contextlib.closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT phase, count(*) FROM jobs GROUP BY phase").fetchall()
    return {str(phase): int(count) for phase, count in rows}


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_kill9_while_outcomes_wait(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                                   rsa_key: Path, profile: str) -> None:
    """Outcomes saved in batches (docs/design.md): a successful submit's outcome waits in the
    executor (up to 128, or 0.25 s) while its intent is already durable. SIGKILL lands during a
    cold sync, after a random number of ``job.submitted`` events, so outcomes are waiting at
    the kill; each restart adds a fresh batch of manifests (another cold sync) and changes and
    removes a few. After convergence: every uid submitted once, one live job per manifest, and
    the intents left by the kills were adopted by uid, not sent again."""
    rng = seeded("kill9-outcomes")
    count = int(os.environ.get("KILL9_MANIFESTS", "300"))
    trials = int(os.environ.get("KILL9_TRIALS", "10"))
    dev = dev_factory("--latency", "0.004", "--job-duration", "3600",
                      "--bacalhau-version", profile)
    root = tmp_path / "manifests"
    root.mkdir()
    db = tmp_path / "state.db"
    wanted: dict[str, str] = {}
    version = 0

    def write(name: str) -> None:
        nonlocal version
        version += 1
        wanted[name] = f"img:{version}"
        (root / f"{name}.yaml").write_text(manifest(name, wanted[name]))

    for index in range(count):
        write(f"m-{index:04d}")
    args = daemon_args(root, db, dev.url, rsa_key)
    left_in_doubt = 0  # intents (submitting) found in the store after the kills
    adopted = 0
    kills = []
    for trial in range(trials):
        if trial:
            for name in rng.sample(sorted(wanted), 3):  # removed
                (root / f"{name}.yaml").unlink()
                del wanted[name]
            for name in rng.sample(sorted(wanted), 3):  # changed
                write(name)
            for index in range(count // 3):  # a fresh cold sync's worth of new manifests
                write(f"t{trial}-{index:04d}")
        daemon = DaemonProcess(args)
        target = rng.randrange(1, count // 3)
        daemon.wait_for(lambda: len(daemon.named("job.submitted")) >= target  # noqa: B023
                        or daemon.quiet(), 120, f"{target} submits")  # noqa: B023
        daemon.signal(signal.SIGKILL)
        assert daemon.stop() == -signal.SIGKILL
        adopted += sum(1 for e in daemon.named("job.adopted")
                       if str(e.get("reason", "")).startswith("found by uid"))
        phases = _phases(db)
        left_in_doubt += phases.get("submitting", 0)
        kills.append((target, len(daemon.named("job.submitted")), phases.get("submitting", 0)))
    daemon, recovery = converge(args)
    adopted += sum(1 for e in daemon.named("job.adopted")
                   if str(e.get("reason", "")).startswith("found by uid"))
    daemon.stop()
    result = audit(dev.jobs(), wanted)
    figures(f"kill9-outcomes-{profile}", manifests=len(wanted), trials=trials,
            duplicates=result.duplicates, lost=result.lost,
            wrongful_cancels=result.wrongful_cancels, stale=result.stale,
            intents_left=left_in_doubt, adopted_by_uid=adopted,
            recovery_s=round(recovery, 2), requester_jobs=len(dev.jobs()))
    print("kills (target, submitted, intents in the store after the kill):", kills)
    assert result.clean, result.problems[:20]
    assert left_in_doubt > 0, "no kill left an outcome unsaved: the trial tested nothing"
