"""Bacalhau's orchestrator API (v1.5+) as a :class:`reconciler.ports.Backend`, over httpx.

The wire rules relied on are docs/wire-orchestrator.md (sections 2, 3, 7, 8, 9); the choices
are docs/design.md, "The orchestrator backend". In short:

- every job we send carries the labels ``managed-by=reconciler``, ``reconciler-instance`` and
  ``reconciler-uid=<uid of its intent>`` and the spec hash in ``Meta``; jobs are found by a
  label selector (``GET /jobs?namespace=..&labels=..``, paged, namespace and labels resent on
  every page);
- **name mode** (v1.8+): ``Job.Name`` is the manifest's name, so a PUT of a changed manifest
  updates its job in place (same id, version + 1): :attr:`OrchestratorBackend.updates_in_place`
  tells the executor a replace needs no cancel. Before each PUT the name is looked up: a job
  of that name without our labels is a conflict, never touched. The uid label differs at every
  submit (how an in-doubt PUT is resolved), and ``Force: true`` is sent exactly when that
  lookup found our job of the same spec hash ended (a re-added or resubmitted unchanged
  manifest), so it runs again even on a server that ignored label-only differences; every
  other PUT says ``Force: false``: a PUT seen free by a recent listing (no lookup of its own),
  and the first PUT of a name after an ambiguous one (503, dropped, timed out), which follows
  the executor's lookup by uid. A PUT is resent only when it surely never arrived (429, no
  connection);
- **label mode** (v1.5 to v1.7): every PUT creates a job; the legacy protocol otherwise;
- errors are matched by status plus message prefix (the ``Code`` is empty for several that
  matter) and mapped onto :mod:`reconciler.backends.errors`; 401/403 on any route are
  :class:`CredentialsRejected` naming the setting to fix (never the secret), never retried: a
  configuration error that stops the pass and the daemon (exit 78).

Bodies are sent as bytes, so httpx sets ``Content-Length`` (a chunked body fails the server's
authoriser); no ``X-Bacalhau-Git-Version`` header is sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import httpx

from reconciler.backends.errors import (
    AlreadyTerminal,
    CredentialsRejected,
    InvalidRequest,
    MalformedReply,
    NotFound,
    OutcomeUnknown,
    PermanentError,
    RateLimited,
    RequesterError,
    ServerError,
    TransientError,
    Unreachable,
)
from reconciler.backends.legacy import RetryPolicy
from reconciler.backends.transport import cheapen
from reconciler.domain.jobspec import hygienic
from reconciler.domain.manifest import LoadError, Manifest
from reconciler.domain.translate import to_orchestrator
from reconciler.events import clean, scrub_text
from reconciler.ports import MESSAGE_LIMIT, JobInfo, JobPhase

Mode = Literal["legacy", "label", "name"]
JOBS = "/api/v1/orchestrator/jobs"
VERSION_PATH = "/api/v1/agent/version"
MANAGED_BY = "managed-by"
MANAGER = "reconciler"
INSTANCE_LABEL = "reconciler-instance"
UID_LABEL = "reconciler-uid"
SPEC_META = "reconciler/spec"
#: How long a name a full listing found free is trusted to stay free, so that the PUT of a
#: cold sync needs no lookup of its own (docs/design.md, "The orchestrator backend").
ABSENT_TTL = 60.0
#: How long after an ambiguous PUT of a name its next PUT is never forced (that PUT follows
#: the executor's uid lookups: docs/design.md, "The orchestrator backend", Force).
IN_DOUBT_TTL = 600.0
#: A job in one of these states has ended: a PUT of the same spec must force it to run again.
TERMINAL_STATES = frozenset({"Completed", "Failed", "Stopped"})
#: Translations kept (a pass's worth; cleared when full).
TRANSLATIONS_KEPT = 20_000
#: Uids per label-selector lookup (``reconciler-uid in (...)``: 33 bytes each in the URL).
UID_BATCH = 100
PAGE = 500
JOB_PHASES = {
    "Pending": JobPhase.RUNNING,
    "Queued": JobPhase.RUNNING,
    "Running": JobPhase.RUNNING,
    "Completed": JobPhase.COMPLETED,
    "Failed": JobPhase.FAILED,
    "Stopped": JobPhase.CANCELLED,
}
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?$")


class Conflict(PermanentError):
    """A job of the manifest's name exists and is not ours: held, reported, never touched."""


