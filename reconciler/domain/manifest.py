"""Manifest files -> :class:`Manifest` objects, or one-line :class:`LoadError` each.

Two forms are read, from YAML (several documents allowed) or JSON:

1. the native Bacalhau job file, exactly what ``bacalhau create`` reads (``APIVersion`` and
   ``Spec``, keys case-insensitive); its name is the file's stem, lower-cased;
2. an orchestrator job file, exactly what ``bacalhau job run`` reads (``Type``, ``Count``,
   ``Tasks``, ...; ``domain/jobspec.py``); its name is ``Name``, else the file's stem, lower-cased;
3. the reconciler envelope::

       apiVersion: reconciler/v1
       kind: Job
       metadata: {name: nightly-report, labels: {team: data}}
       spec: {...a Bacalhau V1beta1 Spec...}   # or job: {...an orchestrator Job...}
       policy: {onChange: replace, onRemove: cancel, onFailure: none, maxRetries: 3}

   and, for a scheduled manifest, ``schedule`` (cron), ``timezone``, ``concurrency``,
   ``startingDeadline``, ``keepRuns`` and ``suspend`` in ``policy`` (``domain/schedule.py``);

Errors are rendered ``path:line: field.path: message`` from pydantic's
``errors(include_input=False)``, one per problem: no input value is ever echoed, so secrets
in a broken manifest stay out of logs. A document whose spec is broken but whose name can
still be read reports that name, so the planner holds its job even if the file moved.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from reconciler.domain.approval import ApprovalPolicy
from reconciler.domain.jobspec import LONG_RUNNING_TYPES, Job, job_problems, job_wire
from reconciler.domain.schedule import Schedule, check_expression, check_timezone
from reconciler.domain.spec import (
    Spec,
    canonical_json,
    canonical_keys,
    hash_wire,
    parse_spec,
    wire_json,
)

__all__ = [
    "MAX_FILE_BYTES",
    "FileResult",
    "LoadError",
    "Manifest",
    "Policy",
    "is_manifest_name",
    "load_file",
    "wanted_file",
]

MAX_FILE_BYTES = 1024 * 1024
# libyaml when PyYAML has it: ~40x faster on large scalars, and it refuses absurd nesting at
# once instead of recursing until Python gives up (0.5 s per 5,000-deep file).
_COMPOSER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
MAX_NODES = 100_000  # values in one document after alias expansion: stops YAML bombs
ENVELOPE_API = "reconciler/v1"
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
#: Which form a manifest's job is in: a V1beta1 Spec or an orchestrator Job.
JobForm = Literal["v1beta1", "orchestrator"]
V1BETA1: Final = "v1beta1"
ORCHESTRATOR: Final = "orchestrator"
_SUFFIXES = (".yaml", ".yml", ".json")


def is_manifest_name(name: str) -> bool:
    return bool(_NAME.match(name))


def is_id_like(name: str) -> bool:
    """Could be taken for a job id prefix: Bacalhau v1.8+ looks ``{idOrName}`` up by name, then
    by id prefix, so a missing name ``j-0a`` finds another job (docs/wire-orchestrator.md 4.1)."""
    return name == "j" or name.startswith("j-")


def wanted_file(name: str) -> bool:
    """Manifest files by suffix; hidden files and editor leftovers are ignored."""
    if name.startswith((".", "#")) or name.endswith(("~", "#")) or name == "4913":
        return False
    return name.lower().endswith(_SUFFIXES)


class Policy(BaseModel):
    """What to do with a manifest's job on change, removal and failure; and, with ``schedule``,
    when to run it (``domain/schedule.py``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    on_change: Literal["replace", "keep"] = Field("replace", alias="onChange")
    on_remove: Literal["cancel", "orphan"] = Field("cancel", alias="onRemove")
    on_failure: Literal["none", "resubmit"] = Field("none", alias="onFailure")
    max_retries: StrictInt = Field(3, alias="maxRetries", ge=0, le=100)
    schedule: str | None = None
    timezone: str = "UTC"
    concurrency: Literal["forbid", "allow", "replace"] = "forbid"
    starting_deadline: StrictInt | None = Field(None, alias="startingDeadline", ge=1)
    keep_runs: StrictInt = Field(5, alias="keepRuns", ge=0, le=100)
    suspend: StrictBool = False

    # The checks' messages never repeat the value (a pasted token stays out of logs).
    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, value: str | None) -> str | None:
        if value is not None:
            check_expression(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, value: str) -> str:
        return check_timezone(value)

    @model_validator(mode="after")
    def _schedule_fields_need_a_schedule(self) -> Policy:
        # A timezone or deadline without a schedule is a mistake (a deleted or misspelt line),
        # not something to ignore silently.
        if self.schedule is None:
            stray = sorted(_SCHEDULE_ONLY.get(name, name) for name in self.model_fields_set
                           if name in _SCHEDULE_ONLY)
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply with schedule")
        return self

    def as_schedule(self) -> Schedule | None:
        """The schedule model, or ``None`` for a manifest that runs once."""
        if self.schedule is None:
            return None
        return Schedule(self.schedule, self.timezone, self.concurrency, self.starting_deadline,
                        self.keep_runs, self.suspend)


