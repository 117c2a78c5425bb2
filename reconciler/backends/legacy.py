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
from typing import Any, Protocol

import httpx

from reconciler.backends.signing import Signer, signed_body

__all__ = [
    "AlreadyTerminal",
    "ApiClient",
    "InvalidRequest",
    "JobInfo",
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
]

class RequesterError(Exception):
    """Base of every error raised by this module."""

    def __init__(
        self, message: str, *, status: int | None = None, job_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        #: X-Bacalhau-Job-ID of the reply, when the server sent one.
        self.job_id = job_id


class PermanentError(RequesterError):
    pass


class InvalidRequest(PermanentError):
    pass


class NotAuthorized(PermanentError):
    pass


class NotFound(PermanentError):
    pass


class AlreadyTerminal(PermanentError):
    pass


class NoExecutions(PermanentError):
    pass


class TransientError(RequesterError):
    pass


class RateLimited(TransientError):
    pass


class ServerError(TransientError):
    pass


class Unreachable(TransientError):
    pass


class OutcomeUnknown(RequesterError):
    """A submit may or may not have created a job."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True)
class JobInfo:
    """One job as the requester lists it."""

    job_id: str
    state: str
    client_id: str
    annotations: tuple[str, ...]
    created_at: str = ""  # only what the reconciler needs: a list of 10,000 jobs is 45 MB

    @classmethod
    def from_wire(cls, item: Mapping[str, Any]) -> JobInfo:
        job = item.get("Job") or {}
        metadata = job.get("Metadata") or {}
        spec = job.get("Spec") or {}
        state = item.get("State") or {}
        return cls(
            job_id=str(metadata.get("ID", "")),
            state=str(state.get("State", "Undefined")),
            client_id=str(metadata.get("ClientID", "")),
            annotations=tuple(spec.get("Annotations") or ()),
            created_at=str(metadata.get("CreatedAt", "")),
        )


class Requester(Protocol):
    """What the executor needs from a backend; a newer orchestrator API can implement it too."""

    @property
    def client_id(self) -> str: ...
    async def submit(self, spec: Mapping[str, Any]) -> str: ...
    async def cancel(self, job_id: str, reason: str) -> str: ...
    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[JobInfo]: ...
    async def state(self, job_id: str) -> str: ...


@dataclass
class _Reply:
    status: int
    body: Any
    text: str
    headers: httpx.Headers


def _error_message(reply: _Reply) -> str:
    if isinstance(reply.body, Mapping) and "Message" in reply.body:
        return str(reply.body["Message"])
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
        job = (reply.body or {}).get("job") if isinstance(reply.body, Mapping) else None
        job_id = ((job or {}).get("Metadata") or {}).get("ID")
        if not job_id:
            raise OutcomeUnknown("submit: 200 without a job id", status=reply.status)
        return str(job_id)

    async def cancel(self, job_id: str, reason: str) -> str:
        """Cancel one of our jobs; returns the state after the cancel."""
        payload = {"ClientID": self.client_id, "JobID": job_id, "Reason": reason}
        body = signed_body(self._signer, payload)
        reply = await self._retrying(lambda: self._post("cancel", "/requester/cancel", body))
        return str(((reply.body or {}).get("state") or {}).get("State", "Undefined"))

    async def list_jobs(
        self, *, include_tags: Sequence[str] = (), job_id: str | None = None
    ) -> list[JobInfo]:
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
        jobs = (reply.body or {}).get("jobs") if isinstance(reply.body, Mapping) else None
        return [JobInfo.from_wire(item) for item in jobs or []]

    async def state(self, job_id: str) -> str:
        body = json.dumps({"client_id": self.client_id, "job_id": job_id}).encode()
        reply = await self._retrying(lambda: self._post("states", "/requester/states", body))
        return str(((reply.body or {}).get("state") or {}).get("State", "Undefined"))

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
            raise Unreachable(f"{operation}: cannot connect: {type(exc).__name__}") from exc
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
    except ValueError:
        return None


_RETRYABLE: tuple[type[Exception], ...] = (TransientError,)
_SAFE_TO_RESEND: tuple[type[Exception], ...] = (RateLimited, Unreachable)