class _NoChanges(PermanentError):
    """500 ``no changes detected``: the stored job is what we sent (up to date)."""


class _NameTaken(PermanentError):
    """409 ``job name ... already exists``: a concurrent create won; look the name up again."""


# --- versions and modes ----------------------------------------------------------------------


def mode_of(git_version: str | None) -> Mode:
    """The backend mode for a server's ``GitVersion`` (None: no version route, a legacy-era
    server). Development builds (``v0.0.0-...``) count as the newest (wire-orchestrator.md 1)."""
    if git_version is None:
        return "legacy"
    match = _VERSION.match(git_version.strip())
    if match is None:
        return "legacy"
    version = tuple(int(part) for part in match.groups())
    if version[:2] == (0, 0) or version >= (1, 8, 0):
        return "name"
    if version >= (1, 5, 0):
        return "label"
    return "legacy"


async def detect_version(
    endpoint: str, *, wait: float = 10.0, transport: httpx.AsyncBaseTransport | None = None
) -> str | None:
    """``GitVersion`` of the server (``GET /api/v1/agent/version``, never authenticated), or
    None for a legacy-era server (404, or no version in the reply). Raises
    :class:`Unreachable` or :class:`ServerError` when it cannot tell, and
    :class:`CredentialsRejected` on a 401/403 (the route needs none: a configuration error)."""
    where = scrub_text(endpoint.rstrip("/"))
    async with httpx.AsyncClient(base_url=endpoint.rstrip("/"), timeout=wait,
                                 transport=transport) as http:
        try:
            response = await http.get(VERSION_PATH)
        except httpx.TransportError as exc:
            raise Unreachable(f"version: cannot reach {where}: {type(exc).__name__}") from exc
    if response.status_code in (404, 405, 410):
        return None
    if response.status_code in (401, 403):
        # Bacalhau answers this route without credentials (docs/wire-orchestrator.md 8), so
        # something in front of it wants them: no backend could work there either.
        raise CredentialsRejected(
            f"version: HTTP {response.status_code} from {where} on {VERSION_PATH}, which "
            "Bacalhau serves without credentials (a proxy in front of it asking for some?): "
            "check endpoint; a configuration error", status=response.status_code,
            credential="none", endpoint=where,
            hint="check endpoint: Bacalhau serves the version route without credentials")
    if response.status_code != 200:
        raise ServerError(f"version: HTTP {response.status_code} from {where}",
                          status=response.status_code)
    body = _parse_body(response.content)
    version = body.get("GitVersion") if isinstance(body, Mapping) else None
    return version if isinstance(version, str) and version else None


# --- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An API key (Bearer) or a user name and password (Basic). ``repr`` shows neither."""

    api_key: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def header(self) -> str | None:
        if self.api_key:
            return "Bearer " + self.api_key
        if self.username is not None and self.password is not None:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            return "Basic " + token
        return None

    @property
    def kind(self) -> str:
        """For events and status: which scheme, never the secret."""
        if self.api_key:
            return "api-key"
        if self.username is not None:
            return "basic"
        return "none"


# --- the wire client -------------------------------------------------------------------------


@dataclass
class _Reply:
    status: int
    body: Any
    text: str


def _parse_body(content: bytes) -> Any:
    try:
        return json.loads(content) if content.strip() else None
    except (ValueError, RecursionError):
        return None