_SCHEDULE_ONLY = {"timezone": "timezone", "concurrency": "concurrency",
                  "starting_deadline": "startingDeadline", "keep_runs": "keepRuns",
                  "suspend": "suspend"}


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str
    labels: dict[str, str] = Field(default_factory=dict)


class _Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["Job"]
    metadata: _Metadata
    spec: Spec | None = None
    job: Job | None = None
    policy: Policy = Field(default_factory=Policy)


class _PolicyEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["ApprovalPolicy"]
    metadata: _Metadata
    spec: ApprovalPolicy


class _Native(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    api_version: str = Field(alias="APIVersion", min_length=1)
    spec: Spec = Field(alias="Spec")
    metadata: dict[str, Any] | None = Field(None, alias="Metadata")


DEFAULT_POLICY = Policy()


@dataclass(frozen=True, slots=True)
class Manifest:
    """One desired job. The spec is kept as its canonical wire JSON (about 100 bytes, against
    3 KB for the validated model): thousands of these live in the parse cache."""

    name: str
    wire_json: bytes = field(repr=False)
    spec_hash: str
    path: str
    line: int = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    policy: Policy = DEFAULT_POLICY
    #: ``v1beta1``: ``wire_json`` is a V1beta1 Spec; ``orchestrator``: an orchestrator Job.
    #: A backend reads the other form through ``domain/translate.py``.
    form: JobForm = V1BETA1
    #: The orchestrator job type (``batch`` for a V1beta1 Spec, ``ops`` when it targets all).
    job_type: str = "batch"

    @property
    def long_running(self) -> bool:
        """A service or daemon job: never completes, kept running."""
        return self.job_type in LONG_RUNNING_TYPES

    @classmethod
    def of_job(cls, name: str, job: Job, path: str, line: int = 1,
               labels: Mapping[str, str] | None = None, policy: Policy | None = None
               ) -> Manifest:
        wire = canonical_json(job_wire(job))
        return cls(name, wire, hash_wire(wire), path, line, labels or {},
                   DEFAULT_POLICY if policy is None or policy == DEFAULT_POLICY else policy,
                   ORCHESTRATOR, job.type)

    @classmethod
    def of(cls, name: str, spec: Spec, path: str, line: int = 1,
           labels: Mapping[str, str] | None = None, policy: Policy | None = None) -> Manifest:
        wire = wire_json(spec)
        return cls(name, wire, hash_wire(wire), path, line, labels or {},
                   DEFAULT_POLICY if policy is None or policy == DEFAULT_POLICY else policy,
                   V1BETA1, "ops" if spec.deal is not None and spec.deal.targeting_mode
                   else "batch")

    def wire(self) -> dict[str, Any]:
        """The spec as sent: Go names, string enums (in the manifest's own ``form``)."""
        value: dict[str, Any] = json.loads(self.wire_json)
        return value


@dataclass(frozen=True)
class PolicyManifest:
    """One approval policy (``kind: ApprovalPolicy``)."""

    name: str
    policy: ApprovalPolicy = field(repr=False)
    body_hash: str
    path: str
    line: int = 1


@dataclass(frozen=True)
class LoadError:
    """One problem with one file, renderable on one line, naming no input value."""

    path: str
    line: int
    field: str
    message: str
    #: Names this (broken) document still claims, when they could be read.
    names: tuple[str, ...] = ()
    #: What kind of document claims them: "Job" or "ApprovalPolicy".
    kind: str = "Job"

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.message}"


