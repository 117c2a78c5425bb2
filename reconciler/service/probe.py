"""The job-selection probe a compute node calls (``--job-selection-probe-http``).

``POST /probe`` with ``{node_id, job_id, spec, callback}``; the answer is the approval policy's
decision as Bacalhau expects it: ``Content-Type: application/json`` exactly, and
``{"shouldBid", "shouldWait", "reason"}``. A ``manual`` decision is recorded as pending, with the
node's callback, for ``reconciler approve``. Every decision is an ``approval.decided`` event
naming the rule that matched; the store keeps a summary of the job, never its spec.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

import structlog

from reconciler.domain.approval import ApprovalPolicy, ProbeRequest, decide, needs_client_id
from reconciler.domain.records import Approval
from reconciler.ports import StateStore
from reconciler.service.http import Response

ClientIdLookup = Callable[[str], Awaitable[str | None]]
_STATES = {"approve": "approved", "reject": "rejected", "manual": "pending"}


def effective_policies(store: StateStore) -> dict[str, ApprovalPolicy]:
    """The policies in force: the last valid version of each, as the store keeps them."""
    return {p.name: ApprovalPolicy.model_validate_json(p.body) for p in store.policies()}


def summary(request: ProbeRequest) -> str:
    spec = request.spec
    docker = spec.get("Docker") or {}
    resources = spec.get("Resources") or {}
    return json.dumps({"engine": spec.get("Engine"), "image": docker.get("Image"),
                       "network": (spec.get("Network") or {}).get("Type"),
                       "cpu": resources.get("CPU"), "memory": resources.get("Memory"),
                       "gpu": resources.get("GPU")}, sort_keys=True)


class ProbeService:
    def __init__(self, store: StateStore, lookup_client_id: ClientIdLookup) -> None:
        self._store = store
        self._lookup = lookup_client_id
        self._log = structlog.get_logger("reconciler.service.probe")

    async def handle(self, method: str, path: str, body: bytes) -> Response:
        if path != "/probe":
            return Response(404, b"not found\n")
        if method != "POST":
            return Response(400, b"POST a probe request\n")
        try:
            raw = json.loads(body)
            request = ProbeRequest.from_wire(raw if isinstance(raw, dict) else {})
        except ValueError:
            return Response(400, b"not JSON\n")
        if not request.job_id:
            return Response(400, b"job_id is missing\n")
        return self._reply(await self._decide(request))

    async def _decide(self, request: ProbeRequest) -> tuple[ProbeRequest, dict[str, object]]:
        policies = effective_policies(self._store)
        client_id = await self._lookup(request.job_id) if needs_client_id(policies) else None
        decision = decide(policies, request, client_id)
        now = time.time()
        state = _STATES[decision.verdict]
        self._store.save_approval(Approval(
            request.job_id, request.node_id, request.callback, summary(request), state,
            decision.rule, decision.reason, now, None if state == "pending" else now))
        fields = {"job_id": request.job_id, "node_id": request.node_id,
                  "decision": decision.verdict, "rule": decision.rule, "reason": decision.reason}
        self._log.info("approval.decided", **fields)
        if decision.verdict == "manual":
            self._log.warning("approval.pending", **fields,
                              hint=f"reconciler approve {request.job_id} [--reject]")
        return request, decision.probe_reply()

    @staticmethod
    def _reply(outcome: tuple[ProbeRequest, dict[str, object]]) -> Response:
        return Response(200, json.dumps(outcome[1]).encode(), "application/json")
