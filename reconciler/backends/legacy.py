"""The Bacalhau requester and compute-node API (legacy V1beta1), over httpx.

Every call is a POST under a configurable prefix (default ``/api/v1``); replies are JSON sent
as ``text/plain`` and are parsed whatever the Content-Type says. Signed calls serialize their
payload once, sign it and embed the same bytes (:mod:`reconciler.backends.signing`).

Errors, translated from HTTP statuses and httpx exceptions in one place (:func:`_translate`)::

    RequesterError
    ├── PermanentError            retrying cannot help
    │   ├── InvalidRequest        400: bad envelope, signature or spec
    │   ├── NotAuthorized         401: job owned by another client, or not the node's approver
    │   ├── NotFound              404 (and the requester's 400 "Job not found" on list by id)
    │   ├── AlreadyTerminal       cancel of a Completed or Error job
    │   └── NoExecutions          approve: the node holds no execution of the job
    ├── MalformedReply            a 200 reply of the wrong shape (not JSON, wrong types,
    │                             missing fields): the requester is not behaving; never a crash
    ├── TransientError            retried with exponential backoff and jitter, bounded
    │   ├── RateLimited           429
    │   ├── ServerError           5xx, 503 "Server Timeout!"
    │   └── Unreachable           the request never reached the server (connect failed)
    └── OutcomeUnknown            a submit was sent but its reply was lost or was a 5xx:
                                  the job may exist; ``job_id`` carries X-Bacalhau-Job-ID
                                  when the server sent it. Resolve by listing the uid.

Submit is never retried once it may have reached the handler: only 429 and connect errors
(where the server provably did nothing) are retried; everything else that leaves the outcome
open is raised as :class:`OutcomeUnknown`.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from reconciler.backends.errors import (
    AlreadyTerminal,
    InvalidRequest,
    MalformedReply,
    NoExecutions,
    NotAuthorized,
    NotFound,
    OutcomeUnknown,
    PermanentError,
    RateLimited,
    RequesterError,
    ServerError,
    TransientError,
    Unreachable,
)
from reconciler.backends.signing import Signer, signed_body
from reconciler.backends.transport import cheapen
from reconciler.events import scrub_text

__all__ = [
    "AlreadyTerminal",
    "ApiClient",
    "InvalidRequest",
    "MalformedReply",
    "NoExecutions",
    "NotAuthorized",
    "NotFound",
    "OutcomeUnknown",
    "PermanentError",
    "RateLimited",
    "RequesterError",
    "RetryPolicy",
    "ServerError",
    "TransientError",
    "Unreachable",
    "WireJob",
]

@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class WireJob:
    """One job as the requester lists it (the legacy wire's view; the engine sees
    :class:`reconciler.ports.JobInfo`)."""

    job_id: str
    state: str
    client_id: str
    annotations: tuple[str, ...]
    created_at: str = ""  # only what the reconciler needs: a list of 10,000 jobs is 45 MB
    message: str = ""  # the first execution's non-empty Status (docs/wire-legacy.md, Job states)

    @classmethod
    def from_wire(cls, item: Any) -> WireJob:
        """One item of a list reply; :class:`MalformedReply` unless it has the contract's
        shape (docs/wire-legacy.md, List). Absent optional parts take their zero values, as Go
        sends them."""
        job = _object(item, "Job", required=True)
        metadata = _object(job, "Metadata", required=True)
        annotations = _object(job, "Spec").get("Annotations") or []
        if not isinstance(annotations, list) or not all(isinstance(a, str) for a in annotations):
            raise MalformedReply("list: a job's Spec.Annotations is not a list of strings")
        job_id = _text(metadata, "ID")
        if not job_id:
            raise MalformedReply("list: a job without Metadata.ID")
        return cls(
            job_id=job_id,
            state=_text(_object(item, "State"), "State") or "Undefined",
            client_id=_text(metadata, "ClientID"),
            annotations=tuple(annotations),
            created_at=_text(metadata, "CreatedAt"),
            message=_execution_status(_object(item, "State")),
        )


def _execution_status(state: Mapping[str, Any]) -> str:
    """The legacy job state has no message of its own; an execution's ``Status`` says why it
    failed or was cancelled. Raw server text: the backend bounds and scrubs it."""
    executions = state.get("Executions")
    for execution in executions if isinstance(executions, list) else ():
        status = execution.get("Status") if isinstance(execution, Mapping) else None
        if isinstance(status, str) and status.strip():
            return status.strip()
    return ""


def _object(parent: Any, key: str, *, required: bool = False) -> Mapping[str, Any]:
    """``parent[key]`` when it is a JSON object; {} when absent or null (unless required)."""
    if not isinstance(parent, Mapping):
        raise MalformedReply(f"reply: expected an object holding {key!r}, got "
                             f"{type(parent).__name__}")
    value = parent.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise MalformedReply(f"reply: {key!r} is {type(value).__name__}, not an object")
    return value


def _text(parent: Mapping[str, Any], key: str) -> str:
    """``parent[key]`` when it is a string; "" when absent or null."""
    value = parent.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedReply(f"reply: {key!r} is {type(value).__name__}, not a string")
    return value


def _job_state(reply: _Reply, operation: str) -> str:
    """``state.State`` of a cancel or states reply (docs/wire-legacy.md, Cancel and Job states)."""
    if not isinstance(reply.body, Mapping):
        raise MalformedReply(f"{operation}: the reply is not a JSON object")
    return _text(_object(reply.body, "state", required=True), "State") or "Undefined"


@dataclass
class _Reply:
    status: int
    body: Any
    text: str
    headers: httpx.Headers


def _error_message(reply: _Reply) -> str:
    if isinstance(reply.body, Mapping) and "Message" in reply.body:
        return str(reply.body["Message"])[:500]
    return reply.text.strip()[:500]


def _translate(reply: _Reply, *, operation: str) -> RequesterError:
    """Map a non-200 reply to the most specific error of the hierarchy."""
    message = f"{operation}: HTTP {reply.status}: {_error_message(reply)}"
    status = reply.status
    text = _error_message(reply)
    if status == 400 and "not found" in text.lower():
        return NotFound(message, status=status)
    if status == 400:
        return InvalidRequest(message, status=status)
    if status == 401:
        return NotAuthorized(message, status=status)
    if status == 404:
        return NotFound(message, status=status)
    if status == 429:
        return RateLimited(message, status=status)
    if operation == "cancel" and status == 500 and _is_terminal_refusal(text):
        return AlreadyTerminal(message, status=status)
    if operation == "approve" and status == 500 and "no executions found" in text:
        return NoExecutions(message, status=status)
    if status == 500 and operation == "states" and "not found" in text.lower():
        return NotFound(message, status=status)
    if status >= 500:
        return ServerError(message, status=status)
    return PermanentError(message, status=status)


def _is_terminal_refusal(text: str) -> bool:
    return "cannot cancel job in state" in text or "is in terminal state" in text


class ApiClient:
    """An async client for one requester (and, for approve, any compute node).

    Use as ``async with ApiClient(...) as client:``; one connection pool per instance.
    """

    def __init__(
        self,
        endpoint: str,
        signer: Signer,
        *,
        prefix: str = "/api/v1",
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._signer = signer
        self._endpoint = scrub_text(endpoint.rstrip("/"))  # for messages: no credentials
        self._prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=16)
        self._http = httpx.AsyncClient(
            base_url=endpoint.rstrip("/"),
            timeout=timeout,
            limits=limits,
            transport=transport,
            headers={"Content-Type": "application/json"},
        )
        if transport is None:  # not transport=: httpx would drop the environment's proxies
            cheapen(self._http)
        self.on_request: Callable[[str, int | None, float], None] | None = None

    @property
    def client_id(self) -> str:
        return self._signer.client_id

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- operations --------------------------------------------------------------------

    async def submit(self, spec: Mapping[str, Any]) -> str:
        """Submit one job; returns its id. Raises :class:`OutcomeUnknown` when in doubt."""
        payload = {"APIVersion": "V1beta1", "ClientID": self.client_id, "Spec": spec}
        body = signed_body(self._signer, payload)
        reply = await self._retrying(lambda: self._post_submit(body), retry_on=_SAFE_TO_RESEND)
        try:
            job_id = _text(_object(_object(reply.body, "job", required=True), "Metadata"), "ID")
        except MalformedReply as exc:  # the job may exist all the same: resolve by uid
            raise OutcomeUnknown(f"submit: 200 with a malformed reply ({exc})",
                                 status=reply.status) from exc
        if not job_id:
            raise OutcomeUnknown("submit: 200 without a job id", status=reply.status)
        return job_id

    async def cancel(self, job_id: str, reason: str) -> str:
        """Cancel one of our jobs; returns the state after the cancel."""
        payload = {"ClientID": self.client_id, "JobID": job_id, "Reason": reason}
        body = signed_body(self._signer, payload)
        reply = await self._retrying(lambda: self._post("cancel", "/requester/cancel", body))
        return _job_state(reply, "cancel")

    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[WireJob]:
        """Our jobs (by client id), optionally only those carrying any of ``include_tags``."""
        request: dict[str, Any] = {
            "client_id": self.client_id,
            "include_tags": list(include_tags),
            "max_jobs": 0,
            "sort_by": "created_at",
        }
        if job_id:
            request["id"] = job_id
        body = json.dumps(request).encode()
        reply = await self._retrying(lambda: self._post("list", "/requester/list", body))
        # A non-JSON or shapeless 200 is no evidence about any job: never read it as "none"
        # (an empty list counts towards resubmitting an in-doubt intent). Go sends an empty
        # slice as null.
        if not isinstance(reply.body, Mapping) or "jobs" not in reply.body:
            raise MalformedReply("list: the reply is not an object with 'jobs'")
        jobs = reply.body["jobs"]
        if jobs is None:
            return []
        if not isinstance(jobs, list):
            raise MalformedReply(f"list: 'jobs' is {type(jobs).__name__}, not a list")
        return [WireJob.from_wire(item) for item in jobs]

    async def state(self, job_id: str) -> str:
        body = json.dumps({"client_id": self.client_id, "job_id": job_id}).encode()
        reply = await self._retrying(lambda: self._post("states", "/requester/states", body))
        return _job_state(reply, "states")

    async def approve(
        self,
        node_url: str,
        job_id: str,
        *,
        should_bid: bool = True,
        reason: str = "",
    ) -> None:
        """Post a signed ``ModerateJobRequest`` to a compute node (docs/wire-legacy.md, Approve)."""
        url = node_url.rstrip("/") + self._prefix + "/compute/approve"
        await self.approve_at(url, job_id, should_bid=should_bid, reason=reason)

    async def approve_at(
        self, url: str, job_id: str, *, should_bid: bool = True, reason: str = ""
    ) -> None:
        """The same, to a full approve URL (the ``callback`` a probe request carried)."""
        payload = {
            "ClientID": self.client_id,
            "JobID": job_id,
            "Response": {"shouldBid": should_bid, "shouldWait": False, "reason": reason},
        }
        body = signed_body(self._signer, payload)
        await self._retrying(lambda: self._post("approve", url, body, absolute=True))

    # --- transport -----------------------------------------------------------------------

    async def _post_submit(self, body: bytes) -> _Reply:
        try:
            return await self._post("submit", "/requester/submit", body)
        except ServerError as exc:
            # A 5xx after the handler ran may come after the job was stored
            # (docs/wire-legacy.md, Submit).
            raise OutcomeUnknown(str(exc), status=exc.status, job_id=exc.job_id) from exc
        except _SentNoReply as exc:
            raise OutcomeUnknown(f"submit: reply lost ({exc})") from exc

    async def _post(self, operation: str, path: str, body: bytes, absolute: bool = False) -> _Reply:
        url = path if absolute else self._prefix + path
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        try:
            response = await self._http.post(url, content=body)
            status = response.status_code
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            # Name the endpoint: "cannot connect" alone leaves the operator guessing which.
            where = scrub_text(url) if absolute else self._endpoint
            raise Unreachable(f"{operation}: cannot connect to {where}: {type(exc).__name__}"
                              ) from exc
        except httpx.TransportError as exc:
            raise _SentNoReply(f"{operation}: {type(exc).__name__}") from exc
        finally:
            if self.on_request is not None:
                self.on_request(operation, status, loop.time() - started)
        if status == 200:  # no text copy: a list of 10,000 jobs is 11 MB of it
            return _Reply(status, _parse_body(response.content), "", response.headers)
        reply = _Reply(status, _parse_body(response.content), response.text, response.headers)
        error = _translate(reply, operation=operation)
        error.job_id = response.headers.get("X-Bacalhau-Job-ID")
        raise error

    async def _retrying(
        self,
        call: Callable[[], Awaitable[_Reply]],
        retry_on: tuple[type[Exception], ...] | None = None,
    ) -> _Reply:
        retry_on = retry_on or _RETRYABLE
        for attempt in range(self._retry.attempts):
            try:
                return await call()
            except retry_on:
                if attempt + 1 >= self._retry.attempts:
                    raise
                await asyncio.sleep(self._retry.delay(attempt, self._rng))
        raise AssertionError("unreachable")  # pragma: no cover


class _SentNoReply(ServerError):
    """The request went out but no complete reply came back (read error, timeout, reset)."""


def _parse_body(content: bytes) -> Any:
    try:
        return json.loads(content) if content.strip() else None
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
        return None


_RETRYABLE: tuple[type[Exception], ...] = (TransientError,)
_SAFE_TO_RESEND: tuple[type[Exception], ...] = (RateLimited, Unreachable)
