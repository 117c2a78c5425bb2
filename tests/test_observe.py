"""Observing live jobs against a real requester: what a poll asks for, and what it records."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from reconciler.backends.legacy import ApiClient, WireJob
from reconciler.backends.legacy_jobs import UID_TAG, LegacyBackend
from reconciler.backends.signing import Signer
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.domain.spec import parse_spec, to_wire
from reconciler.engine.observe import observe
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess


class CountingClient(ApiClient):
    """The real client, counting the jobs each list reply carried."""

    def __init__(self, url: str, signer: Signer) -> None:
        super().__init__(url, signer, timeout=5)
        self.listed: Counter[str] = Counter()

    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[WireJob]:
        jobs = await super().list_jobs(include_tags=include_tags, job_id=job_id)
        self.listed.update(job.job_id for job in jobs)
        return jobs


def test_a_poll_fetches_only_the_active_jobs(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], signer: Signer
) -> None:
    """The requester keeps every replaced job; a poll must not grow with that history, and
    must still see a job cancelled behind the daemon's back."""
    dev = dev_factory("--job-duration", "3600")

    def spec(uid: str) -> dict[str, object]:
        return to_wire(parse_spec({"Engine": "noop", "Publisher": "noop",
                                   "Annotations": [UID_TAG + uid]}))

    async def scenario() -> tuple[Counter[str], Counter[str], list[str]]:
        client = CountingClient(dev.url, signer)
        async with client:
            for index in range(30):  # history: our own jobs, ended long ago
                await client.cancel(await client.submit(spec(f"old{index}")), "replaced")
            active = [await client.submit(spec(f"live{index}")) for index in range(3)]
            with Store(tmp_path / "state.db") as store:
                store.commit_intents([
                    Record(f"m{i}", Phase.ACTIVE, "h" * 64, f"m{i}.yaml", job_id=job_id,
                           uid=f"live{i}", job_state="New")
                    for i, job_id in enumerate(active)
                ])
                await client.cancel(active[0], "by hand, outside the daemon")
                counts = await observe(store, LegacyBackend(client), PlanPolicy())
                phases = [r.phase.value for r in sorted(store.records(), key=lambda r: r.name)]
            return client.listed, counts, phases

    listed, counts, phases = asyncio.run(scenario())
    assert len(dev.jobs()) == 33
    assert sorted(listed) == sorted(j["Job"]["Metadata"]["ID"] for j in dev.jobs()
                                    if any(t.startswith(UID_TAG + "live")
                                           for t in j["Job"]["Spec"]["Annotations"]))
    assert counts == Counter({"job.drift": 1})
    assert phases == ["cancelled", "active", "active"]
