"""Scenario 6: load. Thousands of manifests, a steady stream of changes: every change is
reflected, RSS stays flat, passes stay within budget."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import audit, figures, manifest, rss_kib, seeded, size


@pytest.mark.usefixtures("scale")
def test_steady_changes_under_load(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                                   rsa_key: Path) -> None:
    rng = seeded("load")
    count, per_minute, seconds = size(300, 10000), size(300, 1000), size(10, 600)
    dev = dev_factory("--job-duration", "360000")
    root = tmp_path / "manifests"
    root.mkdir()
    wanted = {f"l-{i:05d}": "img:0" for i in range(count)}
    for name, image in wanted.items():
        (root / f"{name}.yaml").write_text(manifest(name, image))
    env = {"RECONCILER_CONCURRENCY": "16", "RECONCILER_POLL_INTERVAL": "30"}
    started = time.monotonic()
    daemon = DaemonProcess(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key), env)
    try:
        daemon.wait_for(lambda: len(daemon.named("job.submitted")) >= count, 600, "first sync")
        synced = time.monotonic() - started
        time.sleep(2)
        rss = [rss_kib(daemon.process.pid)]
        version, changes = 0, 0
        load_started = time.monotonic()
        passes_before = len(daemon.named("pass.completed"))
        for second in range(seconds):
            # exactly per_minute a minute, the remainder spread over the seconds
            due = per_minute * (second + 1) // 60 - per_minute * second // 60
            for name in rng.sample(sorted(wanted), due):
                version += 1
                wanted[name] = f"img:{version}"
                tmp = root / f".{name}.tmp"
                tmp.write_text(manifest(name, wanted[name]))
                tmp.rename(root / f"{name}.yaml")
                changes += 1
            if second % 10 == 9:
                rss.append(rss_kib(daemon.process.pid))
            time.sleep(max(0.0, load_started + second + 1 - time.monotonic()))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            result = audit(dev.jobs(), wanted)
            if result.clean:
                break
            time.sleep(1)
        lag = time.monotonic() - (load_started + seconds)
        rss.append(rss_kib(daemon.process.pid))
    finally:
        daemon.stop()
    durations = [e["duration_ms"] for e in daemon.named("pass.completed")[passes_before:]]
    figures("load", manifests=count, changes=changes, minutes=round(seconds / 60, 2),
            first_sync_s=round(synced, 1), catch_up_s=round(lag, 1),
            duplicates=result.duplicates, stale=result.stale, lost=result.lost,
            rss_mib_start=round(rss[0] / 1024, 1), rss_mib_max=round(max(rss) / 1024, 1),
            rss_mib_end=round(rss[-1] / 1024, 1), passes=len(durations),
            pass_ms_p50=round(statistics.median(durations), 1),
            pass_ms_max=round(max(durations), 1))
    assert result.clean, result.problems[:20]
    assert max(rss) <= rss[0] * 1.3 + 10 * 1024, rss  # flat: no growth with changes
