"""Observing live jobs against a real requester: what a poll asks for, and what it records."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from structlog.testing import capture_logs

from reconciler.backends.legacy import ApiClient, WireJob
from reconciler.backends.legacy_jobs import UID_TAG, LegacyBackend
from reconciler.backends.signing import Signer
from reconciler.domain.manifest import Manifest, load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.domain.spec import parse_spec, to_wire
from reconciler.engine.observe import observe
from reconciler.ports import MESSAGE_LIMIT, Backend, JobInfo, JobPhase
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess
from tests.fakes import FakeRequester, FakeStore
from tests.harness import envelope


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


# --- in process: what a poll records besides the state (issue 14, Polling) ---------------------


class Jobs:
    """A backend that reports whatever the test sets: state, version, message per job id."""

    def __init__(self) -> None:
        self.now: dict[str, JobInfo] = {}

    def set(self, job_id: str, state: str, version: int | None = None, message: str = "",
            phase: JobPhase = JobPhase.RUNNING) -> None:
        self.now[job_id] = JobInfo(job_id, phase, state, uid=f"u-{job_id}", version=version,
                                   message=message)

    @property
    def identity(self) -> str:
        return "test"

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        raise AssertionError("observe never submits")

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {job.uid: [job] for job in self.now.values() if job.uid in uids}

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {}

    async def stop(self, job_id: str, reason: str) -> str:
        raise AssertionError("observe never stops")

    async def status(self, job_id: str) -> JobInfo | None:
        return self.now.get(job_id)

    async def owner_of(self, job_id: str) -> str | None:
        return None


def _poll(store: FakeStore, backend: Backend) -> tuple[Counter[str], list[dict[str, Any]]]:
    with capture_logs() as events:
        counts = asyncio.run(observe(store.as_store(), backend, PlanPolicy()))
    return counts, [dict(e) for e in events]


def _live(name: str, **extra: Any) -> Record:
    return Record(name, Phase.ACTIVE, "h" * 64, f"{name}.yaml", job_id=f"j-{name}",
                  uid=f"u-j-{name}", **extra)


def test_a_new_version_or_message_is_recorded_with_the_same_state() -> None:
    store = FakeStore([_live("a", job_state="Running", job_version=1)])
    jobs = Jobs()
    jobs.set("j-a", "Running", version=2)  # updated in place; the state did not change
    assert _poll(store, jobs) == (Counter(), [])
    assert (store.rows["a"].job_state, store.rows["a"].job_version) == ("Running", 2)
    jobs.set("j-a", "Running", version=2, message="waiting for a node")
    _poll(store, jobs)
    assert store.rows["a"].job_message == "waiting for a node"
    jobs.set("j-a", "Stopped", version=2, message="stopped by hand: maintenance",
             phase=JobPhase.CANCELLED)
    counts, events = _poll(store, jobs)
    assert counts == Counter({"job.drift": 1})
    assert events[0]["job_message"] == "stopped by hand: maintenance"
    record = store.rows["a"]
    assert (record.phase, record.job_state, record.job_version, record.job_message) == (
        Phase.CANCELLED, "Stopped", 2, "stopped by hand: maintenance")


def test_a_poll_that_finds_nothing_new_writes_nothing() -> None:
    store = FakeStore([_live(f"m{i}", job_state="Running") for i in range(200)])
    jobs = Jobs()
    for i in range(200):
        jobs.set(f"j-m{i}", "Running", version=1, message="" if i % 2 else "queued")
    _poll(store, jobs)
    assert store.rows_saved == 200  # versions and messages seen for the first time
    _poll(store, jobs)
    assert store.rows_saved == 200  # the same again: no row written
    jobs.set("j-m7", "Running")  # a backend that reports no version keeps the recorded one
    _poll(store, jobs)
    assert store.rows_saved == 200 and store.rows["m7"].job_version == 1


def test_a_legacy_job_message_is_recorded_bounded_and_scrubbed() -> None:
    requester = FakeRequester()
    store = FakeStore()
    backend = requester.backend()

    async def submit() -> str:
        return (await backend.submit(manifest_of("a"), "u-a")).job_id

    job_id = asyncio.run(submit())
    store.save([Record("a", Phase.ACTIVE, "h" * 64, "a.yaml", job_id=job_id, uid="u-a",
                       job_state="New")])
    hostile = "exit 1 fetching https://ops:s3cret@example.com/x " + "y" * 5000
    requester.finish(job_id, "Error", message=hostile)
    counts, _ = _poll(store, backend)
    assert counts == Counter({"job.failed": 1})
    message = store.rows["a"].job_message
    assert message is not None and message.startswith("exit 1 fetching https://")
    assert "s3cret" not in message and len(message) < MESSAGE_LIMIT + 50
    assert store.rows["a"].job_version is None  # the legacy API has no job version


def manifest_of(name: str) -> Manifest:
    [loaded] = load_file(f"{name}.yaml", envelope(name).encode()).manifests
    return loaded


def test_an_orchestrator_job_reports_its_version_and_a_bounded_scrubbed_message() -> None:
    from reconciler.backends.orchestrator import job_info

    stopped = {"ID": "j-1", "Version": 3, "State": {
        "StateType": "Stopped", "Message": "by https://u:pw@host " + "z" * 3000}}
    info = job_info(stopped)
    assert (info.phase, info.state, info.version) == (JobPhase.CANCELLED, "Stopped", 3)
    assert "pw@" not in info.message and len(info.message) < MESSAGE_LIMIT + 50
    odd = job_info({"ID": "j-2", "Version": True, "State": {"StateType": "Running"}})
    assert (odd.version, odd.message) == (None, "")  # not a number: no version


def test_a_poll_whose_lease_changed_meanwhile_saves_nothing() -> None:
    """The records were read before the requests: a daemon that lost its lease during them
    and leads again would write them over what another leader recorded in between."""
    store = FakeStore([_live("a", job_state="Running")])
    jobs = Jobs()
    jobs.set("j-a", "Stopped", phase=JobPhase.CANCELLED)
    counts = asyncio.run(observe(store.as_store(), jobs, PlanPolicy(), still_ours=lambda: False))
    assert counts == Counter() and store.rows_saved == 0
    assert store.rows["a"].job_state == "Running"
    _poll(store, jobs)  # the next poll, still ours, reads afresh and records it
    assert store.rows["a"].job_state == "Stopped"
