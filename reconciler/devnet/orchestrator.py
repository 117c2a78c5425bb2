"""The dev requester's orchestrator API (profiles 1.6 and 1.9), per docs/wire-orchestrator.md.

One entry point, :meth:`OrchestratorApi.handle`, answers every request of an orchestrator
profile, in the order the real server's middleware runs: redirects, authorisation (``api_key``),
the chunked-body refusal, the build headers, the client-version check, then the routes. Errors
are the ``{Status, Message, RequestID, Code, Component, Hint?, Details?}`` envelope as
``application/json``, except the plain-text 503 ``Server Timeout!`` and the legacy 410.

Fault injection applies to the job routes only (``/api/v1/orchestrator/...``), so that version
detection stays reliable: ``error_rate`` answers before doing anything (500, 503 or 429);
``latency`` delays a request, and a PUT between its name lookup and its write, which is what
lets two concurrent creates of one name race into a 409; ``fail_after_store`` stores a PUT and
answers 503 ``Server Timeout!``; ``drop_rate`` stores it and drops the connection;
``submit_latency`` stores it and answers late.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import difflib
import hmac
import json
import random
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from reconciler.devnet.orchestrator_jobs import (
    ApiError,
    OrchJob,
    OrchStore,
    bind_error,
    comparable,
    decode_job,
    normalise,
    parse_selector,
    selector_matches,
    validate_store,
    validate_submission,
)

if TYPE_CHECKING:
    from reconciler.devnet.server import DevConfig, Reply, Scope

    Handler = Callable[["Request", str], Awaitable[Reply]]

BUILDS = {
    "1.6": {"Major": "1", "Minor": "6", "GitVersion": "v1.6.5",
            "GitCommit": "5b25fc1a0f15b8e2e7e046ace71c1b4cccc5189b",
            "BuildDate": "2025-03-06T00:00:00Z"},
    "1.9": {"Major": "1", "Minor": "9", "GitVersion": "v1.9.3",
            "GitCommit": "2b0ed139efadcb4a7fbce49b819613f11eeb3f2d",
            "BuildDate": "2026-08-09T00:00:00Z"},
}
OPEN_PATHS = ("/api/v1/agent/version", "/api/v1/agent/alive", "/api/v1/agent/authconfig",
              "/api/v1/version")
JOBS = "/api/v1/orchestrator/jobs"
_JOB_PATH = re.compile(r"/api/v1/orchestrator/jobs/(?P<ref>[^/]+)(?P<sub>/[a-z]+)?")
_SEMVER = re.compile(r"v?(\d+)\.(\d+)\.(\d+)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("", "0", "f", "F", "FALSE", "false", "False")
MIGRATION = ("This endpoint is deprecated and no longer supported. See the migration guide at "
             "https://docs.bacalhau.org/references/cli-reference/command-migration")
NOT_FOUND_HINT = "Check the request path and method against the API documentation"


class Request:
    """What the handlers read: method, path, headers (lower-cased), query (GET/DELETE/HEAD)."""

    def __init__(self, scope: Scope, body: bytes | None) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.body = body
        self.headers: dict[str, str] = {}
        for key, value in scope.get("headers", []):
            self.headers[key.decode("latin-1").lower()] = value.decode("latin-1")
        self.query: dict[str, list[str]] = {}
        # echo binds query parameters for GET, DELETE and HEAD only; names ignore case.
        if self.method in ("GET", "DELETE", "HEAD"):
            raw = scope.get("query_string", b"").decode("latin-1")
            for key, value in parse_qsl(raw, keep_blank_values=True):
                self.query.setdefault(key.lower(), []).append(value)
        self.request_id = self.headers.get("x-request-id", "")

    def arg(self, name: str) -> str:
        return (self.query.get(name) or [""])[0]

    def flag(self, name: str) -> bool:
        value = self.arg(name)
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise bind_error(f"strconv.ParseBool: parsing {value!r}: invalid syntax ({name})")

    def number(self, name: str) -> int:
        value = self.arg(name)
        if not value:
            return 0
        if not value.isdigit():
            raise bind_error(f"strconv.ParseUint: parsing {value!r}: invalid syntax ({name})")
        return int(value)


class OrchestratorApi:
    def __init__(self, config: DevConfig, stats: Counter[str], rng: random.Random) -> None:
        self.config = config
        self.profile = config.bacalhau_version
        self.names = self.profile == "1.9"  # names are an identity from v1.8 on
        self.build = dict(BUILDS[self.profile])
        if config.git_version:
            self.build["GitVersion"] = config.git_version
        self.build.update({"GOOS": "linux", "GOARCH": "amd64"})
        self.store = OrchStore(names=self.names, job_duration=config.job_duration,
                               state_file=config.state_file)
        self.stats = stats
        self._rng = rng

    def close(self) -> None:
        self.store.close()

    def reset(self) -> None:
        """Forget every job and count (tests reuse one server; the journal is left alone)."""
        self.store = OrchStore(names=self.names, job_duration=self.config.job_duration,
                               state_file=None)
        self.stats.clear()

    # --- the middleware chain --------------------------------------------------------------

    async def handle(self, scope: Scope, body: bytes | None) -> Reply:
        request = Request(scope, body)
        request_id = request.request_id or str(uuid.uuid4())
        headers = {"X-Request-Id": request_id}
        try:
            reply = await self._handle(request, headers)
        except ApiError as exc:
            reply = self._error(request, exc)
        reply.headers.update(headers)
        return reply

    async def _handle(self, request: Request, headers: dict[str, str]) -> Reply:
        from reconciler.devnet.server import Reply

        if request.path in ("/", "/version", "/livez"):
            target = "/api/v1/agent/alive" if request.path == "/livez" else "/api/v1/agent/version"
            return Reply(301, b"", {"Location": target})
        self._authorise(request)
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            # The policy authoriser reads the body and compares it with Content-Length (-1).
            if self.profile == "1.6":
                raise bind_error("http: ContentLength=-1 with Body length unknown", 500)
            raise ApiError(500, "unexpected authorization error", "InternalError", "Authorizer")
        headers.update({
            "X-Bacalhau-Git-Version": self.build["GitVersion"],
            "X-Bacalhau-Git-Commit": self.build["GitCommit"],
            "X-Bacalhau-Build-Date": self.build["BuildDate"],
            "X-Bacalhau-Build-OS": "linux", "X-Bacalhau-Arch": "amd64",
        })
        outdated = self._client_version(request)
        if outdated is not None:
            return outdated
        if request.body is None:
            raise bind_error("Request Entity Too Large", 413)
        return await self._route(request)

    def _authorise(self, request: Request) -> None:
        keys = {k: "all" for k in [self.config.api_key] if k}
        if self.config.read_only_api_key:
            keys[self.config.read_only_api_key] = "read"
        path = request.path
        user = self.config.api_user
        if not (keys or user) or path in OPEN_PATHS or path.startswith(("/api/v1/auth",
                                                                         "/devnet/")):
            return
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        access = ""
        if not scheme:
            reason = "missing authorization header"
        elif scheme.lower() == "bearer":
            access, reason = keys.get(credential, ""), "invalid API key"
        elif scheme.lower() == "basic":
            access, reason = ("all" if user and _basic_matches(credential, user) else "",
                              "invalid username or password")
        else:
            reason = f"unsupported authorization scheme {scheme}"
        if access:
            writes = request.method in ("PUT", "POST", "DELETE")
            if writes and access == "read":
                self.stats["forbidden"] += 1  # refused requests are counted too, for tests
                raise ApiError(403, "Request Forbidden", "Forbidden", "Authorizer",
                               details={"reason": "missing capability write:job"})
            return
        self.stats["unauthorized"] += 1
        raise ApiError(401, "Request Unauthorized", "Unauthorized", "Authorizer",
                       details={"reason": reason})

    def _client_version(self, request: Request) -> Reply | None:
        value = request.headers.get("x-bacalhau-git-version")
        if value is None:
            return None
        match = _SEMVER.fullmatch(value.strip())
        if match is None:
            return self._json(400, {"Error": f"Invalid client version {value}"})
        if tuple(int(match[i]) for i in (1, 2, 3)) < (1, 4, 0):
            return self._json(403, {
                "Error": "Client version is outdated. Update your client",
                "MinVersion": "v1.4.0", "ClientVersion": value,
                "ServerVersion": self.build["GitVersion"]})
        return None

    # --- routes ------------------------------------------------------------------------------

    async def _route(self, request: Request) -> Reply:
        path = request.path
        if path == "/api/v1/agent/version":
            return self._only(request, "GET") or self._json(200, {
                k: self.build[k] for k in ("Major", "Minor", "GitVersion", "GitCommit",
                                           "BuildDate", "GOOS", "GOARCH")})
        if path == "/api/v1/agent/alive":
            return self._only(request, "GET") or self._json(200, {"Status": "OK"})
        if path.startswith(("/api/v1/requester/", "/requester/")) or path in (
                "/api/v1/requester", "/requester"):
            if self.profile == "1.6":
                return self._json(410, MIGRATION)
            return self._not_found()
        if path == JOBS or path.startswith(JOBS + "/"):
            return await self._job_route(request)
        return self._not_found()

    async def _job_route(self, request: Request) -> Reply:
        path, method = request.path, request.method
        if path == JOBS:
            template = f"{method} /orchestrator/jobs"
        elif path == JOBS + "/diff" and method == "PUT" and self.names:
            template = "PUT /orchestrator/jobs/diff"
        else:
            match = _JOB_PATH.fullmatch(path)
            if match is None:
                return self._not_found()
            template = f"{method} /orchestrator/jobs/{{id}}{match['sub'] or ''}"
        handler = self._handlers().get(template)
        if handler is None:
            known = {t.split(" ", 1)[1] for t in self._handlers()}
            if template.split(" ", 1)[1] in known:
                raise bind_error("Method Not Allowed", 405)
            return self._not_found()
        self.stats[template] += 1
        fault = self._injected_fault()
        if fault is not None:
            return fault
        if self.config.latency and method not in ("PUT", "POST"):
            await asyncio.sleep(self.config.latency)
        if method in ("PUT", "POST", "DELETE") and request.body:
            content_type = request.headers.get("content-type", "")
            if content_type.split(";")[0].strip().lower() != "application/json":
                raise bind_error("Unsupported Media Type", 415)
        match = _JOB_PATH.fullmatch(path)
        ref = match["ref"] if match else ""
        return await handler(request, ref)

    def _handlers(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {
            "PUT /orchestrator/jobs": self._put,
            "POST /orchestrator/jobs": self._put,
            "GET /orchestrator/jobs": self._list,
            "GET /orchestrator/jobs/{id}": self._get,
            "DELETE /orchestrator/jobs/{id}": self._stop,
            "GET /orchestrator/jobs/{id}/history": self._history,
            "GET /orchestrator/jobs/{id}/executions": self._executions,
            "GET /orchestrator/jobs/{id}/results": self._results,
        }
        if self.names:
            handlers["PUT /orchestrator/jobs/diff"] = self._diff
            handlers["GET /orchestrator/jobs/{id}/versions"] = self._versions
            handlers["PUT /orchestrator/jobs/{id}/rerun"] = self._rerun
        return handlers

    def _injected_fault(self) -> Reply | None:
        from reconciler.devnet.server import plain

        if self.config.error_rate and self._rng.random() < self.config.error_rate:
            self.stats["faults"] += 1
            choice = self._rng.randrange(3)
            if choice == 0:
                raise ApiError(500, "injected failure")
            if choice == 1:
                return plain(503, "Server Timeout!")
            raise bind_error("rate limit exceeded", 429)
        return None

    # PUT /jobs ------------------------------------------------------------------------------

    def _decode_put(self, request: Request) -> tuple[dict[str, Any], list[str], bool]:
        body = _json_body(request.body or b"")
        if not isinstance(body, dict):
            raise bind_error("json: cannot unmarshal into Go value of type "
                             "apimodels.PutJobRequest")
        force = _field(body, "Force") if self.names else None  # unknown before v1.8
        if force is not None and not isinstance(force, bool):
            raise bind_error("json: cannot unmarshal into Go struct field PutJobRequest.Force "
                             "of type bool")
        job, warnings, count_omitted = decode_job(_field(body, "Job"), self.profile)
        validate_submission(job)
        client_meta = {}
        for header, key in (("x-bacalhau-installationid", "client.installation.id"),
                            ("x-bacalhau-instanceid", "client.instance.id")):
            if request.headers.get(header):
                client_meta["bacalhau.org/" + key] = request.headers[header]
        spec = normalise(job, warnings, count_omitted, self.profile, client_meta)
        # Force exists from v1.8 on; older servers ignore it as an unknown key.
        return spec, warnings, bool(force) and self.names

    async def _put(self, request: Request, ref: str) -> Reply:
        from reconciler.devnet.server import Reply, plain

        spec, warnings, force = self._decode_put(request)
        if force:
            self.stats["PUT /orchestrator/jobs Force"] += 1  # tests check when it is sent
        existing = self.store.by_name(spec["Name"], spec["Namespace"]) if self.names else None
        if self.config.latency:
            await asyncio.sleep(self.config.latency)  # between the lookup and the write
        if existing is None:
            validate_store(spec)
            job = self.store.create(spec)
        else:
            if not force and comparable(existing.spec) == comparable(
                    {**spec, "ID": existing.job_id}):
                raise ApiError(500, "no changes detected for new job spec. Job Name: "
                               f"'{existing.name}', Job Id: '{existing.job_id}'",
                               hint="Use the --force flag to override this warning")
            spec["ID"] = existing.job_id
            validate_store(spec)
            self.store.update(existing, spec)
            job = existing
        if self.config.fail_after_store and self._rng.random() < self.config.fail_after_store:
            self.stats["fail_after_store"] += 1
            reply = plain(503, "Server Timeout!")
        elif self.config.drop_rate and self._rng.random() < self.config.drop_rate:
            self.stats["dropped"] += 1
            reply = Reply(200, b"", {}, drop=True)
        else:
            if self.config.submit_latency:
                await asyncio.sleep(self.config.submit_latency)
            reply = self._json(200, {"JobID": job.job_id, "EvaluationID": str(uuid.uuid4()),
                                     "Warnings": warnings or None})
        reply.job_id = job.job_id
        return reply

    async def _diff(self, request: Request, ref: str) -> Reply:
        spec, warnings, _ = self._decode_put(request)
        if not _field(_field(_json_body(request.body or b""), "Job") or {}, "Name"):
            raise bind_error("invalid job spec: name is missing")
        existing = self.store.by_name(spec["Name"], spec["Namespace"])
        if existing is None:
            raise ApiError(404, f"job name index not found: {spec['Name']}:{spec['Namespace']}",
                           "NotFound", "JobStore")
        old = json.dumps(comparable(existing.spec), indent=1, sort_keys=True).splitlines()
        new = json.dumps(comparable({**spec, "ID": existing.job_id}), indent=1,
                         sort_keys=True).splitlines()
        diff = "\n".join(difflib.unified_diff(old, new, lineterm="", n=1))
        return self._json(200, {"Diff": diff, "Warnings": warnings or None})

    # GET ------------------------------------------------------------------------------------

    def _version_arg(self, request: Request) -> int:
        return request.number("job_version") if self.names else 0

    async def _get(self, request: Request, ref: str) -> Reply:
        include = request.arg("include")
        if include not in ("", "history", "executions"):
            raise bind_error(f"invalid include value {include!r}: must be one of "
                             "[history executions]")
        request.number("limit")  # accepted, unused
        version = self._version_arg(request)
        job = self.store.lookup(ref, request.arg("namespace"))
        if version and version != job.version and version not in job.versions:
            raise ApiError(404, f"job version {version} not found for job {job.job_id}",
                           "NotFound", "JobStore")
        shown = version or job.version
        out: dict[str, Any] = {"Job": job.to_wire(version)}
        if include == "history":
            out["History"] = {"Items": [h for h in job.history if h["JobVersion"] == shown],
                              "NextToken": ""}
        if include == "executions":
            out["Executions"] = {"Items": [e for e in job.executions
                                           if e["JobVersion"] == shown], "NextToken": ""}
        return self._json(200, out)

    async def _list(self, request: Request, ref: str) -> Reply:
        namespace = request.arg("namespace")
        selector = parse_selector(",".join(request.query.get("labels", [])))
        order_by, reverse = request.arg("order_by"), request.flag("reverse")
        limit = request.number("limit")
        offset = 0
        token = request.arg("next_token")
        if token:
            # A token carries order, direction, limit and offset; namespace and labels it
            # does not carry, so a client must send them on every page.
            order_by, reverse, limit, offset = _read_token(token)
        if order_by not in ("", "created_at", "modified_at"):
            raise ApiError(500, "Internal server error", "InternalError", "Unknown")
        jobs = [j for j in self.store.all() if namespace in ("", "*") or j.namespace == namespace]
        if order_by == "modified_at":
            jobs.sort(key=lambda j: (j.modify_ns, j.seq), reverse=reverse)
        else:
            jobs.sort(key=lambda j: (j.create_ns, j.seq), reverse=reverse)
        jobs = [j for j in jobs if selector_matches(selector, j.spec["Labels"])]
        page = jobs[offset : offset + limit] if limit else jobs[offset:]
        next_token = ""
        if limit and offset + limit < len(jobs):
            next_token = _make_token(order_by or "created_at", reverse, limit, offset + limit)
        return self._json(200, {"Items": [j.to_wire() for j in page], "NextToken": next_token})

    async def _history(self, request: Request, ref: str) -> Reply:
        since = request.arg("since")
        if since and not since.lstrip("-").isdigit():
            raise bind_error(f"strconv.ParseInt: parsing {since!r}: invalid syntax (since)")
        if since and int(since) < 0:
            raise bind_error("since must be >= 0")
        event_type = request.arg("event_type") or "all"
        if event_type not in ("all", "job", "execution"):
            raise bind_error(f"invalid event_type {event_type!r}: must be one of "
                             "[all job execution]")
        version = self._version_arg(request)
        every_version = self.names and request.flag("all_job_versions")
        limit = request.number("limit") or 100
        token = request.arg("next_token")
        offset = _read_token(token)[3] if token else 0
        job = self.store.lookup(ref, request.arg("namespace"))
        wanted = version or job.version
        items = [
            h for h in job.history
            if (every_version or h["JobVersion"] == wanted)
            and (event_type == "all" or h["Type"] == ("JobLevel" if event_type == "job"
                                                      else "ExecutionLevel"))
            and h.get("ExecutionID", "").startswith(request.arg("execution_id"))
            and (not since or _epoch(h["Time"]) >= int(since))
        ]
        page = items[offset : offset + limit]
        more = offset + limit < len(items)
        return self._json(200, {"Items": page, "NextToken": _make_token(
            "", False, limit, offset + limit) if more else ""})

    async def _executions(self, request: Request, ref: str) -> Reply:
        version = self._version_arg(request)
        every_version = self.names and request.flag("all_job_versions")
        limit, reverse = request.number("limit"), request.flag("reverse")
        order_by = request.arg("order_by")
        job = self.store.lookup(ref, request.arg("namespace"))
        wanted = version or job.version
        items = [e for e in job.executions if every_version or e["JobVersion"] == wanted]
        if order_by in ("", "created_at", "create_time"):
            items.sort(key=lambda e: int(e["CreateTime"]), reverse=reverse)
        elif order_by in ("modified_at", "modify_time"):
            items.sort(key=lambda e: int(e["ModifyTime"]), reverse=reverse)
        return self._json(200, {"Items": items[:limit] if limit else items, "NextToken": ""})

    async def _results(self, request: Request, ref: str) -> Reply:
        job = self.store.lookup(ref, request.arg("namespace"))
        if job.type in ("service", "daemon"):
            raise ApiError(500, "Internal server error", "InternalError", "Unknown")
        publisher = (job.spec["Tasks"][0].get("Publisher") or {}).get("Type", "")
        done = [e for e in job.executions if e["JobVersion"] == job.version
                and e["ComputeState"]["StateType"] == 9]
        items = [{"Type": publisher, "Params": {}} for _ in done] if publisher else []
        return self._json(200, {"Items": items, "NextToken": ""}, escape=False)

    async def _versions(self, request: Request, ref: str) -> Reply:
        job = self.store.lookup(ref, request.arg("namespace"))
        items = [job.to_wire(v) for v in sorted(job.versions)] + [job.to_wire()]
        return self._json(200, {"Items": items, "NextToken": ""})

    async def _rerun(self, request: Request, ref: str) -> Reply:
        # A PUT: the namespace and every argument travel in the body.
        body = _json_body(request.body) if request.body else {}
        version = _field(body, "JobVersion") or 0
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise bind_error("json: cannot unmarshal into Go struct field "
                             "RerunJobRequest.JobVersion of type uint64")
        namespace, reason = _field(body, "Namespace"), _field(body, "Reason")
        try:
            job = self.store.lookup(ref, namespace if isinstance(namespace, str) else "")
        except ApiError as exc:  # the rerun handler wraps every lookup failure as a 400
            raise ApiError(400, exc.message, "BadRequest", exc.component) from None
        new_version = self.store.rerun(job, version, reason if isinstance(reason, str) else "")
        return self._json(200, {"JobID": job.job_id, "JobVersion": new_version,
                                "EvaluationID": str(uuid.uuid4()), "Warnings": None})

    # DELETE ---------------------------------------------------------------------------------

    async def _stop(self, request: Request, ref: str) -> Reply:
        # The reason travels only in the JSON body; ?reason= is never bound (no query tag).
        body = _json_body(request.body) if request.body else {}
        if not isinstance(body, dict):
            raise bind_error("json: cannot unmarshal into Go value of type "
                             "apimodels.StopJobRequest")
        reason = _field(body, "reason")
        if reason is not None and not isinstance(reason, str):
            raise bind_error("json: cannot unmarshal into Go struct field StopJobRequest.reason "
                             "of type string")
        namespace = _field(body, "Namespace")
        if not isinstance(namespace, str) or not namespace:
            namespace = request.arg("namespace")
        job = self.store.lookup(ref, namespace)
        evaluation = self.store.stop(job, reason or "")
        return self._json(200, {"EvaluationID": evaluation})

    # --- replies -----------------------------------------------------------------------------

    def _only(self, request: Request, method: str) -> Reply | None:
        if request.method != method:
            raise bind_error("Method Not Allowed", 405)
        return None

    def _not_found(self) -> Reply:
        if self.names:  # v1.8+: a NotFound code and a hint
            raise ApiError(404, "the requested resource was not found", "NotFound",
                           "APIServer", hint=NOT_FOUND_HINT)
        raise bind_error("Not Found", 404)

    def _json(self, status: int, value: Any, *, escape: bool = True) -> Reply:
        from reconciler.devnet.server import Reply

        text = json.dumps(value, ensure_ascii=False)
        if escape:  # Go's default encoder escapes HTML characters
            text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
        return Reply(status, text.encode() + b"\n", {"Content-Type": "application/json"})

    def _error(self, request: Request, exc: ApiError) -> Reply:
        body: dict[str, Any] = {"Status": exc.status, "Message": exc.message,
                                "RequestID": request.request_id, "Code": exc.code,
                                "Component": exc.component}
        if exc.hint:
            body["Hint"] = exc.hint
        if exc.details:
            body["Details"] = exc.details
        return self._json(exc.status, body)

    def jobs(self) -> list[OrchJob]:
        return sorted(self.store.all(), key=lambda j: (j.create_ns, j.seq))


def _basic_matches(credential: str, user: str) -> bool:
    """User names match ignoring case (they are alphanumeric); passwords exactly."""
    try:
        given = base64.b64decode(credential, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return False
    name, _, password = given.partition(":")
    want_name, _, want_password = user.partition(":")
    return name.lower() == want_name.lower() and hmac.compare_digest(password, want_password)


def _field(obj: Any, name: str) -> Any:
    if not isinstance(obj, dict):
        return None
    found = None
    for key, value in obj.items():
        if key.lower() == name.lower():
            found = value
    return found


def _json_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        position = getattr(exc, "pos", 0)
        raise bind_error(f"Syntax error: offset={position}, error={exc}") from None


def _make_token(order_by: str, reverse: bool, limit: int, offset: int) -> str:
    raw = json.dumps({"SortBy": order_by, "SortReverse": reverse, "Limit": limit,
                      "Offset": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str) -> tuple[str, bool, int, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        return (str(data["SortBy"]), bool(data["SortReverse"]), int(data["Limit"]),
                int(data["Offset"]))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise bind_error(f"invalid pagination token {token!r}") from None


def _epoch(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
