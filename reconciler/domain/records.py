"""What the store remembers about each managed name: the planner's view of recorded state."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    SUBMITTING = "submitting"  # intent committed, no job id yet
    ACTIVE = "active"  # job accepted and not finished
    CANCELLING = "cancelling"  # cancel intent committed
    COMPLETED = "completed"
    FAILED = "failed"  # the job ended in Error
    CANCELLED = "cancelled"  # cancelled by someone other than us
    LOST = "lost"  # the requester no longer knows the job
    ERROR = "error"  # our submit was refused or never arrived: no job exists


LIVE_PHASES = frozenset({Phase.SUBMITTING, Phase.ACTIVE, Phase.CANCELLING})
FINISHED_PHASES = frozenset(
    {Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED, Phase.LOST, Phase.ERROR}
)


@dataclass(frozen=True)
class Record:
    name: str
    phase: Phase
    spec_hash: str
    path: str
    job_id: str | None = None
    uid: str | None = None
    job_state: str | None = None
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: float = 0.0
    on_remove: str = "cancel"
    revision: str | None = None
    updated_at: float = 0.0
    # What the backend last said of the job besides its state (schema 5): its version (bumped
    # by each update in place on Bacalhau v1.8+; None where the backend has none or it was not
    # seen yet) and its state message (why it failed or was stopped; bounded server text).
    job_version: int | None = None
    job_message: str | None = None

    def evolve(self, **changes: object) -> Record:
        """``dataclasses.replace(self, **changes)`` at a quarter of the cost, for the hot
        paths (a cold sync writes two records per job: docs/performance.md). ``replace``
        runs the generated ``__init__``, which sets each of the 15 fields through
        ``object.__setattr__``; a record has no ``__post_init__`` to skip."""
        unknown = changes.keys() - _RECORD_FIELDS
        if unknown:
            raise TypeError(f"Record has no field {sorted(unknown)[0]!r}")
        new = object.__new__(Record)
        values = new.__dict__
        values.update(self.__dict__)
        values.update(changes)
        return new


_RECORD_FIELDS = frozenset(Record.__dataclass_fields__)


@dataclass(frozen=True)
class StoredPolicy:
    name: str
    body: str  # the policy as canonical JSON
    body_hash: str
    path: str


@dataclass(frozen=True)
class Approval:
    """A probe request and what became of it (state: pending, approved, rejected)."""

    job_id: str
    node_id: str
    callback: str
    summary: str  # engine, image, resources: never the spec itself (it may hold secrets)
    state: str
    rule: str
    reason: str
    received_at: float
    decided_at: float | None = None


@dataclass(frozen=True)
class Run:
    """One run of a scheduled manifest (``runs`` table): its slot, the uid it was submitted
    under, and once a later slot superseded it, its job and how it ended. The newest run of a
    name is its record's job; its outcome is the record's phase (docs/design.md, "Schedules")."""

    name: str
    slot: float  # the slot's instant, Unix seconds
    uid: str
    job_id: str | None = None
    outcome: str = "current"
