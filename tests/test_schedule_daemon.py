"""Scheduled manifests in the real daemon against the dev requester (issue 16).

The daemon's schedule clock is sped up for these tests only (``RECONCILER_TEST_SCHEDULE_SPEED``,
service/timers.py): at 60, a ``* * * * *`` schedule has a slot every real second. Every daemon
of a test shares one anchor, so a restarted daemon agrees on schedule time.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from reconciler.backends.legacy_jobs import NAME_TAG, UID_TAG
from reconciler.service.timers import SCHEDULE_SPEED_ENV
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.harness import envelope

SPEED = 60.0
MANIFEST = envelope("tick", policy='schedule: "* * * * *"')


def jobs_of(dev: DevProcess, name: str) -> list[dict[str, object]]:
    found = []
    for job in dev.jobs():
        tags = job["Job"]["Spec"]["Annotations"]
        if f"{NAME_TAG}{name}" in tags:
            found.append(job)
    return found


def uid_of(job: dict[str, object]) -> str:
    tags = job["Job"]["Spec"]["Annotations"]  # type: ignore[index]
    return str(next(t.removeprefix(UID_TAG) for t in tags if t.startswith(UID_TAG)))


def start(tmp_path: Path, dev: DevProcess, key: Path, anchor: float,
          *extra: str) -> DaemonProcess:
    args = daemon_args(tmp_path / "manifests", tmp_path / "state.db", dev.url, key, *extra)
    return DaemonProcess(args, {SCHEDULE_SPEED_ENV: f"{SPEED}@{anchor}",
                                "RECONCILER_POLL_INTERVAL": "0.2"})


def fired_slots(daemons: list[DaemonProcess]) -> list[str]:
    return [e["slot"] for d in daemons for e in d.named("schedule.fired")]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "tick.yaml").write_text(MANIFEST)
    return root


def test_a_scheduled_manifest_runs_once_per_slot(
    tmp_path: Path, folder: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path,
) -> None:
    dev = dev_factory("--job-duration", "0.1")
    daemon = start(tmp_path, dev, rsa_key, time.time(), "--metrics-listen", "127.0.0.1:0")
    try:
        daemon.wait_event("schedule.fired", 4, timeout=30)
        listen = daemon.wait_event("metrics.listening")[0]["listen"]
        metrics = httpx.get(f"http://{listen}/metrics", timeout=10).text
    finally:
        daemon.stop()
    assert 'reconciler_schedule_slots_total{outcome="fired"}' in metrics
    slots = fired_slots([daemon])
    assert len(slots) == len(set(slots))
    jobs = jobs_of(dev, "tick")
    assert len(jobs) == len(slots)  # one job per fired slot, none twice
    fired_uids = {e["uid"] for e in daemon.named("schedule.fired")}
    assert {uid_of(j) for j in jobs} == fired_uids
    # Slots are whole minutes of schedule time, one after the other (a busy machine may skip
    # one while the previous run is still active, never run one twice).
    assert all(s.endswith(":00+00:00") for s in slots)
    shown = subprocess.run(
        [sys.executable, "-m", "reconciler", "status", "--json", "--manifests", str(folder),
         "--state", str(tmp_path / "state.db")], capture_output=True, text=True, check=True)
    (row,) = json.loads(shown.stdout)["schedules"]
    last = max(datetime.fromisoformat(s) for s in slots)
    assert datetime.fromisoformat(row["last_run"].replace("Z", "+00:00")) == last
    assert row["outcome"] in ("active", "completed") and row["next_run"]
    assert len(row["runs"]) == min(5, len(slots) - 1)  # keepRuns, the default 5


def kill9_trials(tmp_path: Path, dev_factory: Callable[..., DevProcess], key: Path,
                 trials: int) -> None:
    """Kill -9 the daemon right after a slot's intent is committed (``schedule.fired`` is
    logged between the commit and the request; the requester answers 50 ms late), at a random
    moment within the request's round trip; restart; repeat. Every fired slot must have
    exactly one job: none twice, none lost."""
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "tick.yaml").write_text(MANIFEST)
    dev = dev_factory("--job-duration", "0.1", "--latency", "0.05")
    rng = random.Random(16)
    anchor = time.time()
    daemons: list[DaemonProcess] = []
    for _ in range(trials):
        daemon = start(tmp_path, dev, key, anchor)
        daemons.append(daemon)
        daemon.wait_event("schedule.fired", 1, timeout=30)
        time.sleep(rng.uniform(0.0, 0.08))
        daemon.signal(signal.SIGKILL)
        assert daemon.stop() == -signal.SIGKILL
    final = start(tmp_path, dev, key, anchor)
    daemons.append(final)
    try:
        final.wait_event("schedule.fired", 2, timeout=30)  # resolved, then slots go on
        final.wait_for(lambda: all(j["State"]["State"] == "Completed"  # type: ignore[index]
                                   for j in jobs_of(dev, "tick")), 30, "runs completed")
    finally:
        final.stop()
    slots = fired_slots(daemons)
    repeated = [s for s, n in Counter(slots).items() if n > 1]
    jobs = jobs_of(dev, "tick")
    print(f"FIGURES schedule_kill9 trials={trials} slots={len(set(slots))} jobs={len(jobs)} "
          f"repeated_slots={len(repeated)}")
    assert repeated == []
    assert len(jobs) == len(set(slots))  # 0 duplicates, 0 lost


def test_kill9_between_intent_and_request_short(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path,
) -> None:
    kill9_trials(tmp_path, dev_factory, rsa_key, 5)


@pytest.mark.slow
def test_kill9_between_intent_and_request_full(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path,
) -> None:
    kill9_trials(tmp_path, dev_factory, rsa_key, 20)
