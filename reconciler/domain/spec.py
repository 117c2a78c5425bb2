"""The Bacalhau V1beta1 job ``Spec``: tolerant input, strict validation, canonical wire JSON.

Input is read the way Bacalhau's Go decoder reads it, with two additions for manifests
written by hand:

* keys match case-insensitively (``image`` fills ``Image``) and the Speakeasy SDK's snake_case
  names are accepted too (``storage_source`` fills ``StorageSource``);
* enum values are case-insensitive (``docker`` is ``Docker``);
* unknown keys are *rejected* (Go ignores them), because in a manifest they are typos that
  would silently change the job.

Validation rejects what the requester rejects (docs/wire-legacy.md, Validation on submit) and
what would only fail later on a compute node (a Docker job without an image, a Wasm job without
a module).

The wire form (:func:`to_wire`) uses the Go names (``CID``, ``URL``, ``VersionID``...) and
string enums, and leaves out empty values, so two files that would send the same bytes have
the same :func:`spec_hash`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Annotated, Any, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictInt,
    ValidationError,
    model_serializer,
    model_validator,
)

__all__ = [
    "Deal",
    "Engine",
    "JobSpecDocker",
    "JobSpecWasm",
    "LabelSelectorRequirement",
    "NetworkConfig",
    "NetworkType",
    "Publisher",
    "PublisherSpec",
    "ResourceUsageConfig",
    "S3StorageSpec",
    "Spec",
    "StorageSource",
    "StorageSpec",
    "ValidationError",
    "canonical_json",
    "hash_wire",
    "parse_spec",
    "spec_hash",
    "to_wire",
    "wire_json",
]


class Engine(StrEnum):
    NOOP = "Noop"
    DOCKER = "Docker"
    WASM = "Wasm"


class Publisher(StrEnum):
    NOOP = "Noop"
    IPFS = "Ipfs"
    ESTUARY = "Estuary"
    S3 = "S3"


class StorageSource(StrEnum):
    IPFS = "IPFS"
    REPO_CLONE = "RepoClone"
    REPO_CLONE_LFS = "RepoCloneLFS"
    URL_DOWNLOAD = "URLDownload"
    ESTUARY = "Estuary"
    INLINE = "Inline"
    LOCAL_DIRECTORY = "LocalDirectory"
    S3 = "S3"


class NetworkType(StrEnum):
    NONE = "None"
    FULL = "Full"
    HTTP = "HTTP"


E = TypeVar("E", bound=StrEnum)


def _enum_reader(enum: type[E]) -> Callable[[object], E]:
    """A before-validator that reads an enum by name, ignoring case and surrounding space.

    Numbers are refused: the server rejects ``Engine: 2`` with a 400 (docs/wire-legacy.md,
    Where the published API description is wrong).
    """
    by_key = {member.value.lower(): member for member in enum}
    names = ", ".join(member.value for member in enum)

    def read(value: object) -> E:
        if isinstance(value, enum):
            return value
        if not isinstance(value, str):
            raise ValueError(f"must be a string, one of: {names}")
        member = by_key.get(value.strip().lower())
        if member is None:
            raise ValueError(f"unknown value; expected one of: {names}")
        return member

    return read


def _resource_text(value: object) -> object:
    # YAML turns `CPU: 1` into an int; Bacalhau wants the string "1".
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


EngineField = Annotated[Engine, BeforeValidator(_enum_reader(Engine))]
PublisherField = Annotated[Publisher, BeforeValidator(_enum_reader(Publisher))]
StorageSourceField = Annotated[StorageSource, BeforeValidator(_enum_reader(StorageSource))]
NetworkTypeField = Annotated[NetworkType, BeforeValidator(_enum_reader(NetworkType))]
ResourceText = Annotated[str, BeforeValidator(_resource_text)]
StrList = list[str]


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


#: Each model's keys: exact (wire name, field name) and folded, to its wire name. Built once
#: per model: rebuilt at every call it was a fifth of parsing a manifest (docs/performance.md).
_KEYS: dict[type[BaseModel], tuple[dict[str, str], dict[str, str], frozenset[str]]] = {}


def _keys(model: type[BaseModel]) -> tuple[dict[str, str], dict[str, str], frozenset[str]]:
    keys = _KEYS.get(model)
    if keys is None:
        exact: dict[str, str] = {}
        folded: dict[str, str] = {}
        for name, field in model.model_fields.items():
            wire = field.alias or name
            exact[wire] = exact[name] = wire
            folded[_fold(wire)] = folded[_fold(name)] = wire
        keys = _KEYS[model] = (exact, folded, frozenset(exact.values()))
    return keys


def canonical_keys(model: type[BaseModel], data: object) -> object:
    """Rename ``data``'s keys to ``model``'s wire names, matching case and ``_`` loosely.

    ``data`` itself when it is a dict whose every key is a wire name already (a canonical
    spec, as stored and translated, and most files): nothing to rename and no two keys can
    fold together. Any other mapping is copied into a dict, which strict models require. The
    caller must not change the mapping it gets back."""
    if not isinstance(data, Mapping):
        return data
    exact, folded, wires = _keys(model)
    if isinstance(data, dict) and data.keys() <= wires:
        return data
    out: dict[str, object] = {}
    for key, value in data.items():
        wire = (exact.get(key) or folded.get(_fold(key), key)) if isinstance(key, str) else key
        if wire in out:
            raise ValueError(f"{wire}: given twice (keys are case-insensitive)")
        out[wire] = value
    return out


def _is_empty(value: object) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return value == 0
    return isinstance(value, str | list | dict) and len(value) == 0


class WireModel(BaseModel):
    """Base of every Spec part: Go field names on the wire, tolerant keys on input."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        serialize_by_alias=True,
        hide_input_in_errors=True,
        strict=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: object) -> object:
        return canonical_keys(cls, data)

    @model_serializer(mode="wrap")
    def _drop_empty(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        # A true value is never empty: the call is only made for the others (every spec's
        # hash is taken over this, ~50 values per spec: docs/performance.md).
        return {key: value for key, value in dumped.items()
                if value or (value is not None and not _is_empty(value))}


class S3StorageSpec(WireModel):
    bucket: str | None = Field(None, alias="Bucket")
    key: str | None = Field(None, alias="Key")
    checksum: str | None = Field(None, alias="Checksum")
    version_id: str | None = Field(None, alias="VersionID")
    endpoint: str | None = Field(None, alias="Endpoint")
    region: str | None = Field(None, alias="Region")


class StorageSpec(WireModel):
    storage_source: StorageSourceField | None = Field(None, alias="StorageSource")
    name: str | None = Field(None, alias="Name")
    cid: str | None = Field(None, alias="CID")
    url: str | None = Field(None, alias="URL")
    s3: S3StorageSpec | None = Field(None, alias="S3")
    repo: str | None = Field(None, alias="Repo")
    source_path: str | None = Field(None, alias="SourcePath")
    read_write: StrictBool = Field(False, alias="ReadWrite")
    path: str | None = Field(None, alias="Path")
    metadata: dict[str, str] | None = Field(None, alias="Metadata")


class JobSpecDocker(WireModel):
    image: str | None = Field(None, alias="Image")
    entrypoint: StrList | None = Field(None, alias="Entrypoint")
    parameters: StrList | None = Field(None, alias="Parameters")
    environment_variables: StrList | None = Field(None, alias="EnvironmentVariables")
    working_directory: str | None = Field(None, alias="WorkingDirectory")


class JobSpecWasm(WireModel):
    entry_module: StorageSpec | None = Field(None, alias="EntryModule")
    entry_point: str | None = Field(None, alias="EntryPoint")
    parameters: StrList | None = Field(None, alias="Parameters")
    environment_variables: dict[str, str] | None = Field(None, alias="EnvironmentVariables")
    import_modules: list[StorageSpec] | None = Field(None, alias="ImportModules")


class PublisherSpec(WireModel):
    type: PublisherField | None = Field(None, alias="Type")
    params: dict[str, Any] | None = Field(None, alias="Params")


class ResourceUsageConfig(WireModel):
    cpu: ResourceText | None = Field(None, alias="CPU")
    memory: ResourceText | None = Field(None, alias="Memory")
    disk: ResourceText | None = Field(None, alias="Disk")
    gpu: ResourceText | None = Field(None, alias="GPU")


_HOSTNAME = re.compile(r"^\.?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,}$")


def _is_domain(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return bool(_HOSTNAME.match(text))
    return True


class NetworkConfig(WireModel):
    type: NetworkTypeField | None = Field(None, alias="Type")
    domains: StrList | None = Field(None, alias="Domains")

    @model_validator(mode="after")
    def _domains_are_hosts(self) -> Self:
        for domain in self.domains or []:
            if not _is_domain(domain):
                raise ValueError("Domains: each entry must be a lower-case host name or an IP")
        return self


class LabelSelectorRequirement(WireModel):
    key: str = Field(alias="Key")
    operator: str = Field(alias="Operator")
    values: StrList | None = Field(None, alias="Values")

    @model_validator(mode="after")
    def _known_operator(self) -> Self:
        if self.operator not in _SELECTOR_OPERATORS:
            raise ValueError(
                "Operator: expected one of " + ", ".join(sorted(_SELECTOR_OPERATORS))
            )
        return self


_SELECTOR_OPERATORS = frozenset({"!", "=", "==", "in", "!=", "notin", "exists", "gt", "lt"})


class Deal(WireModel):
    targeting_mode: StrictBool = Field(False, alias="TargetingMode")
    concurrency: StrictInt = Field(0, alias="Concurrency")

    @model_validator(mode="after")
    def _concurrency_fits_mode(self) -> Self:
        # The requester checks the Deal first and returns its error alone
        # (docs/wire-legacy.md, Validation on submit).
        if not self.targeting_mode and self.concurrency < 1:
            raise ValueError("Concurrency: concurrency must be >= 1")
        if self.targeting_mode and self.concurrency not in (0, 1):
            raise ValueError("Concurrency: concurrency ignored for target all mode, must be == 0")
        return self


class Spec(WireModel):
    """A Bacalhau V1beta1 job Spec, normalized the way ``bacalhau create`` sends it."""

    engine: EngineField | None = Field(None, alias="Engine")
    publisher: PublisherField | None = Field(None, alias="Publisher")
    publisher_spec: PublisherSpec | None = Field(None, alias="PublisherSpec")
    docker: JobSpecDocker | None = Field(None, alias="Docker")
    wasm: JobSpecWasm | None = Field(None, alias="Wasm")
    resources: ResourceUsageConfig | None = Field(None, alias="Resources")
    network: NetworkConfig | None = Field(None, alias="Network")
    timeout: StrictInt = Field(0, alias="Timeout", ge=0)
    inputs: list[StorageSpec] | None = Field(None, alias="Inputs")
    outputs: list[StorageSpec] | None = Field(None, alias="Outputs")
    annotations: StrList | None = Field(None, alias="Annotations")
    node_selectors: list[LabelSelectorRequirement] | None = Field(None, alias="NodeSelectors")
    do_not_track: StrictBool = Field(False, alias="DoNotTrack")
    deal: Deal | None = Field(None, alias="Deal")

    @model_validator(mode="before")
    @classmethod
    def _fill_client_defaults(cls, data: object) -> object:
        """Apply what the Bacalhau CLI does before sending: default Deal, migrate Publisher."""
        canonical = canonical_keys(cls, data)
        if not isinstance(canonical, Mapping):
            return canonical
        data = dict(canonical)  # its own copy: the defaults below are set in it
        if data.get("Deal") is None:
            data["Deal"] = {"Concurrency": 1}
        publisher = data.get("Publisher")
        target = data.get("PublisherSpec")
        if publisher is not None and (target is None or _spec_type_missing(target)):
            try:
                member = _read_publisher(publisher)
            except ValueError:
                return data  # the Publisher field reports it, under its own name
            data["PublisherSpec"] = {**(target or {}), "Type": member.value}
        return data

    @model_validator(mode="after")
    def _runnable(self) -> Self:
        if self.engine is None:
            raise ValueError("Engine: required (one of Noop, Docker, Wasm)")
        if self.publisher_spec is None or self.publisher_spec.type is None:
            raise ValueError("PublisherSpec.Type: required (or the deprecated Publisher)")
        if self.engine is Engine.DOCKER and not (self.docker and self.docker.image):
            raise ValueError("Docker.Image: required for the Docker engine")
        if self.engine is Engine.WASM and not (self.wasm and self.wasm.entry_module):
            raise ValueError("Wasm.EntryModule: required for the Wasm engine")
        for index, storage in enumerate(self.inputs or []):
            if storage.storage_source is None:
                raise ValueError(f"Inputs.{index}.StorageSource: required")
        return self


_read_publisher = _enum_reader(Publisher)


def _spec_type_missing(target: object) -> bool:
    if not isinstance(target, Mapping):
        return False
    return not any(_fold(str(key)) == "type" and value for key, value in target.items())


def parse_spec(data: object) -> Spec:
    """Validate one Spec (raises :class:`pydantic.ValidationError`, never echoing input)."""
    return Spec.model_validate(data)


def to_wire(spec: Spec) -> dict[str, Any]:
    """The Spec as Bacalhau's JSON decoder reads it: Go names, string enums, no empties.

    The deprecated ``Publisher`` is left out: it was copied into ``PublisherSpec.Type``, and
    the requester sets it from there anyway (docs/wire-legacy.md, Validation on submit).
    """
    return spec.model_dump(mode="json", exclude={"publisher"})


def canonical_json(value: object) -> bytes:
    """Compact JSON with sorted keys: the one byte form that hashes are taken over."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def wire_json(spec: Spec) -> bytes:
    """The canonical bytes of the Spec's wire form: what its hash is taken over."""
    return canonical_json(to_wire(spec))


def hash_wire(wire: bytes) -> str:
    """SHA-256 of canonical wire JSON: reformatting a file never changes it."""
    return hashlib.sha256(wire).hexdigest()


def spec_hash(spec: Spec) -> str:
    return hash_wire(wire_json(spec))