@dataclass(frozen=True)
class FileResult:
    path: str
    manifests: tuple[Manifest, ...] = ()
    errors: tuple[LoadError, ...] = ()
    policies: tuple[PolicyManifest, ...] = ()


def load_file(path: str, data: bytes) -> FileResult:
    """Parse one file's bytes; ``path`` is relative to the manifests folder."""
    if len(data) > MAX_FILE_BYTES:
        return _fail(path, "file", f"larger than {MAX_FILE_BYTES} bytes; refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return _fail(path, "file", "not UTF-8 text")
    if "\x00" in text:
        return _fail(path, "file", "binary content (NUL byte)")
    try:
        documents = list(_documents(path, text))
    except _ParseError as exc:
        return _fail(path, "file", str(exc), line=exc.line)
    stem = PurePosixPath(path).stem.lower()
    manifests: list[Manifest] = []
    errors: list[LoadError] = []
    policies: list[PolicyManifest] = []
    for doc in documents:
        outcome = _read_document(path, stem, doc)
        if isinstance(outcome, Manifest):
            manifests.append(outcome)
        elif isinstance(outcome, PolicyManifest):
            policies.append(outcome)
        elif isinstance(outcome, LoadError):
            errors.append(outcome)
        else:
            errors.extend(outcome)
    if not manifests and not errors and not policies:
        errors.append(LoadError(path, 1, "file", "no documents"))
    return FileResult(path, tuple(manifests), tuple(errors), tuple(policies))


def _fail(path: str, where: str, message: str, line: int = 1) -> FileResult:
    return FileResult(path, errors=(LoadError(path, line, where, message),))


# --- documents -------------------------------------------------------------------------------


class _ParseError(ValueError):
    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


class _Document:
    """One document's value, and its YAML node for the line numbers of errors."""

    __slots__ = ("_node", "_text", "line", "value")

    def __init__(self, value: object, node: yaml.Node | None, line: int,
                 text: str | None = None) -> None:
        self.value = value
        self.line = line
        self._node = node
        #: A JSON file's text, composed only if an error asks for a line: a valid file never
        #: is (composing it cost as much as parsing it: docs/performance.md).
        self._text = text

    @property
    def node(self) -> yaml.Node | None:
        if self._text is not None:
            text, self._text = self._text, None
            try:
                self._node = yaml.compose(text, Loader=_COMPOSER)
            except (yaml.YAMLError, RecursionError):
                self._node = None
        return self._node


def _documents(path: str, text: str) -> Iterator[_Document]:
    if path.lower().endswith(".json"):
        yield _json_document(text)
        return
    # One loader composes every node (kept for line numbers), then constructs each: a fresh
    # pure-Python loader per document cost about a tenth of parsing a manifest
    # (docs/performance.md). Every document is composed before any is constructed, so a
    # syntax error anywhere is reported first, as before.
    loader = _COMPOSER(text)
    try:
        try:
            nodes = []
            while loader.check_node():
                nodes.append(loader.get_node())
        except yaml.MarkedYAMLError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else 1
            message = f"invalid YAML: {exc.problem or 'syntax error'}"
            if exc.context and exc.context_mark and exc.context_mark.line + 1 != line:
                message += f" ({exc.context} started at line {exc.context_mark.line + 1})"
            raise _ParseError(message, line) from None
        except RecursionError:
            raise _ParseError("invalid YAML: nested too deeply") from None
        except yaml.YAMLError as exc:
            raise _ParseError(f"invalid YAML: {type(exc).__name__}") from None
        for node in nodes:
            if node is None:
                continue
            yield _Document(_construct(loader, node), node, node.start_mark.line + 1)
    finally:
        loader.dispose()


def _json_document(text: str) -> _Document:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _ParseError(f"invalid JSON: {exc.msg}", exc.lineno) from None
    except RecursionError:
        raise _ParseError("invalid JSON: nested too deeply") from None
    return _Document(value, None, 1, text)


_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
#: Scalars whose SafeConstructor method returns the value at once (not a generator).
_PLAIN_SCALARS = frozenset(f"tag:yaml.org,2002:{kind}"
                           for kind in ("null", "bool", "int", "float"))


class _NotPlain(Exception):
    """A node the plain walk leaves to PyYAML's own constructor."""


def _construct(loader: Any, node: yaml.Node) -> object:
    try:
        try:
            # The plain walk first: PyYAML's constructor is pure Python, about a fifth of
            # parsing a manifest (docs/performance.md).
            seen: set[int] = set()
            value = _plain(loader, node, seen)
        except (_NotPlain, RecursionError):  # PyYAML's own walk is not recursive
            value = loader.construct_document(node)
        else:
            # No alias on the plain walk: every node is one value, counted as _check_size does.
            if len(seen) > MAX_NODES:
                raise _ParseError(f"document expands to more than {MAX_NODES} values; refused")
            return value
    except RecursionError:
        raise _ParseError("invalid YAML: nested too deeply", node.start_mark.line + 1) from None
    except yaml.YAMLError as exc:
        raise _ParseError(f"invalid YAML: {type(exc).__name__}", node.start_mark.line + 1) from None
    _check_size(value)
    return value


def _plain(loader: Any, node: yaml.Node, seen: set[int]) -> object:
    """What ``SafeConstructor`` makes of a document of plain mappings, sequences, strings,
    numbers, booleans and nulls; :class:`_NotPlain` for anything else (an alias or anchor used
    twice, a merge key, a complex key, any other tag), which PyYAML then constructs itself, so
    the values and the errors stay PyYAML's."""
    if id(node) in seen:  # an alias: PyYAML shares the object (and checks the size after)
        raise _NotPlain
    seen.add(id(node))
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        if tag == _STR_TAG:
            return node.value
        if tag in _PLAIN_SCALARS:
            return loader.yaml_constructors[tag](loader, node)
        raise _NotPlain
    if isinstance(node, yaml.MappingNode) and tag == _MAP_TAG:
        mapping: dict[object, object] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in _KEY_TAGS:
                raise _NotPlain  # a merge key (<<), a complex or tagged key
            mapping[_plain(loader, key_node, seen)] = _plain(loader, value_node, seen)
        return mapping
    if isinstance(node, yaml.SequenceNode) and tag == _SEQ_TAG:
        return [_plain(loader, item, seen) for item in node.value]
    raise _NotPlain


_KEY_TAGS = _PLAIN_SCALARS | {_STR_TAG}


def _check_size(value: object) -> None:
    """Count values as they would be expanded; aliases make a small file a huge document."""
    budget = MAX_NODES
    stack = [value]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            raise _ParseError(f"document expands to more than {MAX_NODES} values; refused")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


Outcome = Manifest | PolicyManifest | LoadError | tuple[LoadError, ...]


def _read_document(path: str, stem: str, doc: _Document) -> Outcome:
    value = doc.value
    if not isinstance(value, dict):
        return LoadError(path, doc.line, "document", "must be a mapping")
    unsupported = _unsupported_api(path, doc, value)
    if unsupported is not None:
        return unsupported
    if _is_envelope(value) and value.get("kind") == "ApprovalPolicy":
        return _read_policy(path, doc, value)
    if _is_envelope(value):
        return _read_envelope(path, doc, value)
    if _is_orchestrator_job(value):
        return _read_orchestrator(path, stem, doc, value)
    return _read_native(path, stem, doc, value)


def _is_envelope(value: Mapping[object, object]) -> bool:
    return any(
        isinstance(key, str) and key.lower() == "apiversion" and val == ENVELOPE_API
        for key, val in value.items()
    )


def _unsupported_api(path: str, doc: _Document, value: dict[Any, Any]) -> LoadError | None:
    """``reconciler/v2`` is a newer envelope, not a native job file with odd fields."""
    for key, val in value.items():
        if (isinstance(key, str) and key.lower() == "apiversion" and isinstance(val, str)
                and val.startswith("reconciler/") and val != ENVELOPE_API):
            return LoadError(path, _line_of(doc, (key,)), key,
                             f"unsupported apiVersion (this reconciler reads {ENVELOPE_API})",
                             _claimed_name(value))
    return None


def _read_envelope(path: str, doc: _Document, value: dict[Any, Any]) -> Outcome:
    claimed = _claimed_name(value)
    # Exactly one of spec (V1beta1) and job (orchestrator): checked first, so that two
    # half-written jobs are not both reported field by field.
    given = [key for key in ("spec", "job") if value.get(key) is not None]
    if len(given) == 2:
        return LoadError(path, _line_of(doc, ("job",)), "job",
                         "give spec (a V1beta1 Spec) or job (an orchestrator Job), not both",
                         claimed)
    missing = () if given else (
        LoadError(path, doc.line, "spec", "Field required (or job: an orchestrator Job)",
                  claimed),)
    try:
        envelope = _Envelope.model_validate(value)
    except ValidationError as exc:
        return _validation_errors(path, doc, exc, claimed, _Envelope) + missing
    if missing:
        return missing
    name = envelope.metadata.name
    if not is_manifest_name(name):
        return _name_error(path, _line_of(doc, ("metadata", "name")), "metadata.name")
    if is_id_like(name):
        return _id_like_error(path, _line_of(doc, ("metadata", "name")), "metadata.name")
    if envelope.job is not None:
        if envelope.job.name not in (None, name):
            # The manifest's name is the job's name on the server (name mode).
            return LoadError(path, _line_of(doc, ("job", "Name")), "job.Name",
                             "differs from metadata.name (leave it out)", claimed)
        problems = _job_errors(path, doc, envelope.job, ("job",), claimed)
        if problems:
            return problems
        return Manifest.of_job(name, envelope.job, path, doc.line, envelope.metadata.labels,
                               envelope.policy)
    assert envelope.spec is not None
    return Manifest.of(name, envelope.spec, path, doc.line, envelope.metadata.labels,
                       envelope.policy)


def _job_errors(path: str, doc: _Document, job: Job, prefix: tuple[str, ...],
                claimed: tuple[str, ...]) -> tuple[LoadError, ...]:
    """The server's submit rules, offline, for the newest server (docs/wire-orchestrator.md 5);
    a backend re-checks the rules that depend on its server's version."""
    return tuple(
        LoadError(path, _line_of(doc, (*prefix, *loc)), _field_path((*prefix, *loc)),
                  message, claimed)
        for loc, message in job_problems(job))


def _is_orchestrator_job(value: Mapping[Any, Any]) -> bool:
    """An orchestrator job file has ``Tasks`` (or ``Type``) and no V1beta1 ``Spec``."""
    keys = {key.lower() for key in value if isinstance(key, str)}
    return "spec" not in keys and "apiversion" not in keys and bool(keys & {"tasks", "type"})


def _read_orchestrator(path: str, stem: str, doc: _Document, value: dict[Any, Any]) -> Outcome:
    named = next((val for key, val in value.items()
                  if isinstance(key, str) and key.lower() == "name"), None)
    name = named if isinstance(named, str) and named else stem
    where = "Name" if isinstance(named, str) and named else "file name"
    line = _line_of(doc, ("Name",)) if where == "Name" else doc.line
    claimed = (name,) if is_manifest_name(name) and not is_id_like(name) else ()
    try:
        job = Job.model_validate(value)
    except ValidationError as exc:
        return _validation_errors(path, doc, exc, claimed, Job)
    except ValueError as exc:
        return LoadError(path, doc.line, "document", str(exc), claimed)
    if not is_manifest_name(name):
        return _name_error(path, line, where)
    if is_id_like(name):
        return _id_like_error(path, line, where)
    problems = _job_errors(path, doc, job, (), claimed)
    if problems:
        return problems
    return Manifest.of_job(name, job, path, doc.line)


def _read_policy(path: str, doc: _Document, value: dict[Any, Any]) -> Outcome:
    claimed = _claimed_name(value)
    try:
        envelope = _PolicyEnvelope.model_validate(value)
    except ValidationError as exc:
        return tuple(
            LoadError(e.path, e.line, e.field, e.message, claimed, "ApprovalPolicy")
            for e in _validation_errors(path, doc, exc, claimed, _PolicyEnvelope))
    name = envelope.metadata.name
    if not is_manifest_name(name):
        return _name_error(path, _line_of(doc, ("metadata", "name")), "metadata.name")
    body = canonical_json(envelope.spec.model_dump(mode="json", by_alias=True))
    return PolicyManifest(name, envelope.spec, hash_wire(body), path, doc.line)


def _read_native(path: str, stem: str, doc: _Document, value: dict[Any, Any]) -> Outcome:
    claimed = (stem,) if is_manifest_name(stem) else ()
    try:
        native = _Native.model_validate(canonical_keys(_Native, value))
    except (ValidationError, ValueError) as exc:
        if isinstance(exc, ValidationError):
            return _validation_errors(path, doc, exc, claimed, _Native)
        return LoadError(path, doc.line, "document", str(exc), claimed)
    if not claimed:
        return _name_error(path, doc.line, "file name")
    if is_id_like(stem):
        return _id_like_error(path, doc.line, "file name")
    spec = parse_spec(native.spec.model_dump(mode="json"))
    return Manifest.of(stem, spec, path, doc.line)


def _claimed_name(value: Mapping[Any, Any]) -> tuple[str, ...]:
    metadata = value.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    return (name,) if isinstance(name, str) and is_manifest_name(name) else ()


def _name_error(path: str, line: int, where: str) -> LoadError:
    return LoadError(
        path, line, where,
        "not a valid manifest name: 1-63 of a-z 0-9 . _ - starting with a letter or digit",
    )


def _id_like_error(path: str, line: int, where: str) -> LoadError:
    return LoadError(path, line, where,
                     "must not be j or start with j-: Bacalhau could take it for a job id prefix")


def _validation_errors(
    path: str, doc: _Document, exc: ValidationError, claimed: tuple[str, ...],
    model: type[BaseModel],
) -> tuple[LoadError, ...]:
    """Every problem, each as ``field.path: message`` (``validate`` lists them all; an
    unknown field names the nearest known one). No input value is echoed."""
    errors = exc.errors(include_input=False, include_url=False, include_context=False)
    found: list[LoadError] = []
    for error in errors:
        loc = error["loc"]
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden" and loc and isinstance(loc[-1], str):
            nearest = _nearest_field(model, loc[:-1], loc[-1])
            if nearest:
                message += f" (did you mean `{nearest}`?)"
        found.append(LoadError(path, _line_of(doc, loc), _field_path(loc) or "document",
                               message, claimed))
    return tuple(found)


def _nearest_field(root: type[BaseModel], parent: Sequence[int | str], key: str) -> str | None:
    """The known field of the model at ``parent`` closest to ``key``, written in the style of
    ``key`` (``image`` for ``imgae``; Go's ``Image`` for ``Imgae``)."""
    model: type[BaseModel] | None = root
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for name, f in model.model_fields.items()
                      if part in (name, f.alias)), None)
        model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return None
    names = {(f.alias or name).replace("_", "").lower(): f.alias or name
             for name, f in model.model_fields.items()}
    match = difflib.get_close_matches(key.replace("_", "").lower(), list(names), n=1,
                                      cutoff=0.6)
    if not match:
        return None
    wanted = names[match[0]]
    if key[:1].islower() and wanted[:1].isupper():
        wanted = wanted.lower() if wanted.isupper() else wanted[0].lower() + wanted[1:]
    return wanted


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The pydantic model inside ``X``, ``X | None``, ``list[X]`` or ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for argument in typing.get_args(annotation):
        model = _model_in(argument)
        if model is not None:
            return model
    return None


def _field_path(loc: Sequence[int | str]) -> str:
    # A key may hold a newline (`{"\n"}`); the error must stay one line.
    return ".".join(str(part).encode("unicode_escape").decode("ascii") for part in loc)


def _line_of(doc: _Document, loc: Sequence[int | str]) -> int:
    """The line of the deepest node along ``loc`` (keys matched case- and _-insensitively)."""
    node, line = doc.node, doc.line
    for part in loc:
        child = _child(node, part)
        if child is None:
            break
        node, line = child, child.start_mark.line + 1
    return line


def _child(node: yaml.Node | None, part: int | str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        wanted = str(part).replace("_", "").lower()
        for key, value in node.value:
            if str(key.value).replace("_", "").lower() == wanted:
                return value  # type: ignore[no-any-return]
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]  # type: ignore[no-any-return]
    return None
