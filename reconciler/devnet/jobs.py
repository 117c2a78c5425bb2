"""The dev requester's jobs: creation with the server's transforms, the state machine, storage.

States move lazily: a job's state is worked out from the clock when it is read, so the server
needs no background tasks. ``--job-duration`` sets how long a job runs; annotations
``devnet:fail`` (end in Error) and ``devnet:duration:<seconds>`` change one job.

With ``--state-file`` every change is appended to a JSON-lines journal and replayed at start;
without it, jobs live in memory only, like the real requester's default store.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"Completed", "Error", "Cancelled"})
# What the requester shows for "no timeout" (docs/wire-legacy.md, Validation on submit).
NO_TIMEOUT = 9223372036


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Job:
    job_id: str
    client_id: str
    spec: dict[str, Any]
    created: float
    state: str = "New"
    #: Execution state on the dev compute node: AskForBid (waiting), BidAccepted, BidRejected.
    execution: str = "BidAccepted"
    started: float | None = None
    ended: float | None = None
    comment: str = ""
    version: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def annotations(self) -> list[str]:
        return list(self.spec.get("Annotations") or [])

    def duration(self, default: float) -> float:
        for tag in self.annotations:
            if tag.startswith("devnet:duration:"):
                try:
                    return float(tag.rsplit(":", 1)[1])
                except ValueError:
                    return default
        return default

    def advance(self, now: float, default_duration: float) -> bool:
        """Move a running job to its end state once its time is up. True when it changed."""
        if self.state in TERMINAL or self.started is None:
            return False
        if now - self.started < self.duration(default_duration):
            return False
        failed = "devnet:fail" in self.annotations
        self.finish("Error" if failed else "Completed", "failed by devnet:fail" if failed else "")
        self.ended = self.started + self.duration(default_duration)
        return True

    def finish(self, state: str, comment: str) -> None:
        self.history.append(_history(self.job_id, self.state, state, comment))
        self.state, self.comment = state, comment
        self.version += 1
        self.ended = time.time()

    def to_wire(self) -> dict[str, Any]:
        return {
            "APIVersion": "V1beta1",
            "Metadata": {
                "ID": self.job_id,
                "CreatedAt": rfc3339(self.created),
                "ClientID": self.client_id,
                "Requester": {"RequesterNodeID": "QmDevRequester", "RequesterPublicKey": ""},
            },
            "Spec": self.spec,
        }

    def state_wire(self) -> dict[str, Any]:
        return {
            "JobID": self.job_id,
            "State": self.state,
            "Version": self.version,
            "CreateTime": rfc3339(self.created),
            "UpdateTime": rfc3339(self.ended or self.started or self.created),
            "TimeoutAt": "0001-01-01T00:00:00Z",
            "Executions": [self._execution_wire()],
        }

    def _execution_wire(self) -> dict[str, Any]:
        state = self.execution
        if self.state == "Completed":
            state = "Completed"
        elif self.state in ("Error", "Cancelled") and state == "BidAccepted":
            state = "Failed" if self.state == "Error" else "Cancelled"
        return {
            "JobID": self.job_id,
            "NodeId": "QmDevCompute",
            "ComputeReference": "e-" + self.job_id,
            "State": state,
            "Status": self.comment,
            "Version": self.version,
            "CreateTime": rfc3339(self.created),
            "UpdateTime": rfc3339(self.ended or self.created),
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "client_id": self.client_id,
            "spec": self.spec,
            "created": self.created,
            "state": self.state,
            "execution": self.execution,
            "started": self.started,
            "ended": self.ended,
            "comment": self.comment,
            "version": self.version,
        }


def _history(job_id: str, previous: str, new: str, comment: str) -> dict[str, Any]:
    return {
        "Type": "JobLevel",
        "JobID": job_id,
        "JobState": {"Previous": previous, "New": new},
        "Comment": comment,
        "Time": rfc3339(time.time()),
    }


def apply_transforms(spec: dict[str, Any]) -> dict[str, Any]:
    """The requester's transforms after validation and its echo shape
    (docs/wire-legacy.md, Validation on submit)."""
    out = dict(spec)
    if int(out.get("Timeout") or 0) <= 0:
        out["Timeout"] = NO_TIMEOUT
    publisher_spec = dict(out.get("PublisherSpec") or {})
    out["PublisherSpec"] = publisher_spec
    out["Publisher"] = publisher_spec.get("Type", "")
    for key in ("Docker", "Wasm", "Resources", "Deal"):
        out.setdefault(key, {})
    resources = dict(out["Resources"])
    resources.setdefault("GPU", "")
    out["Resources"] = resources
    network = dict(out.get("Network") or {})
    network.setdefault("Type", "None")
    out["Network"] = network
    return out


class JobStore:
    """Thread-safe job table with an optional append-only journal."""

    def __init__(
        self,
        *,
        job_duration: float = 5.0,
        waits_for_approval: bool = False,
        state_file: Path | None = None,
    ) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self.job_duration = job_duration
        self.waits_for_approval = waits_for_approval
        self._journal = None
        if state_file is not None:
            self._replay(state_file)
            self._journal = state_file.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    def create(self, client_id: str, spec: dict[str, Any]) -> Job:
        now = time.time()
        job = Job(str(uuid.uuid4()), client_id, apply_transforms(spec), now)
        if self.waits_for_approval:
            job.execution = "AskForBid"  # waits for the probe or a ModerateJobRequest
        else:
            job.started = now
        job.history.append(_history(job.job_id, "Undefined", "New", "job created"))
        with self._lock:
            self._jobs[job.job_id] = job
            self._write(job)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None and len(job_id) == 8:
                # The in-memory store resolves 8-character short ids (docs/wire-legacy.md, Cancel).
                job = next((j for j in self._jobs.values() if j.job_id.startswith(job_id)), None)
            if job is not None:
                self._refresh(job)
            return job

    def all(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                self._refresh(job)
            return jobs

    def cancel(self, job: Job, reason: str) -> None:
        with self._lock:
            job.finish("Cancelled", reason or "job canceled by user")
            self._write(job)

    def moderate(self, job: Job, should_bid: bool, reason: str) -> None:
        with self._lock:
            if should_bid:
                job.execution, job.started = "BidAccepted", time.time()
            else:
                job.execution = "BidRejected"
                job.finish("Error", reason or "bid rejected by approver")
            self._write(job)

    def _refresh(self, job: Job) -> None:
        if job.advance(time.time(), self.job_duration):
            self._write(job)

    def _write(self, job: Job) -> None:
        if self._journal is not None:
            self._journal.write(json.dumps(job.to_record()) + "\n")
            self._journal.flush()

    def _replay(self, path: Path) -> None:
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            self._jobs[record["job_id"]] = Job(**record)