def _message(reply: _Reply) -> str:
    if isinstance(reply.body, Mapping) and isinstance(reply.body.get("Message"), str):
        return str(reply.body["Message"])[:500]
    if isinstance(reply.body, str):  # the legacy routes' 410 is a JSON string
        return reply.body[:500]
    return reply.text.strip()[:500]


#: What to fix when the server refuses the credential, by the kind that was sent.
_FIX = {
    "api-key": "check api_key (config or RECONCILER_API_KEY), $CREDENTIALS_DIRECTORY/api-key "
               "or BACALHAU_API_KEY",
    "basic": "check api_username + api_password (config or RECONCILER_API_USERNAME + "
             "RECONCILER_API_PASSWORD) or BACALHAU_API_USERNAME + BACALHAU_API_PASSWORD",
    "none": "the server requires credentials: set api_key (or $CREDENTIALS_DIRECTORY/api-key, "
            "BACALHAU_API_KEY) or api_username + api_password",
}


def _mask(text: str, credentials: Credentials) -> str:
    """``text`` with the API key, the password and the Basic token of ``credentials``
    replaced by ``[secret]`` (server text may echo what it was sent)."""
    header = credentials.header() or ""
    for secret in (credentials.api_key, credentials.password, header.partition(" ")[2]):
        if secret:
            text = text.replace(secret, "[secret]")
    return text


def rejected(operation: str, status: int, text: str, credentials: Credentials,
             endpoint: str) -> CredentialsRejected:
    """401/403: the credential (not one job) is refused, on whatever route. A configuration
    error: the message names the settings to fix, never the secret (the server's own text is
    scrubbed of it too, should it ever echo it)."""
    if status == 403:
        hint = (f"the {credentials.kind} credential was accepted but lacks the capability "
                "for this request (read:job to list, write:job to submit or stop): grant it "
                "on the server or use another one; " + _FIX[credentials.kind])
    else:
        hint = _FIX[credentials.kind]
    text = _mask(text, credentials)
    where = f" from {endpoint}" if endpoint else ""
    return CredentialsRejected(
        f"{operation}: HTTP {status}{where}: {text} ({hint}; a configuration error: nothing "
        "more is sent until it is fixed)", status=status, credential=credentials.kind,
        endpoint=endpoint, hint=hint)


def _translate(reply: _Reply, operation: str, credentials: Credentials | None = None,
               endpoint: str = "") -> RequesterError:
    """Status plus message prefix (docs/wire-orchestrator.md section 7)."""
    status, text = reply.status, _message(reply)
    message = f"{operation}: HTTP {status}: {text}"
    if status in (401, 403):
        return rejected(operation, status, text, credentials or Credentials(), endpoint)
    if status == 400:
        return InvalidRequest(message, status=status)
    if status == 404:
        return NotFound(message, status=status)
    if status == 409 and text.startswith("job name"):
        return _NameTaken(message, status=status)
    if status == 410:
        return PermanentError(message + " (a legacy route: use the legacy backend)",
                              status=status)
    if status == 429:
        return RateLimited(message, status=status)
    if status == 500 and text.startswith("no changes detected"):
        return _NoChanges(message, status=status)
    if status == 500 and (text.startswith("cannot stop job in state")
                          or "is in terminal state" in text):
        return AlreadyTerminal(message, status=status)
    if status >= 500:
        return ServerError(message, status=status)
    return PermanentError(message, status=status)


class _SentNoReply(ServerError):
    """The request went out but no complete reply came back."""


