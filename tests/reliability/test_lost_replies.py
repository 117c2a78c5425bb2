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
from tests.reliability.common import audit, figures, manifest, seeded, size


@pytest.mark.parametrize("fault", [["--fail-after-store", "0.4"], ["--drop-rate", "0.4"],
                                   ["--submit-latency", "1.5"]],
                         ids=["500-after-store", "dropped", "late-reply"])
@pytest.mark.usefixtures("scale")
def test_lost_replies(tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path,
                      fault: list[str]) -> None:
    rng = seeded("lost-replies")
    count = size(30, 300)
    dev = dev_factory(*fault, "--seed", str(rng.randrange(2**31)), "--job-duration", "3600")
    root = tmp_path / "manifests"
    root.mkdir()
    wanted = {f"j-{i:04d}": f"img:{i}" for i in range(count)}
    for name, image in wanted.items():
        (root / f"{name}.yaml").write_text(manifest(name, image))
    env = {"RECONCILER_REQUEST_TIMEOUT": "0.5", "RECONCILER_BACKOFF_BASE": "0.2"}
    daemon = DaemonProcess(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key), env)
    try:
        daemon.wait_for(lambda: len(dev.jobs()) >= count and daemon.quiet(), 120, "convergence")
    finally:
        daemon.stop()
    result = audit(dev.jobs(), wanted)
    with Store(tmp_path / "state.db", writer=False) as store:
        unresolved = [r.name for r in store.records() if r.phase is not Phase.ACTIVE]
    stats = dev.stats()
    figures("lost-replies", fault=fault[0], manifests=count, duplicates=result.duplicates,
            lost=result.lost, unresolved_intents=len(unresolved),
            submits_sent=stats["/requester/submit"],
            lookups=stats["/requester/list"], adopted=len(daemon.named("job.adopted")))
    assert result.clean, result.problems[:20]
    assert unresolved == []
    assert daemon.named("job.submit_unknown")  # the fault really hit
