"""The dev requester: a local server with Bacalhau's legacy wire contract, for trials and tests.

Routes are served at the root and under ``/api/v1`` (docs/wire-legacy.md, Common behaviour); every
method is accepted, as the Go mux does. Replies are JSON sent as ``text/plain; charset=utf-8``;
errors of signed endpoints are the ``{"Code","Message","Details","Err"}`` envelope, those of
unsigned ones plain text. A compute-node side serves ``/compute/approve`` for jobs waiting for
approval.

Fault injection (for the reliability suite): ``error_rate`` answers a share of requests 500,
503 or 429 before doing anything; ``latency`` delays every request; ``fail_after_store`` stores
a submitted job and then answers 500; ``drop_rate`` stores it and then drops the connection;
``submit_latency`` stores it and answers only after that many seconds (past a client's timeout).

``bacalhau_version`` picks the emulated server: ``1.0`` is all of the above; ``1.6`` and ``1.9``
hand every request except ``/devnet/*`` to :mod:`reconciler.devnet.orchestrator`
(docs/wire-orchestrator.md), with the same fault flags.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from reconciler.devnet import checks
from reconciler.devnet.envelope import EnvelopeError, verify_envelope
from reconciler.devnet.jobs import Job, JobStore

if TYPE_CHECKING:
    from reconciler.devnet.orchestrator import OrchestratorApi

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PREFIX = "/api/v1"
PROFILES = ("1.0", "1.6", "1.9")
MAX_BODY = 10 * 1024 * 1024


@dataclass(frozen=True)
class DevConfig:
    """Settings of one dev requester (each is a ``reconciler dev-requester`` flag)."""

    job_duration: float = 5.0
    approver: str | None = None
    state_file: Path | None = None
    error_rate: float = 0.0
    latency: float = 0.0
    fail_after_store: float = 0.0
    drop_rate: float = 0.0
    seed: int | None = None
    probe_url: str | None = None
    submit_latency: float = 0.0
    #: Which Bacalhau to emulate: ``1.0`` (the legacy contract), ``1.6`` (orchestrator API,
    #: label mode, legacy routes 410) or ``1.9`` (orchestrator API, names, legacy routes 404).
    bacalhau_version: str = "1.0"
    #: Require ``Authorization: Bearer <key>`` (auth came in v1.7, so ``1.9`` only).
    api_key: str | None = None
    #: A second key with read capabilities only: writes with it are 403.
    read_only_api_key: str | None = None
    #: ``USER:PASSWORD`` accepted as ``Authorization: Basic`` (``1.9`` only).
    api_user: str | None = None
    #: Report this GitVersion instead of the profile's (e.g. ``v0.0.0-dev``, a dev build).
    git_version: str | None = None

    def __post_init__(self) -> None:
        if self.bacalhau_version not in PROFILES:
            raise ValueError(f"bacalhau_version: {self.bacalhau_version!r} is not one of "
                             f"{', '.join(PROFILES)}")
        for name in ("api_key", "read_only_api_key", "api_user"):
            key = getattr(self, name)
            if key is None:
                continue
            if self.bacalhau_version != "1.9":
                raise ValueError(f"{name}: credentials need bacalhau_version 1.9 (Bacalhau has "
                                 "auth from v1.7 on)")
            if name == "api_user":
                user, _, password = key.partition(":")
                if not user.isalnum() or not password:
                    raise ValueError("api_user: USER:PASSWORD, the user name alphanumeric")
            elif not 20 <= len(key) <= 255:
                raise ValueError(f"{name}: an API key is 20 to 255 characters")


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]
    drop: bool = False
    job_id: str | None = None  # for the request log only (the orchestrator API sends no header)


def json_reply(status: int, value: Any, **headers: str) -> Reply:
    return Reply(status, json.dumps(value).encode() + b"\n", headers)


def error_envelope(status: int, message: str, code: str = "", **headers: str) -> Reply:
    # http.Error writes the JSON text with a trailing newline as text/plain
    # (docs/wire-legacy.md, Where the published API description is wrong).
    envelope = {"Code": code or _default_code(status), "Message": message, "Details": None,
                "Err": message}
    return json_reply(status, envelope, **headers)


def plain(status: int, text: str, **headers: str) -> Reply:
    return Reply(status, text.encode() + b"\n", headers)


def _default_code(status: int) -> str:
    return {400: "error-bad-request", 401: "error-unauthorized", 404: "error-not-found"}.get(
        status, "error-unknown-server-error"
    )


class DevRequester:
    """The ASGI application. ``stats`` counts requests per route, for tests and benches."""

    def __init__(self, config: DevConfig) -> None:
        self.config = config
        legacy = config.bacalhau_version == "1.0"
        self.jobs = JobStore(
            job_duration=config.job_duration,
            waits_for_approval=bool(config.approver or config.probe_url),
            state_file=config.state_file if legacy else None,
        )
        self._probes: set[asyncio.Task[None]] = set()
        self.stats: Counter[str] = Counter()
        self._rng = random.Random(config.seed)
        self.orchestrator: OrchestratorApi | None = None
        if not legacy:
            from reconciler.devnet.orchestrator import OrchestratorApi

            self.orchestrator = OrchestratorApi(config, self.stats, self._rng)
        self._log = structlog.get_logger("devnet")
        self._routes: dict[str, Callable[[bytes, Scope], Reply]] = {
            "/requester/submit": self._submit,
            "/requester/cancel": self._cancel,
            "/requester/list": self._list,
            "/requester/states": self._states,
            "/requester/events": self._events,
            "/compute/approve": self._approve,
            "/version": self._version,
            "/livez": lambda body, scope: plain(200, "OK"),
            "/readyz": lambda body, scope: plain(200, "OK"),
            "/devnet/stats": lambda body, scope: json_reply(200, dict(self.stats)),
            # The list route without fault injection: how tests see what was recorded.
            "/devnet/jobs": self._list,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, on_shutdown=self._close)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        body = await _read_body(receive)
        reply = await self._handle(scope, body)
        await _send_reply(send, reply)
        self._log.info(
            "devnet.request",
            path=scope["path"],
            status=0 if reply.drop else reply.status,
            job_id=reply.headers.get("X-Bacalhau-Job-ID") or reply.job_id,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _close(self) -> None:
        self.jobs.close()
        if self.orchestrator is not None:
            self.orchestrator.close()

    async def _handle(self, scope: Scope, body: bytes | None) -> Reply:
        path = scope["path"]
        if self.orchestrator is not None:
            if path == "/devnet/stats":
                return json_reply(200, dict(self.stats))
            if path == "/devnet/jobs":
                # Every job of every namespace, without faults: how tests see what was stored.
                return json_reply(200, {"jobs": [j.to_wire() for j in self.orchestrator.jobs()]})
            return await self.orchestrator.handle(scope, body)
        route = path[len(PREFIX) :] if path.startswith(PREFIX + "/") else path
        handler = self._routes.get(route)
        if handler is None:
            return plain(404, "404 page not found")
        self.stats[route] += 1
        if route == "/requester/submit" and self.config.submit_latency and body is not None:
            reply = handler(body, scope)  # stored now; the reply comes late
            await asyncio.sleep(self.config.submit_latency)
            return reply
        if body is None:
            return error_envelope(400, "error unmarshalling envelope: http: request body too large")
        if self.config.latency:
            await asyncio.sleep(self.config.latency)
        fault = self._injected_fault(route)
        if fault is not None:
            return fault
        return handler(body, scope)

    def _injected_fault(self, route: str) -> Reply | None:
        if not route.startswith(("/requester", "/compute")):
            return None
        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            self.stats["faults"] += 1
            return self._rng.choice(
                [
                    error_envelope(500, "injected failure"),
                    plain(503, "Server Timeout!"),
                    plain(429, "You have reached maximum request limit."),
                ]
            )
        return None

    # --- requester routes ---------------------------------------------------------------

    def _submit(self, body: bytes, scope: Scope) -> Reply:
        if _has_header(scope, b"x-bacalhau-job-id"):
            return error_envelope(400, "job id must not be set by the client")
        try:
            envelope = verify_envelope(body)
        except EnvelopeError as exc:
            return error_envelope(400, str(exc))
        payload = envelope.payload
        raw_spec = checks.field(payload, "Spec")
        if raw_spec is None:
            # The real validator dereferences a nil Spec and the handler panics.
            return Reply(500, b"", {}, drop=True)
        try:
            spec = checks.decode_spec(raw_spec)
        except checks.DecodeError as exc:
            return error_envelope(400, f"error unmarshalling payload: {exc}")
        if not checks.field(payload, "APIVersion"):
            return error_envelope(400, "error validating request: APIVersion is empty")
        try:
            checks.validate(spec)
        except checks.Invalid as exc:
            return error_envelope(400, f"error validating request: {exc}")
        job = self.jobs.create(envelope.client_id, spec)
        if self.config.probe_url:
            host, port = scope.get("server") or ("127.0.0.1", 0)
            task = asyncio.get_running_loop().create_task(
                self._ask_probe(job, f"http://{host}:{port}{PREFIX}/compute/approve"))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
        return self._after_store(job)

    async def _ask_probe(self, job: Job, callback: str) -> None:
        """The compute node's external HTTP bid strategy (docs/wire-legacy.md, Approve)."""
        assert self.config.probe_url is not None
        body = {"node_id": "QmDevCompute", "job_id": job.job_id, "spec": job.spec,
                "callback": callback}
        try:
            async with httpx.AsyncClient(timeout=10) as http:
                reply = await http.post(self.config.probe_url, json=body)
        except httpx.HTTPError:
            self._settle(job, False, "job selection probe unreachable")
            return
        if reply.status_code >= 400:
            self._settle(job, False, f"job selection probe answered {reply.status_code}")
        elif reply.headers.get("content-type") != "application/json":
            self._settle(job, True, "probe gave no JSON answer: bid")
        else:
            answer = _loads_object(reply.content)
            if not answer.get("shouldWait"):
                self._settle(job, bool(answer.get("shouldBid")), str(answer.get("reason") or ""))

    def _settle(self, job: Job, should_bid: bool, reason: str) -> None:
        if job.state == "New" and job.execution == "AskForBid":
            self.jobs.moderate(job, should_bid, reason)

    def _after_store(self, job: Job) -> Reply:
        header = {"X-Bacalhau-Job-ID": job.job_id}
        if self.config.fail_after_store and self._rng.random() < self.config.fail_after_store:
            self.stats["fail_after_store"] += 1
            return error_envelope(500, "failed to create evaluation: injected", **header)
        if self.config.drop_rate and self._rng.random() < self.config.drop_rate:
            self.stats["dropped"] += 1
            return Reply(200, b"", header, drop=True)
        return json_reply(200, {"job": job.to_wire()}, **header)

    def _cancel(self, body: bytes, scope: Scope) -> Reply:
        try:
            envelope = verify_envelope(body)
        except EnvelopeError as exc:
            return error_envelope(400, str(exc))
        job_id = str(checks.field(envelope.payload, "JobID") or "")
        job = self.jobs.get(job_id)
        headers = {"X-Bacalhau-Client-ID": envelope.client_id, "X-Bacalhau-Job-ID": job_id}
        if job is None:
            return error_envelope(404, f"missing job: Job not found. ID: {job_id}",
                                  "error-unknown-server-error", **headers)
        if job.client_id != envelope.client_id:
            return error_envelope(
                401,
                f"mismatched ClientIDs for cancel, existing job: {job.client_id} and cancel "
                f"request: {envelope.client_id}",
                **headers,
            )
        if job.state == "Completed":
            return error_envelope(500, "cannot cancel job in state Completed", **headers)
        if job.state == "Error":
            return error_envelope(
                500,
                f"job {job.job_id} is in terminal state Error and cannot transition to Cancelled",
                **headers,
            )
        if job.state != "Cancelled":
            self.jobs.cancel(job, str(checks.field(envelope.payload, "Reason") or ""))
        return json_reply(200, {"state": job.state_wire()}, **headers)

    def _list(self, body: bytes, scope: Scope) -> Reply:
        try:
            request = json.loads(body or b"{}")
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            return plain(400, f"json: {exc}")
        wanted_id = str(request.get("id") or "")
        if wanted_id:
            job = self.jobs.get(wanted_id)
            if job is None:
                return json_reply(400, {"Code": "error-job-not-found",
                                        "Message": f"Job not found. ID: {wanted_id}",
                                        "Details": {"id": wanted_id}, "Err": None})
            jobs = [job]
        else:
            jobs = _filter_jobs(self.jobs.all(), request)
        return json_reply(200, {"jobs": [{"Job": j.to_wire(), "State": j.state_wire()}
                                         for j in jobs]})

    def _states(self, body: bytes, scope: Scope) -> Reply:
        job_id = str(_loads_object(body).get("job_id") or "")
        job = self.jobs.get(job_id)
        if job is None:
            return plain(500, f"Job not found. ID: {job_id}")
        return json_reply(200, {"state": job.state_wire()}, **{"X-Bacalhau-Job-ID": job_id})

    def _events(self, body: bytes, scope: Scope) -> Reply:
        job_id = str(_loads_object(body).get("job_id") or "")
        job = self.jobs.get(job_id)
        if job is None:
            return plain(500, f"job not found: {job_id}")
        return json_reply(200, {"events": job.history})

    def _version(self, body: bytes, scope: Scope) -> Reply:
        info = {"major": "1", "minor": "0", "gitversion": "v1.0.3-dev", "gitcommit": "devnet",
                "builddate": "2023-08-07T00:00:00Z", "goos": "linux", "goarch": "amd64"}
        return json_reply(200, {"build_version_info": info})

    # --- compute-node route -------------------------------------------------------------

    def _approve(self, body: bytes, scope: Scope) -> Reply:
        try:
            envelope = verify_envelope(body)
        except EnvelopeError as exc:
            return error_envelope(400, str(exc))
        if not self.config.approver or envelope.client_id != self.config.approver:
            return error_envelope(401, "approval submitted by unknown client")
        job_id = str(checks.field(envelope.payload, "JobID") or "")
        job = self.jobs.get(job_id)
        if job is None or job.execution != "AskForBid" or job.state != "New":
            return error_envelope(500, f"no executions found for job: {job_id}")
        response = checks.field(envelope.payload, "Response") or {}
        if not response.get("shouldWait"):
            self.jobs.moderate(job, bool(response.get("shouldBid")), str(response.get("reason")
                                                                         or ""))
        return Reply(200, b"", {})


