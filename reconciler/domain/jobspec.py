"""The orchestrator ``models.Job`` (Bacalhau v1.5+): model, offline validation, canonical wire
JSON, and the rules a backend needs to send it cleanly (docs/wire-orchestrator.md).

Input is read as spec.py reads a V1beta1 Spec: keys match case-insensitively (Go's decoder does
the same), unknown keys are *rejected* (Go ignores them: in a manifest they are typos). The
structure is checked by the pydantic models; the server's submit rules (docs/wire-orchestrator.md
section 5) are checked by :func:`job_problems`, which names the exact field of each problem so
that ``validate`` can give its line.

The canonical wire form (:func:`job_wire`) uses Go names, lower-case engine, publisher and
source types and leaves empty values out, except ``Type`` and ``Count``, which always travel
(an omitted ``Count`` meant 0 on v1.5 and 1 later). Its hash is spec.py's :func:`hash_wire`:
one definition of a spec hash for both forms.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictInt, model_validator

from reconciler.domain.spec import WireModel, canonical_json, hash_wire

__all__ = [
    "JOB_TYPES",
    "LONG_RUNNING_TYPES",
    "NEWEST",
    "Job",
    "Problem",
    "hygienic",
    "job_hash",
    "job_problems",
    "job_wire",
    "network_problems",
    "parse_job",
]

JOB_TYPES = ("batch", "ops", "service", "daemon")
#: Jobs that never complete: the server runs them until they are stopped or fail.
LONG_RUNNING_TYPES = frozenset({"service", "daemon"})
#: The newest server version this code knows the rules of; ``validate`` checks against it.
NEWEST = (1, 9)
#: Keys the server sets; a job file taken from ``bacalhau job describe`` carries them.
OUTPUT_ONLY = ("ID", "State", "Version", "Revision", "CreateTime", "ModifyTime")
RESERVED_META = "bacalhau.org/"

#: A problem: where (a path of keys under the job) and what, never the value.
Problem = tuple[tuple[int | str, ...], str]


def _lower_type(value: object) -> object:
    # The compute node looks types up lower-cased, but the server's update diff compares them
    # exactly: always the lower-case spelling (docs/wire-orchestrator.md section 9).
    return value.strip().lower() if isinstance(value, str) else value


def _number_text(value: object) -> object:
    # YAML turns `CPU: 1` into an int; the wire wants the string "1".
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


LowerType = Annotated[str, BeforeValidator(_lower_type)]
NumberText = Annotated[str, BeforeValidator(_number_text)]


class SpecConfig(WireModel):
    """``{Type, Params}``: an engine, publisher or input source."""

    type: LowerType = Field("", alias="Type")
    params: dict[str, Any] | None = Field(None, alias="Params")


class InputSource(WireModel):
    source: SpecConfig | None = Field(None, alias="Source")
    alias: str | None = Field(None, alias="Alias")
    target: str | None = Field(None, alias="Target")


class ResultPath(WireModel):
    name: str | None = Field(None, alias="Name")
    path: str | None = Field(None, alias="Path")


class Resources(WireModel):
    cpu: NumberText | None = Field(None, alias="CPU")
    memory: NumberText | None = Field(None, alias="Memory")
    disk: NumberText | None = Field(None, alias="Disk")
    gpu: NumberText | None = Field(None, alias="GPU")


class Port(WireModel):
    name: str | None = Field(None, alias="Name")
    static: StrictInt | None = Field(None, alias="Static")
    target: StrictInt | None = Field(None, alias="Target")
    host_network: str | None = Field(None, alias="HostNetwork")


class Network(WireModel):
    type: str | None = Field(None, alias="Type")
    domains: list[str] | None = Field(None, alias="Domains")
    ports: list[Port] | None = Field(None, alias="Ports")


class Timeouts(WireModel):
    execution_timeout: StrictInt = Field(0, alias="ExecutionTimeout")
    queue_timeout: StrictInt = Field(0, alias="QueueTimeout")
    total_timeout: StrictInt = Field(0, alias="TotalTimeout")


#: A task without ``Timeouts`` (frozen, so shared): one model fewer built per job checked.
_NO_TIMEOUTS = Timeouts()


class Task(WireModel):
    name: str | None = Field(None, alias="Name")
    engine: SpecConfig | None = Field(None, alias="Engine")
    publisher: SpecConfig | None = Field(None, alias="Publisher")
    env: dict[str, str] | None = Field(None, alias="Env")
    meta: dict[str, str] | None = Field(None, alias="Meta")
    input_sources: list[InputSource] | None = Field(None, alias="InputSources")
    result_paths: list[ResultPath] | None = Field(None, alias="ResultPaths")
    resources: Resources | None = Field(None, alias="Resources")
    network: Network | None = Field(None, alias="Network")
    timeouts: Timeouts | None = Field(None, alias="Timeouts")


class Constraint(WireModel):
    key: str = Field("", alias="Key")
    operator: str = Field("", alias="Operator")
    values: list[str] | None = Field(None, alias="Values")


class Job(WireModel):
    """An orchestrator job as ``bacalhau job run`` reads it."""

    name: str | None = Field(None, alias="Name")
    namespace: str | None = Field(None, alias="Namespace")
    type: str = Field(alias="Type")
    priority: StrictInt = Field(0, alias="Priority")
    count: StrictInt | None = Field(None, alias="Count")
    constraints: list[Constraint] | None = Field(None, alias="Constraints")
    meta: dict[str, str] | None = Field(None, alias="Meta")
    labels: dict[str, str] | None = Field(None, alias="Labels")
    tasks: list[Task] = Field(alias="Tasks")

    @model_validator(mode="before")
    @classmethod
    def _no_output_fields(cls, data: object) -> object:
        # A job file copied from the server's output: refused with a reason, not as a typo.
        if isinstance(data, Mapping):
            for key in data:
                if isinstance(key, str) and key.lower() in _OUTPUT_KEYS:
                    raise ValueError(f"{_OUTPUT_KEYS[key.lower()]}: set by the server, "
                                     "never sent (remove it)")
        return data

    @property
    def long_running(self) -> bool:
        return self.type in LONG_RUNNING_TYPES


_OUTPUT_KEYS = {key.lower(): key for key in OUTPUT_ONLY}


def parse_job(data: object) -> Job:
    """Structure only (raises :class:`pydantic.ValidationError`, never echoing input); the
    submit rules are :func:`job_problems`."""
    return Job.model_validate(data)


# --- the server's submit rules (docs/wire-orchestrator.md section 5) --------------------------

_CPU = re.compile(r"^(\d+(\.\d+)?|\.\d+)(m)?$")
_BYTES = re.compile(r"^(\d+(\.\d+)?)\s*([kmgtpe]i?b?|b)?$", re.IGNORECASE)
_GPU = re.compile(r"^\d+$")
_ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
_OPERATORS = frozenset({"=", "==", "!=", "in", "notin", "exists", "!", "gt", "lt"})
#: Network types each server version decodes (docs/wire-orchestrator.md section 1).
_NETWORKS: dict[tuple[int, int], frozenset[str]] = {
    (1, 5): frozenset({"None", "Full", "HTTP"}),
    (1, 6): frozenset({"None", "Host", "HTTP", "Bridge", "Full"}),
    (1, 7): frozenset({"Default", "None", "Host", "Full", "HTTP", "Bridge"}),
}
_NETWORK_SPELLING = {name.lower(): name for name in _NETWORKS[(1, 7)]}


def _networks_of(version: tuple[int, int]) -> frozenset[str]:
    known = [v for v in _NETWORKS if v <= version]
    return _NETWORKS[max(known)] if known else _NETWORKS[(1, 5)]


def job_problems(job: Job, version: tuple[int, int] = NEWEST) -> list[Problem]:
    """Every rule the server checks at submit, for a server of ``version``. ``validate`` checks
    the newest; a backend re-checks with the version it talks to (only the network rules
    differ)."""
    found: list[Problem] = []
    if job.type not in JOB_TYPES:
        found.append((("Type",), "must be one of " + ", ".join(JOB_TYPES)))
    if job.count is not None and job.count < 0:
        found.append((("Count",), "must be >= 0"))
    elif job.type in ("ops", "daemon") and (job.count or 0) > 1:
        found.append((("Count",), f"must be 0 or 1 for {job.type} jobs (they run on every node)"))
    if job.priority < 0:
        found.append((("Priority",), "must be >= 0"))
    for key in job.meta or {}:
        if key.startswith(RESERVED_META):
            found.append((("Meta", key), f"keys starting {RESERVED_META} are the server's"))
    for index, constraint in enumerate(job.constraints or []):
        found.extend((("Constraints", index, *loc), message)
                     for loc, message in _constraint_problems(constraint))
    if not job.tasks:
        found.append((("Tasks",), "one task is required"))
    elif len(job.tasks) > 1:
        # The server keeps the first and drops the others with a warning: never silently.
        found.append((("Tasks",), "exactly one task is used; the server drops the others"))
    for index, task in enumerate(job.tasks[:1]):
        found.extend((("Tasks", index, *loc), message)
                     for loc, message in _task_problems(task, version))
    return found


def _constraint_problems(constraint: Constraint) -> list[Problem]:
    if not constraint.key.strip():
        return [(("Key",), "required")]
    if constraint.operator not in _OPERATORS:
        return [(("Operator",), "expected one of " + ", ".join(sorted(_OPERATORS)))]
    values = constraint.values or []
    if constraint.operator in ("in", "notin") and not values:
        return [(("Values",), f"required for operator {constraint.operator}")]
    if constraint.operator in ("exists", "!") and values:
        return [(("Values",), f"must be empty for operator {constraint.operator}")]
    if constraint.operator not in ("in", "notin", "exists", "!") and len(values) != 1:
        return [(("Values",), f"exactly one value for operator {constraint.operator}")]
    return []


def _task_problems(task: Task, version: tuple[int, int]) -> list[Problem]:
    found: list[Problem] = []
    if not (task.name or "").strip() or "\x00" in (task.name or ""):
        found.append((("Name",), "required"))
    if task.engine is None or not task.engine.type:
        found.append((("Engine", "Type"), "required (docker, wasm or noop)"))
    for name, value in (task.env or {}).items():
        if not _ENV_NAME.match(name) or name.startswith("BACALHAU_"):
            found.append((("Env", name), "names are A-Z, 0-9 and _, starting with a letter, "
                                         "not BACALHAU_"))
        elif not value:
            found.append((("Env", name), "value must not be empty"))
    for key in task.meta or {}:
        if key.startswith(RESERVED_META):
            found.append((("Meta", key), f"keys starting {RESERVED_META} are the server's"))
    found.extend(_resource_problems(task.resources))
    aliases: set[str] = set()
    targets: set[str] = set()
    for index, source in enumerate(task.input_sources or []):
        where = ("InputSources", index)
        if source.source is None or not source.source.type:
            found.append(((*where, "Source", "Type"), "required"))
        if not source.target:
            found.append(((*where, "Target"), "required (where it is mounted)"))
        elif source.target in targets:
            found.append(((*where, "Target"), "given twice"))
        if source.alias and source.alias in aliases:
            found.append(((*where, "Alias"), "given twice"))
        aliases.add(source.alias or "")
        targets.add(source.target or "")
    names: set[str] = set()
    paths: set[str] = set()
    for index, result in enumerate(task.result_paths or []):
        where = ("ResultPaths", index)
        if not result.name:
            found.append(((*where, "Name"), "required"))
        elif result.name in names:
            found.append(((*where, "Name"), "given twice"))
        if not result.path or not result.path.startswith("/"):
            found.append(((*where, "Path"), "must be an absolute path"))
        elif result.path in paths:
            found.append(((*where, "Path"), "given twice"))
        names.add(result.name or "")
        paths.add(result.path or "")
    if task.result_paths and (task.publisher is None or not task.publisher.type):
        found.append((("Publisher", "Type"), "required when ResultPaths are set"))
    timeouts = task.timeouts or _NO_TIMEOUTS
    for timeout, seconds in (("ExecutionTimeout", timeouts.execution_timeout),
                             ("QueueTimeout", timeouts.queue_timeout),
                             ("TotalTimeout", timeouts.total_timeout)):
        if seconds < 0:
            found.append((("Timeouts", timeout), "must be >= 0"))
    if (timeouts.total_timeout > 0
            and timeouts.execution_timeout + timeouts.queue_timeout > timeouts.total_timeout):
        found.append((("Timeouts", "TotalTimeout"),
                      "must be at least ExecutionTimeout + QueueTimeout"))
    found.extend(network_problems(task.network, version))
    return found


def _resource_problems(resources: Resources | None) -> list[Problem]:
    if resources is None:
        return []
    found: list[Problem] = []
    for key, value, pattern, form in (
            ("CPU", resources.cpu, _CPU, "cores as 2, 0.5 or 500m"),
            ("Memory", resources.memory, _BYTES, "bytes as 512Mb or 1GiB"),
            ("Disk", resources.disk, _BYTES, "bytes as 512Mb or 1GiB"),
            ("GPU", resources.gpu, _GPU, "a whole number")):
        if value is not None and value.strip() and not pattern.match(value.strip()):
            found.append((("Resources", key), f"not a quantity: {form}"))
    return found


def network_problems(network: Network | None, version: tuple[int, int]) -> list[Problem]:
    """The network rules of a server of ``version`` (types by version, Domains only with
    HTTP, Ports only with Host or Bridge)."""
    if network is None:
        return []
    found: list[Problem] = []
    spelled = _NETWORK_SPELLING.get((network.type or "").strip().lower())
    allowed = _networks_of(version)
    if network.type is not None and spelled not in allowed:
        found.append((("Network", "Type"),
                      f"unknown to Bacalhau v{version[0]}.{version[1]}; one of "
                      + ", ".join(sorted(allowed))))
    if network.domains and spelled != "HTTP":
        found.append((("Network", "Domains"), "only with Network.Type HTTP"))
    if network.ports and spelled not in ("Host", "Full", "Bridge"):
        found.append((("Network", "Ports"), "only with Network.Type Host or Bridge"))
    return found


# --- wire form -------------------------------------------------------------------------------


def job_wire(job: Job) -> dict[str, Any]:
    """The canonical wire form: Go names, lower-case types, the network type's own spelling,
    no empty values but ``Type`` and ``Count`` (as the server has them: 1 for batch and
    service when omitted; always 0 for ops and daemon, which the server forces, so a ``Count:
    1`` there is the same job as 0 and hashes the same; docs/wire-orchestrator.md)."""
    wire: dict[str, Any] = job.model_dump(mode="json")
    wire["Type"] = job.type
    count = job.count
    if job.type in ("ops", "daemon"):
        count = 0
    elif count is None:
        count = 1
    wire["Count"] = count
    for task in wire.get("Tasks", []):
        network = task.get("Network")
        if isinstance(network, dict) and "Type" in network:
            network["Type"] = _NETWORK_SPELLING.get(network["Type"].strip().lower(),
                                                    network["Type"])
    return wire


def job_hash(job: Job) -> str:
    return hash_wire(canonical_json(job_wire(job)))


def hygienic(wire: Mapping[str, Any], version: tuple[int, int] = NEWEST, *,
             copy: bool = True) -> dict[str, Any]:
    """A job as a backend sends it to a server of ``version`` (docs/wire-orchestrator.md
    section 9): ``Type``, ``Count`` and every task's ``Network.Type`` always present, engine,
    publisher and source types lower-case, and no ``ID``, ``State``, other output fields or
    ``bacalhau.org/`` meta (job and task). An omitted network is sent as the server version's
    own default spelled out: ``None`` before v1.7, ``Default`` from it.

    ``copy=False``: ``wire`` is the caller's own (a fresh translation) and its nested values
    are changed in place, not copied first (a deep copy per submit: docs/performance.md)."""
    job: dict[str, Any] = {key: value for key, value in (_copy(wire) if copy else wire).items()
                           if key not in OUTPUT_ONLY}
    job_type = str(job.get("Type") or "batch")
    job["Type"] = job_type
    if job.get("Count") is None:
        job["Count"] = 0 if job_type in ("ops", "daemon") else 1
    _strip_meta(job)
    for task in job.get("Tasks") or []:
        _strip_meta(task)
        for key in ("Engine", "Publisher"):
            _lower_config(task.get(key))
        for source in task.get("InputSources") or []:
            _lower_config(source.get("Source") if isinstance(source, dict) else None)
        network = task.get("Network")
        if not isinstance(network, dict):
            network = task["Network"] = {}
        if not network.get("Type"):
            network["Type"] = "Default" if version >= (1, 7) else "None"
    return job


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_copy(item) for item in value]
    return value


def _strip_meta(holder: dict[str, Any]) -> None:
    meta = holder.get("Meta")
    if isinstance(meta, dict):
        kept = {k: v for k, v in meta.items() if not str(k).startswith(RESERVED_META)}
        if kept:
            holder["Meta"] = kept
        else:
            del holder["Meta"]


def _lower_config(config: object) -> None:
    if isinstance(config, dict) and isinstance(config.get("Type"), str):
        config["Type"] = config["Type"].strip().lower()


def problem_field(prefix: str, loc: Sequence[int | str]) -> str:
    """``job.Tasks.0.Env.X`` style, as the manifest errors are written."""
    return ".".join(str(part) for part in (prefix, *loc) if part != "")
