"""Approval policy: which jobs a compute node may run, decided by rules in ``kind:
ApprovalPolicy`` manifests (docs/wire-legacy.md, Approve).

A compute node started with ``--job-selection-probe-http`` asks the daemon's probe about each
job; :func:`decide` answers ``approve``, ``reject`` (with a reason) or ``manual`` (the request is
kept as pending until an operator runs ``reconciler approve``). Rules are tried in order —
policies by name, rules in file order — and the first whose every condition holds wins; when
none matches, the policy's ``default`` applies (``manual`` unless set).

:func:`decide` is pure: the job's client id, which the probe request does not carry, is looked
up by the caller beforehand when a rule asks for it (:func:`needs_client_id`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Verdict = Literal["approve", "reject", "manual"]


class Match(BaseModel):
    """Conditions on a job; all given ones must hold (globs for images and annotations)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    client_ids: list[str] | None = Field(None, alias="clientIds")
    engines: list[str] | None = None
    images: list[str] | None = None
    networks: list[str] | None = None
    annotations: list[str] | None = None
    node_ids: list[str] | None = Field(None, alias="nodeIds")
    max_cpu: str | None = Field(None, alias="maxCpu")
    max_memory: str | None = Field(None, alias="maxMemory")
    max_gpu: str | None = Field(None, alias="maxGpu")


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    match: Match = Field(default_factory=Match)
    decision: Verdict
    reason: str = ""


class ApprovalPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    default: Verdict = "manual"
    rules: list[Rule] = Field(default_factory=list)


@dataclass(frozen=True)
class ProbeRequest:
    """What a compute node's job-selection probe sends (JobSelectionPolicyProbeData)."""

    node_id: str
    job_id: str
    spec: Mapping[str, Any]
    callback: str

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> ProbeRequest:
        folded = {str(k).replace("_", "").lower(): v for k, v in body.items()}
        spec = folded.get("spec")
        return cls(str(folded.get("nodeid") or ""), str(folded.get("jobid") or ""),
                   spec if isinstance(spec, Mapping) else {}, str(folded.get("callback") or ""))


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    rule: str  # the rule that matched, or "default:<policy>" / "default"
    reason: str

    def probe_reply(self) -> dict[str, Any]:
        """The probe's answer as Bacalhau expects it."""
        return {"shouldBid": self.verdict == "approve", "shouldWait": self.verdict == "manual",
                "reason": self.reason}


def needs_client_id(policies: Mapping[str, ApprovalPolicy]) -> bool:
    return any(rule.match.client_ids for policy in policies.values() for rule in policy.rules)


def decide(policies: Mapping[str, ApprovalPolicy], request: ProbeRequest,
           client_id: str | None = None) -> Decision:
    for policy_name in sorted(policies):
        for rule in policies[policy_name].rules:
            if _matches(rule.match, request, client_id):
                reason = rule.reason or f"{rule.decision} by rule {policy_name}/{rule.name}"
                return Decision(rule.decision, f"{policy_name}/{rule.name}", reason)
    if policies:
        first = sorted(policies)[0]
        verdict = policies[first].default
        return Decision(verdict, f"default:{first}", f"no rule matched; default is {verdict}")
    return Decision("manual", "default", "no approval policy; waiting for an operator")


def _matches(match: Match, request: ProbeRequest, client_id: str | None) -> bool:
    spec = request.spec
    checks = [
        _any_equal(match.client_ids, client_id),
        _any_equal(match.node_ids, request.node_id),
        _any_equal(match.engines, _get(spec, "Engine"), fold=True),
        _any_glob(match.images, [_get(spec, "Docker", "Image")]),
        _any_equal(match.networks, _get(spec, "Network", "Type") or "None", fold=True),
        _any_glob(match.annotations, list(_get(spec, "Annotations") or [])),
        _within(match.max_cpu, _get(spec, "Resources", "CPU"), cpu),
        _within(match.max_memory, _get(spec, "Resources", "Memory"), memory),
        _within(match.max_gpu, _get(spec, "Resources", "GPU"), cpu),
    ]
    return all(checks)


def _get(spec: Mapping[str, Any], *keys: str) -> Any:
    value: Any = spec
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = next((v for k, v in value.items() if str(k).lower() == key.lower()), None)
    return value


def _any_equal(wanted: Sequence[str] | None, value: Any, fold: bool = False) -> bool:
    if wanted is None:
        return True
    if not isinstance(value, str):
        return False
    return any(w.lower() == value.lower() if fold else w == value for w in wanted)


def _any_glob(patterns: Sequence[str] | None, values: Sequence[Any]) -> bool:
    if patterns is None:
        return True
    return any(isinstance(v, str) and fnmatch.fnmatchcase(v, p) for p in patterns for v in values)


def _within(ceiling: str | None, value: Any, parse: Any) -> bool:
    if ceiling is None:
        return True
    limit, amount = parse(ceiling), parse(value or "0")
    # A value that does not parse cannot be shown to be under the ceiling: no match.
    return limit is not None and amount is not None and amount <= limit


_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_CPU_UNITS = {"": 1.0, "m": 0.001}
_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                 "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20,
                 "gi": 2**30, "ti": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def cpu(text: Any) -> float | None:
    """CPU cores from Bacalhau's strings ("500m", "1", "1.5"); None when it does not parse."""
    return _quantity(text, _CPU_UNITS)


def memory(text: Any) -> float | None:
    """Bytes from "256Mb", "1Gi", "1024"..."""
    return _quantity(text, _MEMORY_UNITS)


def _quantity(text: Any, units: Mapping[str, float]) -> float | None:
    found = _QUANTITY.match(str(text))
    if not found:
        return None
    unit = units.get(found.group(2).lower())
    return None if unit is None else float(found.group(1)) * unit