def _filter_jobs(jobs: list[Job], request: dict[str, Any]) -> list[Job]:
    """client_id, include_tags (any), exclude_tags, max_jobs, sort_by, sort_reverse."""
    client_id = request.get("client_id") or ""
    if client_id and not request.get("return_all"):
        jobs = [j for j in jobs if j.client_id == client_id]
    include = set(request.get("include_tags") or [])
    if include:
        jobs = [j for j in jobs if include.intersection(j.annotations)]
    exclude = set(request.get("exclude_tags") or [])
    if exclude:
        jobs = [j for j in jobs if not exclude.intersection(j.annotations)]
    limit = request.get("max_jobs") or 0
    if isinstance(limit, int) and limit > 0:
        jobs = jobs[:limit]  # limit, then sort: not "the newest N" (docs/wire-legacy.md, List)
    if request.get("sort_by") == "id":
        jobs.sort(key=lambda j: j.job_id, reverse=bool(request.get("sort_reverse")))
    else:
        jobs.sort(key=lambda j: int(j.created), reverse=bool(request.get("sort_reverse")))
    return jobs


def _loads_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _has_header(scope: Scope, name: bytes) -> bool:
    return any(key.lower() == name for key, _ in scope.get("headers", []))


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(k.lower().encode(), v.encode()) for k, v in reply.headers.items()]
    if not any(key == b"content-type" for key, _ in headers):
        headers.insert(0, (b"content-type", b"text/plain; charset=utf-8"))
    if reply.drop:
        # Promise a body, send none, return: the server closes the connection mid-reply, so
        # the client sees the request sent and no reply, as after a crash or a reset.
        headers.append((b"content-length", b"1024"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        return
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


async def _lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
