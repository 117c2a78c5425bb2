"""The legacy V1beta1 API as a :class:`reconciler.ports.Backend`.

Everything the engine must not know about this API lives here: the uid travels as the
annotation ``reconciler-uid:<uid>`` (with three more that name the manifest for people reading
``bacalhau list``); jobs are found by listing those tags, 500 to a request; and the API's state
names are mapped onto :class:`~reconciler.ports.JobPhase` (docs/wire-legacy.md, Job states:
New, Queued and InProgress run; Completed, Error and Cancelled are terminal; anything else,
``Undefined`` included, is ``UNKNOWN``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from reconciler.backends.errors import InvalidRequest, NotFound
from reconciler.backends.legacy import WireJob
from reconciler.domain.manifest import LoadError, Manifest
from reconciler.domain.translate import to_legacy
from reconciler.events import clean
from reconciler.ports import MESSAGE_LIMIT, JobInfo, JobPhase

UID_TAG = "reconciler-uid:"
NAME_TAG = "reconciler-manifest:"
SPEC_TAG = "reconciler-spec:"
JOB_PHASES = {
    "New": JobPhase.RUNNING,
    "Queued": JobPhase.RUNNING,
    "InProgress": JobPhase.RUNNING,
    "Completed": JobPhase.COMPLETED,
    "Error": JobPhase.FAILED,
    "Cancelled": JobPhase.CANCELLED,
}
#: The state a job is created in (docs/wire-legacy.md, Job states); a submit's reply does not
#: carry it.
SUBMITTED_STATE = "New"


class LegacyClient(Protocol):
    """What the backend uses of the wire client (:class:`ApiClient`; tests plug in a fake
    requester that records what it was sent)."""

    @property
    def client_id(self) -> str: ...
    async def submit(self, spec: Mapping[str, Any]) -> str: ...
    async def cancel(self, job_id: str, reason: str) -> str: ...
    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[WireJob]: ...
    async def state(self, job_id: str) -> str: ...


def job_annotations(manifest: Manifest, uid: str) -> list[str]:
    """Our annotations: lower-case, within the CLI's safe set ``[a-z0-9._~!:@,;+-]``."""
    return [
        "reconciler",
        UID_TAG + uid,
        NAME_TAG + manifest.name,
        SPEC_TAG + manifest.spec_hash[:16],
    ]


async def jobs_by_tag(
    requester: LegacyClient, prefix: str, values: Sequence[str], batch: int = 500
) -> dict[str, list[WireJob]]:
    """Our jobs carrying ``prefix + value`` for any of these values, by value. Asked ``batch``
    values at a time, so a reply holds only the jobs asked about, however many ended jobs the
    requester keeps."""
    found: dict[str, list[WireJob]] = {}
    wanted = set(values)
    for start in range(0, len(values), batch):
        tags = [prefix + value for value in values[start : start + batch]]
        for job in await requester.list_jobs(include_tags=tags):
            for tag in job.annotations:
                value = tag.removeprefix(prefix)
                if tag.startswith(prefix) and value in wanted:
                    found.setdefault(value, []).append(job)
    return found


async def jobs_by_uid(
    requester: LegacyClient, uids: Sequence[str], batch: int = 500
) -> dict[str, list[WireJob]]:
    return await jobs_by_tag(requester, UID_TAG, uids, batch)


def _tag_value(job: WireJob, prefix: str) -> str:
    return next((t.removeprefix(prefix) for t in job.annotations if t.startswith(prefix)), "")


def phase_of(state: str) -> JobPhase:
    return JOB_PHASES.get(state, JobPhase.UNKNOWN)


def job_info(job: WireJob) -> JobInfo:
    # No job version on this API (JobState.Version counts state changes, not specs).
    return JobInfo(job.job_id, phase_of(job.state), job.state, job.created_at,
                   uid=_tag_value(job, UID_TAG), spec_hash=_tag_value(job, SPEC_TAG),
                   message=clean(job.message, MESSAGE_LIMIT) if job.message else "")


class LegacyBackend:
    """:class:`reconciler.ports.Backend` over an :class:`ApiClient` (which it does not own)."""

    def __init__(self, client: LegacyClient) -> None:
        self.client = client

    @property
    def identity(self) -> str:
        return self.client.client_id

    def refusal(self, manifest: Manifest) -> str | None:
        """Why the legacy API cannot run this manifest (an orchestrator-only job), naming the
        file and the field; the executor then sends and cancels nothing."""
        outcome = to_legacy(manifest)
        return str(outcome) if isinstance(outcome, LoadError) else None

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        spec = to_legacy(manifest)
        if isinstance(spec, LoadError):
            raise InvalidRequest(str(spec))
        spec["Annotations"] = [*spec.get("Annotations", []), *job_annotations(manifest, uid)]
        job_id = await self.client.submit(spec)
        return JobInfo(job_id, JobPhase.RUNNING, SUBMITTED_STATE)

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        found = await jobs_by_uid(self.client, uids)
        return {uid: [job_info(job) for job in jobs] for uid, jobs in found.items()}

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        found = await jobs_by_tag(self.client, NAME_TAG, names)
        return {name: [job_info(job) for job in jobs] for name, jobs in found.items()}

    async def stop(self, job_id: str, reason: str) -> str:
        return await self.client.cancel(job_id, reason)

    async def status(self, job_id: str) -> JobInfo | None:
        try:
            state = await self.client.state(job_id)
        except NotFound:
            return None
        return JobInfo(job_id, phase_of(state), state)

    async def owner_of(self, job_id: str) -> str | None:
        jobs = await self.client.list_jobs(job_id=job_id)
        return jobs[0].client_id if jobs else None
