"""Invariant 1, no duplicate jobs: intents without a job id, lost replies, submit-then-500."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from reconciler.backends.legacy import ApiClient
from reconciler.backends.legacy_jobs import job_annotations
from reconciler.backends.signing import load_signer
from reconciler.domain.manifest import load_file
from reconciler.domain.records import Phase, Record
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess
from tests.harness import Harness, envelope

UID = "0123456789abcdef0123456789abcdef"


def leave_intent(h: Harness, name: str, *, submit_too: bool) -> None:
    """What a crash between 'intent committed' and 'job id saved' leaves behind."""
    text = envelope(name)
    h.write(f"{name}.yaml", text)
    [manifest] = load_file(f"{name}.yaml", text.encode()).manifests
    with Store(h.state) as store:
        store.commit_intents([Record(name, Phase.SUBMITTING, manifest.spec_hash,
                                     f"{name}.yaml", uid=UID, attempts=1)])
    if submit_too:
        spec = manifest.wire()
        spec["Annotations"] = job_annotations(manifest, UID)

        async def submit() -> str:
            async with ApiClient(h.dev.url, load_signer(h.key)) as client:
                return await client.submit(spec)

        asyncio.run(submit())


def uids(h: Harness) -> Counter[str]:
    return Counter(a for j in h.jobs() for a in j["Job"]["Spec"]["Annotations"]
                   if a.startswith("reconciler-uid:"))


def test_intent_whose_job_exists_is_adopted(tmp_path: Path, dev: DevProcess,
                                            rsa_key: Path) -> None:
    h = Harness(tmp_path, dev, rsa_key)
    leave_intent(h, "a", submit_too=True)
    assert "= resolve" in h.cli("plan").stdout
    result = h.apply()
    assert len(h.jobs("a")) == 1
    [job] = h.jobs("a")
    record = h.records()["a"]
    assert (record.phase, record.job_id) == (Phase.ACTIVE, job["Job"]["Metadata"]["ID"])
    assert [e["event"] for e in h.events(result) if e["event"].startswith("job.")] == [
        "job.adopted"]


def test_intent_whose_job_never_arrived_is_submitted_once(tmp_path: Path, dev: DevProcess,
                                                          rsa_key: Path) -> None:
    h = Harness(tmp_path, dev, rsa_key)
    leave_intent(h, "a", submit_too=False)
    h.apply()
    # absence confirmed three times first; the next pass sweeps the name for a late arrival
    assert dev.stats()["/requester/list"] == 3 + 1
    sent = uids(h)  # once, under a fresh uid: a late arrival of UID would be a duplicate
    assert f"reconciler-uid:{UID}" not in sent and list(sent.values()) == [1]
    assert h.records()["a"].uid == next(iter(sent)).removeprefix("reconciler-uid:")
    h.apply()
    assert len(h.jobs("a")) == 1


def test_removed_manifest_with_intent_is_resolved_then_cancelled(
    tmp_path: Path, dev: DevProcess, rsa_key: Path
) -> None:
    h = Harness(tmp_path, dev, rsa_key)
    leave_intent(h, "a", submit_too=True)
    h.write("keep.yaml", envelope("keep"))
    (h.root / "a.yaml").unlink()
    h.apply()
    assert h.states("a") == ["Cancelled"]
    assert "a" not in h.records()


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
