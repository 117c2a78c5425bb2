"""What the requester checks in a submitted payload, as its Go code does
(docs/wire-legacy.md, Job states, Validation on submit).

Deliberately independent of :mod:`reconciler.domain.spec`: the dev requester must judge our client's
requests the way the real server would, not the way our own models would.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

ENGINES = {"noop": "Noop", "docker": "Docker", "wasm": "Wasm"}
PUBLISHERS = {"noop": "Noop", "ipfs": "Ipfs", "estuary": "Estuary", "s3": "S3"}
SOURCES = {
    name.lower(): name
    for name in (
        "IPFS", "RepoClone", "RepoCloneLFS", "URLDownload", "Estuary", "Inline", "LocalDirectory",
        "S3",
    )
}
NETWORKS = {"none": "None", "full": "Full", "http": "HTTP"}
_DOMAIN = re.compile(r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}")


class DecodeError(ValueError):
    """The payload does not decode into Go types: 400 ``error unmarshalling payload``."""


class Invalid(ValueError):
    """Validation failed: 400 ``error validating request``."""


def field(obj: Mapping[str, Any], name: str) -> Any:
    """Case-insensitive key lookup, like Go's JSON decoder."""
    lowered = name.lower()
    for key, value in obj.items():
        if key.lower() == lowered:
            return value
    return None


def _enum(value: Any, table: dict[str, str], type_name: str, *, strict: bool = True) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DecodeError(
            f"json: cannot unmarshal {type(value).__name__} into Go struct field of type "
            f"model.{type_name}"
        )
    found = table.get(value.strip().lower())
    if found is None and strict:
        raise DecodeError(f"{type_name} {value!r} is not a valid value")
    return found or ""


def decode_spec(raw: Any) -> dict[str, Any]:
    """Canonical keys and enum names for the parts the requester decodes strictly."""
    if not isinstance(raw, Mapping):
        raise DecodeError("json: cannot unmarshal Spec")
    spec = {_canonical_top(key): value for key, value in raw.items()}
    if "Engine" in spec:
        spec["Engine"] = _enum(spec["Engine"], ENGINES, "Engine", strict=False) or "engineUnknown"
    if spec.get("Publisher") is not None:
        spec["Publisher"] = _enum(spec["Publisher"], PUBLISHERS, "Publisher")
    publisher_spec = spec.get("PublisherSpec")
    if isinstance(publisher_spec, Mapping):
        spec["PublisherSpec"] = {
            "Type": _enum(field(publisher_spec, "Type"), PUBLISHERS, "Publisher"),
            "Params": field(publisher_spec, "Params") or {},
        }
    network = spec.get("Network")
    if isinstance(network, Mapping):
        spec["Network"] = {
            "Type": _enum(field(network, "Type"), NETWORKS, "Network") or "None",
            "Domains": field(network, "Domains") or [],
        }
    for key in ("Inputs", "Outputs"):
        spec[key] = [_decode_storage(item) for item in spec.get(key) or []]
    deal = spec.get("Deal")
    if deal is not None:
        spec["Deal"] = _decode_deal(deal)
    timeout = spec.get("Timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)):
        raise DecodeError("json: cannot unmarshal number into Go struct field Spec.Timeout")
    return spec


_TOP_KEYS = {
    key.lower(): key
    for key in (
        "Engine", "Publisher", "PublisherSpec", "Docker", "Wasm", "Resources", "Network",
        "Timeout", "Inputs", "Outputs", "Annotations", "NodeSelectors", "DoNotTrack", "Deal",
    )
}


def _canonical_top(key: str) -> str:
    return _TOP_KEYS.get(key.lower(), key)


def _decode_storage(item: Any) -> dict[str, Any]:
    if not isinstance(item, Mapping):
        raise DecodeError("json: cannot unmarshal StorageSpec")
    out = dict(item)
    source = field(item, "StorageSource")
    for key in list(out):
        if key.lower() == "storagesource":
            del out[key]
    out["StorageSource"] = _enum(source, SOURCES, "StorageSourceType")
    return out


def _decode_deal(deal: Any) -> dict[str, Any]:
    if not isinstance(deal, Mapping):
        raise DecodeError("json: cannot unmarshal Deal")
    mode = field(deal, "TargetingMode")
    concurrency = field(deal, "Concurrency")
    if mode is not None and not isinstance(mode, bool):
        raise DecodeError("json: cannot unmarshal into Go struct field Deal.TargetingMode")
    if concurrency is not None and (
        not isinstance(concurrency, int) or isinstance(concurrency, bool)
    ):
        raise DecodeError("json: cannot unmarshal number into Go struct field Deal.Concurrency")
    return {"TargetingMode": bool(mode), "Concurrency": concurrency or 0}


def validate(spec: dict[str, Any]) -> None:
    """pkg/job/validate.go: the Deal first and alone, then the rest as one multi-error."""
    deal = spec.get("Deal") or {"TargetingMode": False, "Concurrency": 0}
    if not deal["TargetingMode"] and deal["Concurrency"] < 1:
        raise Invalid("concurrency must be >= 1")
    if deal["TargetingMode"] and deal["Concurrency"] not in (0, 1):
        raise Invalid("concurrency ignored for target all mode, must be == 0")
    problems: list[str] = []
    if spec.get("Engine") not in ENGINES.values():
        problems.append(f"invalid executor type: {spec.get('Engine') or 'engineUnknown'}")
    if not (spec.get("PublisherSpec") or {}).get("Type"):
        problems.append("invalid publisher type: publisherUnknown")
    for domain in (spec.get("Network") or {}).get("Domains") or []:
        if not _is_domain_or_ip(domain):
            problems.append(f"invalid domain: {domain}")
    for storage in spec.get("Inputs") or []:
        if not storage.get("StorageSource"):
            problems.append("invalid input storage source type: storageSourceUnknown")
    if problems:
        listed = "".join(f"\n\t* {problem}" for problem in problems)
        raise Invalid(f"{len(problems)} error(s) occurred:{listed}")


def _is_domain_or_ip(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_DOMAIN.search(value))  # unanchored, as lax as the server's
    return True