class OrchestratorClient:
    """An async client for the job routes of one orchestrator, in one namespace."""

    def __init__(
        self,
        endpoint: str,
        *,
        namespace: str = "default",
        credentials: Credentials | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_connections: int = 16,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.namespace = namespace
        self._endpoint = scrub_text(endpoint.rstrip("/"))
        self._retry = retry or RetryPolicy()
        self._rng = rng or random.Random()
        headers = {"Content-Type": "application/json"}
        self._credentials = credentials or Credentials()
        auth = self._credentials.header()
        if auth:
            headers["Authorization"] = auth
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=16)
        self._http = httpx.AsyncClient(
            base_url=endpoint.rstrip("/"), timeout=timeout, limits=limits,
            transport=transport, headers=headers)
        if transport is None:  # not transport=: httpx would drop the environment's proxies
            cheapen(self._http)
        self.on_request: Callable[[str, int | None, float], None] | None = None
        #: The jobs route, joined to the base URL and parsed once: given a path, httpx does
        #: that at every request (25 µs of a PUT's ~1 ms of CPU: docs/performance.md).
        self._jobs_url = self._http.build_request("PUT", JOBS).url

    async def __aenter__(self) -> OrchestratorClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def put_job(self, job: Mapping[str, Any], *, force: bool = False) -> str:
        """PUT a job; its id. :class:`OutcomeUnknown` when it may or may not be stored.

        Only a request that surely never reached the handler is sent again (429, no
        connection): after anything ambiguous the caller looks the job up instead, so a
        ``Force`` is never repeated blindly."""
        body = json.dumps({"Job": job, "Force": force}).encode()
        try:
            reply = await self._retrying(lambda: self._send("submit", "PUT", self._jobs_url,
                                                            body=body),
                                         retry_on=(RateLimited, Unreachable))
        except _SentNoReply as exc:
            raise OutcomeUnknown(f"submit: reply lost ({exc})") from exc
        except ServerError as exc:
            raise OutcomeUnknown(str(exc), status=exc.status) from exc
        job_id = reply.body.get("JobID") if isinstance(reply.body, Mapping) else None
        if not isinstance(job_id, str) or not job_id:
            raise OutcomeUnknown("submit: 200 without a JobID", status=reply.status)
        return job_id

    async def get_job(self, ref: str) -> dict[str, Any] | None:
        """One job by id or (v1.8+) name in our namespace; None when unknown."""
        try:
            reply = await self._retrying(lambda: self._send(
                "get", "GET", f"{JOBS}/{ref}", params={"namespace": self.namespace}))
        except NotFound:
            return None
        job = reply.body.get("Job") if isinstance(reply.body, Mapping) else None
        if not isinstance(job, dict):
            raise MalformedReply("get: the reply has no Job object")
        return job

    async def list_jobs(self, selector: str) -> list[dict[str, Any]]:
        """Every job of our namespace matching a label selector, page by page; namespace and
        labels are resent with every token (a token does not carry them)."""
        jobs: list[dict[str, Any]] = []
        token = ""
        while True:
            params = {"namespace": self.namespace, "limit": str(PAGE)}
            if selector:
                params["labels"] = selector
            if token:
                params["next_token"] = token
            reply = await self._retrying(lambda p=params: self._send(  # type: ignore[misc]
                "list", "GET", JOBS, params=p))
            body = reply.body
            if not isinstance(body, Mapping) or not isinstance(body.get("Items") or [], list):
                raise MalformedReply("list: the reply is not an object with 'Items'")
            for item in body.get("Items") or []:
                if not isinstance(item, dict) or not isinstance(item.get("ID"), str):
                    raise MalformedReply("list: an item without an ID")
                jobs.append(item)
            token = body.get("NextToken") or ""
            if not isinstance(token, str) or not token:
                return jobs

    def masked(self, text: str) -> str:
        """``text`` with the API key, the password and the Basic token sent by this client
        replaced by ``[secret]``."""
        return _mask(text, self._credentials)

    async def check_access(self) -> None:
        """One page of one job of ours: raises :class:`CredentialsRejected` when the server
        refuses the credentials (``reconciler status``)."""
        await self._send("list", "GET", JOBS, params={
            "namespace": self.namespace, "limit": "1", "labels": f"{MANAGED_BY}={MANAGER}"})

    async def stop(self, job_id: str, reason: str) -> None:
        """Stop a job; the reason travels in the JSON body (a ``?reason=`` is never read)."""
        body = json.dumps({"reason": reason, "Namespace": self.namespace}).encode()
        await self._retrying(lambda: self._send(
            "cancel", "DELETE", f"{JOBS}/{job_id}", params={"namespace": self.namespace},
            body=body))

    async def _send(self, operation: str, method: str, path: str | httpx.URL, *,
                    params: Mapping[str, str] | None = None, body: bytes | None = None
                    ) -> _Reply:
        loop = asyncio.get_running_loop()
        started = loop.time()
        status: int | None = None
        try:
            # Bytes content: httpx sends Content-Length, never a chunked body.
            response = await self._http.request(method, path, params=params, content=body)
            status = response.status_code
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise Unreachable(f"{operation}: cannot connect to {self._endpoint}: "
                              f"{type(exc).__name__}") from exc
        except httpx.TransportError as exc:
            raise _SentNoReply(f"{operation}: {type(exc).__name__}") from exc
        finally:
            if self.on_request is not None:
                self.on_request(operation, status, loop.time() - started)
        reply = _Reply(status, _parse_body(response.content),
                       "" if status == 200 else response.text)
        if status == 200:
            return reply
        raise _translate(reply, operation, self._credentials, self._endpoint)

    async def _retrying(self, call: Callable[[], Awaitable[_Reply]],
                        retry_on: tuple[type[Exception], ...] = (TransientError,)) -> _Reply:
        for attempt in range(self._retry.attempts):
            try:
                return await call()
            except retry_on:
                if attempt + 1 >= self._retry.attempts:
                    raise
                await asyncio.sleep(self._retry.delay(attempt, self._rng))
        raise AssertionError("unreachable")  # pragma: no cover


