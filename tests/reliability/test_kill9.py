"""Scenario 1: kill -9 anywhere. A daemon reconciling hundreds of manifests is SIGKILLed at
random moments and restarted; the folder changes between trials. After convergence: one live
job per manifest, no uid submitted twice, removed manifests' jobs cancelled."""

from __future__ import annotations

import signal
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
