"""The job-selection probe a compute node calls (``--job-selection-probe-http``).

``POST /probe`` with ``{node_id, job_id, spec, callback}``; the answer is the approval policy's
decision as Bacalhau expects it: ``Content-Type: application/json`` exactly, and
``{"shouldBid", "shouldWait", "reason"}``. A ``manual`` decision is recorded as pending, with the
node's callback, for ``reconciler approve``. Every decision is an ``approval.decided`` event
naming the rule that matched; the store keeps a summary of the job, never its spec.

Anyone who reaches the listener can post to it, so (docs/reliability.md, "Hostile input"): a
body over ``MAX_PROBE_BODY`` is 413, a body of the wrong shape or with oversized fields is 400
with a short reason; the store keeps at most ``approval_max`` requests and drops decided and
pending ones after ``approval_retention`` seconds; and the callback first recorded for a job
stands: a later probe, whatever node it names, never redirects where ``reconciler approve``
sends the signed decision (node ids are not secret, so "the same node" proves nothing).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import structlog

from reconciler.domain.approval import (
    ApprovalPolicy,
    BadProbe,
    ProbeRequest,
    decide,
    needs_client_id,
    spec_value,
)
from reconciler.domain.records import Approval
from reconciler.ports import StateStore
from reconciler.service.http import Response

ClientIdLookup = Callable[[str], Awaitable[str | None]]
_STATES = {"approve": "approved", "reject": "rejected", "manual": "pending"}
#: A probe carries one job's spec: a few KiB. The listener refuses bigger bodies (413).
MAX_PROBE_BODY = 256 * 1024


def effective_policies(store: StateStore) -> dict[str, ApprovalPolicy]:
    """The policies in force: the last valid version of each, as the store keeps them."""
    return {p.name: ApprovalPolicy.model_validate_json(p.body) for p in store.policies()}


def summary(request: ProbeRequest) -> str:
    spec = request.spec
    return json.dumps({"engine": spec_value(spec, "Engine"),
                       "image": spec_value(spec, "Docker", "Image"),
                       "network": spec_value(spec, "Network", "Type"),
                       "cpu": spec_value(spec, "Resources", "CPU"),
                       "memory": spec_value(spec, "Resources", "Memory"),
                       "gpu": spec_value(spec, "Resources", "GPU")}, sort_keys=True)


class ProbeService:
    def __init__(self, store: StateStore, lookup_client_id: ClientIdLookup, *,
                 max_stored: int = 1000, retention: float = 86400.0,
                 acting: Callable[[], bool] | None = None) -> None:
        self._store = store
        #: False on a standby: it decides nothing (the leader does); nodes are told to retry.
        self._acting = acting
        self._lookup = lookup_client_id
        self._max_stored = max_stored
        self._retention = retention
        self._log = structlog.get_logger("reconciler.service.probe")

    async def handle(self, method: str, path: str, body: bytes) -> Response:
        if path != "/probe":
            return Response(404, b"not found\n")
        if method != "POST":
            return Response(400, b"POST a probe request\n")
        if len(body) > MAX_PROBE_BODY:
            return Response(413, b"probe body too large\n")
        try:
            request = ProbeRequest.from_wire(json.loads(body))
        except BadProbe as exc:
            return Response(400, f"{exc}\n".encode())
        except (ValueError, RecursionError):  # RecursionError: nested past the parser's stack
            return Response(400, b"not JSON\n")
        if not request.job_id:
            return Response(400, b"job_id is missing\n")
        if self._acting is not None and not self._acting():
            return Response(503, b"standby: the leading reconciler decides; try again later\n")
        outcome = await self._decide(request)
        if outcome is None:
            return Response(503, b"too many approval requests waiting; try again later\n")
        return self._reply(outcome)

    async def _decide(
        self, request: ProbeRequest
    ) -> tuple[ProbeRequest, dict[str, object]] | None:
        """The decision, recorded; None when the store is full of pending requests."""
        policies = effective_policies(self._store)
        client_id = await self._lookup(request.job_id) if needs_client_id(policies) else None
        decision = decide(policies, request, client_id)
        now = time.time()
        state = _STATES[decision.verdict]
        approval = Approval(
            request.job_id, request.node_id, request.callback, summary(request), state,
            decision.rule, decision.reason, now, None if state == "pending" else now)
        recorded = self._store.approval(request.job_id)
        if recorded is None:
            self._store.prune_approvals(before=now - self._retention, keep=self._max_stored - 1)
            if self._store.approval_count() >= self._max_stored:
                self._log.warning("approval.refused", job_id=request.job_id,
                                  node_id=request.node_id, stored=self._max_stored,
                                  reason="approval_max requests are stored and none could be "
                                         "pruned: answered 503")
                return None
        elif (recorded.callback, recorded.node_id) != (request.callback, request.node_id):
            # The first probe's callback stands (see the module's docstring).
            self._log.warning("approval.callback_kept", job_id=request.job_id,
                              node_id=request.node_id, recorded_node_id=recorded.node_id,
                              reason="a later probe named another callback or node; the "
                                     "recorded callback stays")
            approval = replace(approval, node_id=recorded.node_id, callback=recorded.callback,
                               received_at=recorded.received_at)
        self._store.save_approval(approval)
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
