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
    def from_wire(cls, body: Any) -> ProbeRequest:
        """A probe body as decoded JSON; :class:`BadProbe` (a short reason) unless each field
        the policy or the store reads has the right type and a bounded size."""
        if not isinstance(body, Mapping):
            raise BadProbe("the body is not a JSON object")
        folded = {str(k).replace("_", "").lower(): v for k, v in body.items()}
        spec = folded.get("spec")
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise BadProbe("spec: not an object")
        _check_spec(spec)
        return cls(_field(folded, "nodeid", "node_id", MAX_NODE_ID),
                   _field(folded, "jobid", "job_id", MAX_JOB_ID), spec,
                   _callback(_field(folded, "callback", "callback", MAX_CALLBACK)))


#: Field sizes a probe may carry. Bacalhau's ids are UUIDs and libp2p peer ids (~52 chars); a
#: callback is a node's URL. Larger values are refused, not cut: they are nobody's real ids.
MAX_JOB_ID, MAX_NODE_ID, MAX_CALLBACK, MAX_TEXT = 128, 256, 2048, 1024


class BadProbe(ValueError):
    """A probe request of the wrong shape; the message is the short reason the node gets."""


def _field(folded: Mapping[str, Any], key: str, name: str, limit: int) -> str:
    value = folded.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadProbe(f"{name}: not a string")
    if len(value) > limit:
        raise BadProbe(f"{name}: longer than {limit} characters")
    return value


def _callback(url: str) -> str:
    if url and not url.lower().startswith(("http://", "https://")):
        raise BadProbe("callback: not an http(s) URL")
    return url


#: Where in the spec the policy and the store look, and what each must be when present.
_SPEC_SHAPE: dict[tuple[str, ...], tuple[type, ...]] = {
    ("Engine",): (str,),
    ("Docker",): (Mapping,),
    ("Docker", "Image"): (str,),
    ("Network",): (Mapping,),
    ("Network", "Type"): (str,),
    ("Annotations",): (list,),
    ("Resources",): (Mapping,),
    ("Resources", "CPU"): (str, int, float),
    ("Resources", "Memory"): (str, int, float),
    ("Resources", "GPU"): (str, int, float),
}


def _check_spec(spec: Mapping[str, Any]) -> None:
    for keys, kinds in _SPEC_SHAPE.items():
        value = _get(spec, *keys)
        if value is None:
            continue
        where = "spec." + ".".join(keys)
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise BadProbe(f"{where}: wrong type ({type(value).__name__})")
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise BadProbe(f"{where}: longer than {MAX_TEXT} characters")
    for annotation in _get(spec, "Annotations") or []:
        if not isinstance(annotation, str) or len(annotation) > MAX_TEXT:
            raise BadProbe("spec.Annotations: not a list of short strings")


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


def spec_value(spec: Mapping[str, Any], *keys: str) -> Any:
    """``spec[k1][k2]...`` with keys matched case-insensitively; None when absent."""
    return _get(spec, *keys)


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
