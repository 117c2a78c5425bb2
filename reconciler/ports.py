"""The seams between the engine and the outside world: what a pass reads from and acts through.

Concrete classes live in ``sources/``, ``store/`` and ``backends/``; only ``app/wiring`` picks
them. Everything here is a :class:`typing.Protocol` (or a plain value type), so tests plug in
in-memory fakes and a second backend or store is one new module behind the same seam.

The terms are the reconciler's, not any API's: a backend is handed a manifest and the uid of
its intent, and reports jobs with a :class:`JobPhase` it maps itself. Annotations, client ids
and state names of the legacy API stay inside ``backends/``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol, runtime_checkable

from reconciler.domain.jobspec import LONG_RUNNING_TYPES
from reconciler.domain.manifest import Manifest
from reconciler.domain.records import Approval, Record, Run, StoredPolicy
from reconciler.domain.schedule import ScheduleState
from reconciler.domain.snapshot import Snapshot


class Source(Protocol):
    """Anything a pass can read a snapshot from: a folder, or a git repository's snapshots."""

    def read(self) -> Snapshot: ...


@runtime_checkable
class Settling(Protocol):
    """The optional capability of a source that can tell a file still being written by its
    mtime: files younger than ``settle`` seconds wait, whatever started the pass."""

    settle: float


@dataclass(frozen=True)
class FetchResult:
    """What a fetch found: the revision now published, and whether it is new."""

    commit: str
    changed: bool


@runtime_checkable
class Fetching(Protocol):
    """The optional capability of a source that pulls from a remote (a git repository): the
    daemon fetches it on a timer and on ``SIGUSR1`` instead of watching files. A source without
    it is a folder, watched for file events. Failures raise
    :class:`reconciler.sources.errors.FetchError`."""

    ref: str  # what it follows (a branch or tag), for events

    def fetch(self) -> FetchResult: ...
    def commit(self) -> str | None: ...
    def describe(self) -> str:
        """Where it fetches from, credentials masked (for ``daemon.started``)."""
        ...


class JobPhase(StrEnum):
    """Where a job is, in every backend's terms. Each backend maps its own states onto these;
    a state it cannot place is ``UNKNOWN``, never guessed to be running."""

    RUNNING = "running"  # accepted and not ended (queued or in progress)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"


#: The longest job message a backend reports (``JobInfo.message``): a reason, not a log; it is
#: stored with every record and shown by ``status``.
MESSAGE_LIMIT = 500


@dataclass(frozen=True)
class JobInfo:
    """One job as a backend reports it."""

    job_id: str
    phase: JobPhase
    state: str = ""  # the backend's own name for the state: recorded and shown, never decided on
    created_at: str = ""  # sortable; the oldest of several jobs of one uid is kept
    uid: str = ""  # the uid of the intent it was submitted under, when the backend reports it
    spec_hash: str = ""  # a prefix of the spec hash it was submitted with, when reported
    # The job's version (orchestrator `Job.Version`, raised by each update in place on v1.8+);
    # None where a backend has none (the legacy API) or has not seen it yet.
    version: int | None = None
    # Why it is in its state (orchestrator `State.Message`: a failure or stop reason), server
    # text bounded and scrubbed by the backend (events.clean); "" when there is none.
    message: str = ""
    #: ``batch``, ``ops``, ``service`` or ``daemon`` when the backend reports it ("" for the
    #: legacy API, whose jobs are never long-running): observe tells drift by it.
    job_type: str = ""

    @property
    def long_running(self) -> bool:
        """A service or daemon job: it never completes and is kept running, so any end of it
        is drift (docs/design.md, "Long-running jobs")."""
        return self.job_type in LONG_RUNNING_TYPES


class Backend(Protocol):
    """Runs jobs: what the executor and the observer act through.

    Every job a backend creates carries the uid of the intent it was submitted under, so a
    submit whose reply was lost is found again by that uid (``docs/design.md``, invariant 1).
    Errors are those of :mod:`reconciler.backends.errors`.
    """

    @property
    def identity(self) -> str:
        """Who this backend acts as (for the legacy API: the client id of the signing key)."""
        ...

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        """Create the manifest's job, tagged with ``uid``. Raises ``OutcomeUnknown`` when the
        job may or may not exist."""
        ...

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        """Our jobs tagged with any of these uids, by uid (absent uids are left out; an empty
        answer is not proof of absence)."""
        ...

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        """Every job of ours (ended ones too) submitted for any of these manifest names, by
        name: how a lost store is refilled and a second live job of a name is found."""
        ...

    async def stop(self, job_id: str, reason: str) -> str:
        """Cancel a job; returns its state name afterwards. ``AlreadyTerminal`` or
        ``NotFound`` when there is nothing left to stop."""
        ...

    async def status(self, job_id: str) -> JobInfo | None:
        """One job by id; None when the backend says it does not know it."""
        ...

    async def owner_of(self, job_id: str) -> str | None:
        """The identity that submitted a job (approval policies match on it); None if unknown."""
        ...


