"""Shared pieces of the reliability suite: quick/full sizes, seeds, figures, audits.

Every scenario with a long form runs twice over the ``scale`` fixture (``conftest.py``): the short
form by default (CI), the full form marked ``slow`` (``-m slow``, or
``tests/reliability/run_full.sh``, which also sets RELIABILITY_FULL=1 for the sizes fixed at
import, such as hypothesis's example counts). Seeds come from RELIABILITY_SEED or the clock and
are printed, so a failure can be replayed. Each scenario prints one ``FIGURES`` line.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

FULL = os.environ.get("RELIABILITY_FULL") == "1"
_scale = {"full": FULL}


def use_full(full: bool) -> None:
    """Set by the ``scale`` fixture for the test about to run."""
    _scale["full"] = full


def size(quick: int, full: int) -> int:
    return full if _scale["full"] else quick


def seeded(scenario: str) -> random.Random:
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2**31))
    print(f"\n{scenario}: seed={seed} (replay with RELIABILITY_SEED={seed})")
    return random.Random(seed)


def figures(scenario: str, **values: object) -> None:
    text = " ".join(f"{k}={v}" for k, v in values.items())
    print(f"FIGURES {scenario} full={int(_scale['full'])} {text}", flush=True)


def manifest(name: str, image: str, policy: str = "") -> str:
    text = (f"apiVersion: reconciler/v1\nkind: Job\nmetadata: {{name: {name}}}\n"
            f"spec:\n  engine: docker\n  publisher: ipfs\n  docker: {{image: \"{image}\"}}\n")
    return text + (f"policy: {{{policy}}}\n" if policy else "")


@dataclass
class Audit:
    """What the requester recorded, against what the folder asks for."""

    duplicates: int = 0
    lost: int = 0
    wrongful_cancels: int = 0
    stale: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.duplicates or self.lost or self.wrongful_cancels or self.stale)


def _tag(job: dict[str, Any], prefix: str) -> str | None:
    for tag in job["Job"]["Spec"]["Annotations"]:
        if tag.startswith(prefix):
            return str(tag[len(prefix):])
    return None


#: Orchestrator job states in the legacy terms the audit reads.
_LEGACY_STATES = {"Pending": "New", "Queued": "Queued", "Running": "InProgress",
                  "Completed": "Completed", "Failed": "Error", "Stopped": "Cancelled"}


def as_legacy(job: dict[str, Any]) -> dict[str, Any]:
    """An orchestrator job (dev requester 1.6 / 1.9) in the legacy list shape the audit reads:
    the uid label and the name as annotations, the state and the image where V1beta1 has them."""
    if "Job" in job:
        return job
    labels = job.get("Labels") or {}
    task = job["Tasks"][0]
    return {"State": {"State": _LEGACY_STATES.get(job["State"]["StateType"], "Undefined")},
            "Job": {"Spec": {"Annotations": [f"reconciler-uid:{labels.get('reconciler-uid')}",
                                             f"reconciler-manifest:{job['Name']}"],
                             "Docker": {"Image": task["Engine"]["Params"]["Image"]}}}}


def audit(jobs: list[dict[str, Any]], wanted: dict[str, str]) -> Audit:
    """``wanted``: name -> image the folder asks for now. Images never repeat for a name, so a
    cancelled job whose image is still wanted was cancelled wrongly. Jobs of either API."""
    result = Audit()
    jobs = [as_legacy(job) for job in jobs]
    uids = Counter(_tag(j, "reconciler-uid:") for j in jobs)
    for uid, count in uids.items():
        if count > 1:
            result.duplicates += count - 1
            result.problems.append(f"uid {uid} submitted {count} times")
    live: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        name = _tag(job, "reconciler-manifest:") or "?"
        state = job["State"]["State"]
        image = job["Job"]["Spec"]["Docker"]["Image"]
        if state in ("New", "InProgress", "Queued"):
            live.setdefault(name, []).append(job)
        elif state == "Cancelled" and wanted.get(name) == image:
            result.wrongful_cancels += 1
            result.problems.append(f"{name}: job with the wanted image {image} was cancelled")
    for name, image in wanted.items():
        jobs_live = live.get(name, [])
        if not jobs_live:
            result.lost += 1
            result.problems.append(f"{name}: no live job")
        elif len(jobs_live) > 1:
            result.duplicates += len(jobs_live) - 1
            result.problems.append(f"{name}: {len(jobs_live)} live jobs")
        elif jobs_live[0]["Job"]["Spec"]["Docker"]["Image"] != image:
            result.stale += 1
            result.problems.append(f"{name}: live job runs an old image")
    for name, extra in live.items():
        if name not in wanted:
            result.stale += len(extra)
            result.problems.append(f"{name}: removed, yet {len(extra)} job(s) live")
    return result


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
