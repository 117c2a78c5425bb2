"""Scenario 2: lost replies. The requester stores the job and then answers 500, drops the
connection, or answers after the client's timeout: no duplicates, every intent resolved."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.domain.records import Phase
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import Audit, audit, figures, manifest, seeded, size


@pytest.mark.parametrize("fault", [["--fail-after-store", "0.4"], ["--drop-rate", "0.4"],
                                   ["--submit-latency", "1.5"]],
                         ids=["500-after-store", "dropped", "late-reply"])
@pytest.mark.usefixtures("scale")
def test_lost_replies(tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path,
                      fault: list[str]) -> None:
    rng = seeded("lost-replies")
    count = size(30, 300)
    dev = dev_factory(*fault, "--seed", str(rng.randrange(2**31)), "--job-duration", "3600")
    result, unresolved, daemon = _converge(tmp_path, dev, rsa_key, count)
    stats = dev.stats()
    figures("lost-replies", fault=fault[0], manifests=count, duplicates=result.duplicates,
            lost=result.lost, unresolved_intents=len(unresolved),
            submits_sent=stats["/requester/submit"],
            lookups=stats["/requester/list"], adopted=len(daemon.named("job.adopted")))
    assert result.clean, result.problems[:20]
    assert unresolved == []
    assert daemon.named("job.submit_unknown")  # the fault really hit


@pytest.mark.parametrize("profile", ["1.6", "1.9"])
def test_lost_replies_on_the_orchestrator(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                                          rsa_key: Path, profile: str) -> None:
    """Issue 14: PUTs stored then answered 503 ``Server Timeout!`` or dropped, by label (1.6)
    and by name (1.9): resolved by the uid label, never a second job for a name."""
    rng = seeded("lost-replies-orchestrator")
    count = size(30, 300)
    dev = dev_factory("--fail-after-store", "0.3", "--drop-rate", "0.2", "--seed",
                      str(rng.randrange(2**31)), "--job-duration", "3600",
                      "--bacalhau-version", profile)
    result, unresolved, daemon = _converge(tmp_path, dev, rsa_key, count)
    figures(f"lost-replies-{profile}", manifests=count, duplicates=result.duplicates,
            lost=result.lost, unresolved_intents=len(unresolved),
            requester_jobs=len(dev.jobs()), adopted=len(daemon.named("job.adopted")))
    assert result.clean, result.problems[:20]
    assert len(dev.jobs()) == count  # not one job more than manifests
    if profile == "1.9":  # by name a second PUT would be a second run: version 2
        assert {job["Version"] for job in dev.jobs()} == {1}
    assert unresolved == []
    assert daemon.named("job.submit_unknown")


def _converge(tmp_path: Path, dev: DevProcess, rsa_key: Path,
              count: int) -> tuple[Audit, list[str], DaemonProcess]:
    """``count`` manifests, a daemon until it converged against the faulty requester: what the
    requester holds, and the records left unresolved."""
    root = tmp_path / "manifests"
    root.mkdir()
    # Not j-...: such names are refused, a job id prefix to Bacalhau v1.8+ (docs/design.md).
    wanted = {f"r-{i:04d}": f"img:{i}" for i in range(count)}
    for name, image in wanted.items():
        (root / f"{name}.yaml").write_text(manifest(name, image))
    env = {"RECONCILER_REQUEST_TIMEOUT": "0.5", "RECONCILER_BACKOFF_BASE": "0.2"}
    daemon = DaemonProcess(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key), env)
    try:
        daemon.wait_for(lambda: len(dev.jobs()) >= count and daemon.quiet(), 120, "convergence")
    finally:
        daemon.stop()
    with Store(tmp_path / "state.db", writer=False) as store:
        unresolved = [r.name for r in store.records() if r.phase is not Phase.ACTIVE]
    return audit(dev.jobs(), wanted), unresolved, daemon
