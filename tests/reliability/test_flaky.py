"""Scenario 3: a flaky, then absent requester. 30% 5xx/429 with latency; then down for a while
and back empty (in-memory): live jobs are reported lost and follow their manifest's policy, the
daemon converges without a restart, and retry traffic while down stays bounded."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import audit, figures, manifest, seeded, size


def requests_sent(metrics_url: str) -> float:
    text = httpx.get(metrics_url, timeout=5).text
    return sum(float(v) for v in re.findall(r"^reconciler_requests_total\{.*\} (\S+)$", text,
                                            flags=re.MULTILINE))


@pytest.mark.usefixtures("scale")
def test_flaky_then_absent_requester(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                                     rsa_key: Path) -> None:
    rng = seeded("flaky")
    count, down_for = size(20, 200), size(3, 30)
    latency = "0.3" if size(0, 1) == 0 else "2.0"
    dev = dev_factory("--error-rate", "0.3", "--latency", latency, "--seed",
                      str(rng.randrange(2**31)), "--job-duration", "3600")
    port = dev.url.rsplit(":", 1)[1]
    root = tmp_path / "manifests"
    root.mkdir()
    wanted: dict[str, str] = {}
    for i in range(count):  # half are resubmitted when lost, half are not
        name = f"f-{i:03d}"
        wanted[name] = f"img:{i}"
        policy = "onFailure: resubmit" if i % 2 == 0 else ""
        (root / f"{name}.yaml").write_text(manifest(name, wanted[name], policy))
    env = {"RECONCILER_BACKOFF_BASE": "0.5", "RECONCILER_BACKOFF_MAX": "5",
           "RECONCILER_POLL_INTERVAL": "1", "RECONCILER_REQUEST_TIMEOUT": "5",
           "RECONCILER_CONCURRENCY": "16"}
    daemon = DaemonProcess(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key,
                                       "--metrics-listen", "127.0.0.1:0"), env)
    try:
        metrics = "http://" + daemon.wait_event("metrics.listening")[0]["listen"] + "/metrics"
        daemon.wait_for(lambda: len(dev.jobs()) >= count, 180, "the flaky sync")
        flaky = audit(dev.jobs(), wanted)
        assert flaky.clean, flaky.problems[:20]

        dev.stop()
        before, went_down = requests_sent(metrics), time.monotonic()
        extra = f"added-while-down-{rng.randrange(1000)}"
        wanted[extra] = "img:extra"
        (root / f"{extra}.yaml").write_text(manifest(extra, wanted[extra]))
        time.sleep(down_for)
        per_minute = (requests_sent(metrics) - before) / (time.monotonic() - went_down) * 60
        assert daemon.process.poll() is None

        back = dev_factory("--port", port, "--job-duration", "3600")  # empty: memory only
        came_back = time.monotonic()
        resubmitted = {n for i, n in enumerate(sorted(wanted)) if n.startswith("f-")
                       and int(n[2:]) % 2 == 0} | {extra}
        daemon.wait_for(lambda: {t.split(":", 1)[1] for j in back.jobs()
                                 for t in j["Job"]["Spec"]["Annotations"]
                                 if t.startswith("reconciler-manifest:")} >= resubmitted,
                        180, "recovery")
        recovery = time.monotonic() - came_back
        time.sleep(1.5)
    finally:
        daemon.stop()
    lost = {e["name"] for e in daemon.named("job.lost")}
    after = audit(back.jobs(), {n: wanted[n] for n in resubmitted})
    not_resubmitted = [n for n in wanted if n not in resubmitted]
    figures("flaky", manifests=count, error_rate=0.3, latency_s=latency, down_s=down_for,
            requests_per_min_while_down=round(per_minute, 1), reported_lost=len(lost),
            recovery_s=round(recovery, 2), duplicates=after.duplicates,
            wrongful_cancels=len(daemon.named("job.cancelled")))
    assert after.clean, after.problems[:20]
    assert lost == set(wanted) - {extra}  # every live job the empty requester forgot
    assert all(f"reconciler-manifest:{n}" not in str(back.jobs()) for n in not_resubmitted)
    assert not daemon.named("job.cancelled")
    assert per_minute < 600  # bounded: backoff, not a hot loop
