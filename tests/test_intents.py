"""Invariant 1, no duplicate jobs, end to end: lost replies and submit-then-500 from a real dev
requester, through the real CLI, httpx and SQLite. Intents left by a crash, empty lists and the
same faults are covered in-process against fakes in ``test_engine.py``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

from reconciler.domain.records import Phase
from tests.conftest import DevProcess
from tests.harness import Harness, envelope


def uids(h: Harness) -> Counter[str]:
    return Counter(a for j in h.jobs() for a in j["Job"]["Spec"]["Annotations"]
                   if a.startswith("reconciler-uid:"))


def test_lost_replies_never_duplicate(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    dev = dev_factory("--fail-after-store", "0.3", "--drop-rate", "0.3", "--seed", "11",
                      "--job-duration", "60")
    h = Harness(tmp_path, dev, rsa_key)
    for index in range(30):
        h.write(f"job-{index}.yaml", envelope(f"job-{index}"))
    h.apply(expect=None)
    h.apply(expect=None)
    stats = dev.stats()
    assert stats["fail_after_store"] + stats["dropped"] > 5  # the faults did happen
    per_name = Counter(a for j in h.jobs() for a in j["Job"]["Spec"]["Annotations"]
                       if a.startswith("reconciler-manifest:"))
    assert per_name == Counter({f"reconciler-manifest:job-{i}": 1 for i in range(30)})
    assert all(count == 1 for count in uids(h).values())
    assert all(r.phase is Phase.ACTIVE for r in h.records().values())