@runtime_checkable
class UpdatesInPlace(Protocol):
    """The optional capability of a backend that changes a job in place (Bacalhau v1.8+ by
    name: same job id, version + 1). When ``updates_in_place`` is true the executor carries a
    replace out as one submit under a fresh uid, with no cancel first (docs/design.md, "The
    orchestrator backend")."""

    @property
    def updates_in_place(self) -> bool: ...


@runtime_checkable
class Refusing(Protocol):
    """The optional capability of a backend that can tell, before sending anything, that it
    cannot run a manifest (a field its API has no counterpart for). The answer is one line
    naming the file and the field; the executor then sends nothing and cancels nothing."""

    def refusal(self, manifest: Manifest) -> str | None: ...


class Leadership(Protocol):
    """The right to be the one writer of a store. Its holder may cache what it wrote (nobody
    else writes); the store does not take it on its own, the wiring does."""

    def acquire(self) -> None:
        """Take it or raise :class:`reconciler.store.errors.StoreLocked` at once."""
        ...

    def release(self) -> None: ...

    @property
    def held(self) -> bool: ...


class Campaigning(Protocol):
    """Leadership among several daemons sharing one store (a lease with an epoch, renewed on
    a timer by the daemon). A daemon without one always leads (SQLite: its FileLease)."""

    instance: str

    @property
    def interval(self) -> float:
        """How often to campaign (renew, or try to take the lease)."""
        ...

    @property
    def epoch(self) -> int | None:
        """Our epoch while our lease is valid by our own clock; None: we must not act."""
        ...

    def campaign(self) -> bool:
        """Renew or take the lease; True if we lead. Blocking (run it off the loop)."""
        ...

    def step_down(self) -> None:
        """Stop believing at once (a fenced write found the lease gone)."""
        ...


class StateStore(Protocol):
    """What the reconciler remembers: a record per managed name, approval policies, approvals.

    Intents (``commit_intents``) are durable before the request they announce is sent;
    outcomes (``save``) may be cheap, since an intent already guards each. Errors are
    :class:`reconciler.store.errors.StoreError`.
    """

    @property
    def location(self) -> str:
        """Where the store lives, for events (a path; never credentials)."""
        ...

    def records(self) -> list[Record]: ...
    def commit_intents(
        self, records: Sequence[Record], *, schedules: Mapping[str, ScheduleState] | None = None,
        runs: Sequence[Run] = (), keep_runs: Mapping[str, int] | None = None,
    ) -> None:
        """Intents, durable before their requests. In the same transaction: ``schedules``
        (the state after a slot's decision, so a slot is never decided twice), ``runs`` (new
        runs of scheduled manifests; each name's previous run is closed with its record's
        phase and job first) and ``keep_runs`` (runs kept per name besides the newest)."""
        ...

    def schedules(self) -> dict[str, ScheduleState]: ...
    def runs(self, name: str | None = None) -> list[Run]:
        """Recent runs of scheduled manifests, newest first."""
        ...

    def drop_schedules(self, names: Iterable[str]) -> None: ...
    def save(self, records: Sequence[Record]) -> None: ...
    def forget(self, names: Iterable[str], *, cancelled_at: float | None = None) -> None:
        """Drop records; ``cancelled_at``: their jobs were just cancelled because their
        manifests were removed, which the mass-cancel window counts (same transaction)."""
        ...

    def recent_cancels(self, since: float) -> int:
        """How many removals were cancelled at or after ``since`` (wall-clock seconds)."""
        ...

    def clear_cancels(self) -> None: ...
    def view(self, spec_hash: str) -> dict[str, str] | None:
        """The printable view of a spec this store submitted (domain/specview.py), if kept."""
        ...

    def save_views(self, views: Mapping[str, Mapping[str, str]]) -> None: ...
    def policies(self) -> list[StoredPolicy]: ...
    def save_policies(self, policies: Sequence[StoredPolicy]) -> None: ...
    def drop_policies(self, names: Iterable[str]) -> None: ...
    def approvals(self, state: str | None = None) -> list[Approval]: ...
    def approval(self, job_id: str) -> Approval | None: ...
    def save_approval(self, approval: Approval) -> None: ...
    def approval_count(self) -> int: ...
    def prune_approvals(self, *, before: float, keep: int) -> int: ...
    def check(self) -> str: ...
    def close(self) -> None: ...