# --- the backend ---------------------------------------------------------------------------


def _text(job: Mapping[str, Any], *keys: str) -> str:
    value: Any = job
    for key in keys:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, str) else ""


def _labels(job: Mapping[str, Any]) -> Mapping[str, Any]:
    labels = job.get("Labels")
    return labels if isinstance(labels, Mapping) else {}


def _version(job: Mapping[str, Any] | None) -> int | None:
    version = job.get("Version") if job is not None else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def job_info(job: Mapping[str, Any]) -> JobInfo:
    state = _text(job, "State", "StateType") or "Undefined"
    created = job.get("CreateTime")
    return JobInfo(
        _text(job, "ID"), JOB_PHASES.get(state, JobPhase.UNKNOWN), state,
        f"{created:020d}" if isinstance(created, int) else "",
        uid=str(_labels(job).get(UID_LABEL) or ""),
        spec_hash=_text(job, "Meta", SPEC_META), version=_version(job),
        message=_state_message(job), job_type=_text(job, "Type").lower())


def _state_message(job: Mapping[str, Any]) -> str:
    """``State.Message``: server text (a stop reason is anyone's), bounded and scrubbed before
    it is stored or shown, as error messages are (docs/design.md, "Wire contract")."""
    message = _text(job, "State", "Message")
    return clean(message, MESSAGE_LIMIT) if message else ""


class OrchestratorBackend:
    """:class:`reconciler.ports.Backend` over an :class:`OrchestratorClient` (not owned)."""

    def __init__(self, client: OrchestratorClient, *, mode: Mode, version: str = "",
                 instance: str = "default") -> None:
        if mode == "legacy":
            raise ValueError("an orchestrator backend runs in name or label mode")
        if not _LABEL_VALUE.match(instance):
            raise ValueError(f"instance: {instance!r} is not a label value "
                             "(<= 63 of [A-Za-z0-9._-], alphanumeric at both ends)")
        self.client = client
        self.mode: Mode = mode
        self.version = version
        self.instance = instance
        self._version_tuple = _version_tuple(version)
        #: Names a listing of the whole namespace just found free (name mode), and when.
        self._free: dict[str, float] = {}
        #: Names whose last PUT was ambiguous (503, dropped, timed out), and when.
        self._in_doubt: dict[str, float] = {}
        #: Translations by manifest: the executor asks refusal() then submit() of each.
        self._translated: dict[tuple[str, str, str, int], dict[str, Any] | LoadError] = {}

    @property
    def identity(self) -> str:
        return f"orchestrator:{self.client.namespace}/{self.instance}"

    @property
    def updates_in_place(self) -> bool:
        """Name mode: a changed manifest is a PUT of the same name (same id, version + 1)."""
        return self.mode == "name"

    def refusal(self, manifest: Manifest) -> str | None:
        """Why this manifest cannot run here (a V1beta1 field with no counterpart), naming
        the file and the field; checked before anything is sent or cancelled."""
        outcome = self._translate(manifest)
        return str(outcome) if isinstance(outcome, LoadError) else None

    def _translate(self, manifest: Manifest) -> dict[str, Any] | LoadError:
        key = (manifest.name, manifest.spec_hash, manifest.path, manifest.line)
        outcome = self._translated.get(key)
        if outcome is None:
            if len(self._translated) >= TRANSLATIONS_KEPT:
                self._translated.clear()
            outcome = to_orchestrator(manifest)
            if not isinstance(outcome, LoadError):
                # Made sendable once, here: to_orchestrator returns a new dict at each call,
                # so hygienic() need not copy it first.
                outcome = hygienic(outcome, self._version_tuple, copy=False)
            self._translated[key] = outcome
        return outcome

    def _info(self, job: Mapping[str, Any]) -> JobInfo:
        """:func:`job_info`, with our own credential masked in the state message: a message
        is anyone's text (a stop reason), recorded and shown by `status`."""
        info = job_info(job)
        if info.message:
            message = self.client.masked(info.message)
            if message != info.message:
                info = replace(info, message=message)
        return info

    def _ours(self, job: Mapping[str, Any]) -> bool:
        labels = _labels(job)
        return labels.get(MANAGED_BY) == MANAGER and labels.get(INSTANCE_LABEL) == self.instance

    def _selector(self, *more: str) -> str:
        return ",".join([f"{MANAGED_BY}={MANAGER}", f"{INSTANCE_LABEL}={self.instance}", *more])

    def job_of(self, manifest: Manifest, uid: str) -> dict[str, Any]:
        outcome = self._translate(manifest)
        if isinstance(outcome, LoadError):
            raise InvalidRequest(str(outcome))
        # A shallow copy: the keys set below get new values; the nested ones are the cached
        # translation's, only ever read (encoded) after this.
        job = dict(outcome)
        job["Name"] = manifest.name
        job["Namespace"] = self.client.namespace
        job["Labels"] = {**(job.get("Labels") or {}), MANAGED_BY: MANAGER,
                         INSTANCE_LABEL: self.instance, UID_LABEL: uid}
        job["Meta"] = {**(job.get("Meta") or {}), SPEC_META: manifest.spec_hash}
        return job

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        job = self.job_of(manifest, uid)
        if self.mode == "label":
            return JobInfo(await self.client.put_job(job), JobPhase.RUNNING, "Pending", uid=uid)
        free_since = self._free.pop(manifest.name, None)
        now = time.monotonic()
        self._in_doubt = {n: t for n, t in self._in_doubt.items() if now - t < IN_DOUBT_TTL}
        # Used up by the PUT below, not here: a submit that fails at its name lookup sends
        # no PUT, and the next one is still the first after the doubt.
        after_doubt = manifest.name in self._in_doubt
        for _ in range(3):  # a lost create race (409) is looked up again
            looked_up = free_since is None or now - free_since >= ABSENT_TTL
            # seen free moments ago: a cold sync sends the PUT alone
            existing = await self._by_name(manifest.name) if looked_up else None
            free_since = None
            if existing is not None and not self._ours(existing):
                raise Conflict(
                    f"{manifest.path}: a job named {manifest.name} ({_text(existing, 'ID')}) "
                    f"exists in namespace {self.client.namespace} without the labels "
                    f"{MANAGED_BY}={MANAGER},{INSTANCE_LABEL}={self.instance}: not ours, held "
                    "and never touched (rename the manifest or remove that job)")
            # Force only on what this PUT's own lookup saw: our job of this very spec, ended
            # (a re-added or resubmitted unchanged manifest), so it runs again even were the
            # fresh uid label no difference to the server; never on a cached listing, never
            # on the first PUT after an ambiguous one (docs/design.md, Force).
            force = looked_up and not after_doubt and self._ended_same(existing, manifest)
            self._in_doubt.pop(manifest.name, None)
            try:
                job_id = await self.client.put_job(job, force=force)
            except _NameTaken:
                continue
            except OutcomeUnknown:
                self._in_doubt[manifest.name] = time.monotonic()
                raise
            except _NoChanges:
                assert existing is not None  # only an update can be "no changes"
                return self._info(existing)
            # The reply has no version (wire-orchestrator.md 3.1): a create is version 1, an
            # update the looked-up version + 1; None (observed later) when the lookup was
            # skipped or had none.
            version = _version(existing) if existing is not None else 0 if looked_up else None
            version = None if version is None else version + 1
            return JobInfo(job_id, JobPhase.RUNNING, "Pending", uid=uid, version=version)
        raise OutcomeUnknown(f"submit: the name {manifest.name} was taken concurrently again "
                             "and again")

    @staticmethod
    def _ended_same(existing: Mapping[str, Any] | None, manifest: Manifest) -> bool:
        return (existing is not None
                and _text(existing, "Meta", SPEC_META) == manifest.spec_hash
                and _text(existing, "State", "StateType") in TERMINAL_STATES)

    async def _by_name(self, name: str) -> dict[str, Any] | None:
        job = await self.client.get_job(name)
        # v1.8+ falls back to an id prefix: only a job of exactly this name counts.
        if job is None or job.get("Name") != name:
            return None
        if (job.get("Namespace") or "default") != self.client.namespace:
            return None
        return job

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        found: dict[str, list[JobInfo]] = {}
        wanted = [uid for uid in uids if _LABEL_VALUE.match(uid)]
        for start in range(0, len(wanted), UID_BATCH):
            batch = wanted[start : start + UID_BATCH]
            selector = self._selector(f"{UID_LABEL} in ({','.join(batch)})")
            for job in await self.client.list_jobs(selector):
                info = self._info(job)
                if info.uid in batch:
                    found.setdefault(info.uid, []).append(info)
        return found

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        """Our jobs of these names. In name mode the whole namespace is listed, foreign jobs
        too, so the names it finds free can be PUT without a lookup each for a few seconds
        (``ABSENT_TTL``): the executor asks this before the submits of a cold sync."""
        wanted = set(names)
        if not wanted:
            return {}
        found: dict[str, list[JobInfo]] = {}
        taken: set[str] = set()
        started = time.monotonic()
        whole = self.mode == "name"
        for job in await self.client.list_jobs("" if whole else self._selector()):
            name = _text(job, "Name")
            if name not in wanted:
                continue
            taken.add(name)
            if self._ours(job):
                found.setdefault(name, []).append(self._info(job))
        if whole:
            self._free = {n: t for n, t in self._free.items() if started - t < ABSENT_TTL}
            self._free.update(dict.fromkeys(wanted - taken, started))
        return found

    async def stop(self, job_id: str, reason: str) -> str:
        await self.client.stop(job_id, reason)
        return "Stopped"

    async def status(self, job_id: str) -> JobInfo | None:
        job = await self.client.get_job(job_id)
        return None if job is None else self._info(job)

    async def owner_of(self, job_id: str) -> str | None:
        return None  # v1.5+ has no job approval, so no policy asks


def _version_tuple(version: str) -> tuple[int, int]:
    match = _VERSION.match(version.strip())
    if match is None:
        return (1, 9)
    major, minor = int(match.group(1)), int(match.group(2))
    return (1, 9) if (major, minor) == (0, 0) else (major, minor)
