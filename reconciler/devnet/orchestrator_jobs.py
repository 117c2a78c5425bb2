"""The dev requester's orchestrator jobs (Bacalhau v1.5+): decoding, validation, the job table.

Written from docs/wire-orchestrator.md, independently of the reconciler's own models, so that it
judges a backend's requests as the real server would. Two profiles: ``1.6`` (every PUT creates a
job; names are free text) and ``1.9`` (a name is unique per namespace; a PUT of a known name
updates that job, an identical one is refused).

States move lazily, from the clock, when a job is read (as in :mod:`reconciler.devnet.jobs`):
Pending, then Running; batch and ops jobs end ``job_duration`` seconds after their version
started (Completed, or Failed with ``Meta["devnet/fail"]``; ``Meta["devnet/duration"]`` sets
one job's duration); service and daemon jobs never complete, but with ``Meta["devnet/fail"]``
they fail after that duration (as a real server marks a service Failed once its retries are
used up), so tests can watch a long-running job drift (docs/design.md, "Long-running jobs").
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

JOB_TYPES = ("batch", "ops", "service", "daemon")
ACTIVE = frozenset({"Pending", "Queued", "Running"})
TERMINAL = frozenset({"Completed", "Failed", "Stopped"})
NETWORKS = {
    # docs/wire-orchestrator.md "Network by version": names and the default when omitted.
    "1.6": ({"none": "None", "host": "Host", "full": "Host", "http": "HTTP", "bridge": "Bridge"},
            "None"),
    "1.9": ({"default": "Default", "none": "None", "host": "Host", "full": "Full",
             "http": "HTTP", "bridge": "Bridge"}, "Default"),
}
OPERATORS = ("=", "==", "!=", "in", "notin", "exists", "!", "gt", "lt")
DEFAULT_RESOURCES = {"CPU": "500m", "Memory": "512Mb"}
SERVER_META = {
    "bacalhau.org/orchestrator.id": "n-devnet",
    "bacalhau.org/requester.id": "n-devnet",
    "bacalhau.org/server.installation.id": "devnet-installation",
    "bacalhau.org/server.instance.id": "devnet-instance",
}
# Execution states are integers on the wire (ComputeState / DesiredState).
EXEC_RUNNING, EXEC_COMPLETED, EXEC_FAILED, EXEC_CANCELLED = 6, 9, 10, 11
DESIRED_RUNNING, DESIRED_STOPPED = 1, 2

_ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
_CPU = re.compile(r"\d+(\.\d+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_BYTES = re.compile(r"\d+(\.\d+)?\s*([kmgtpe]i?b?|b)?", re.IGNORECASE)
_DOMAIN = re.compile(r"\.?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]*[a-z0-9])?",
                     re.IGNORECASE)
_UUID = re.compile(r"(j-)?[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class ApiError(Exception):
    """One error envelope: ``{Status, Message, RequestID, Code, Component, Hint?, Details?}``."""

    def __init__(self, status: int, message: str, code: str = "", component: str = "Bacalhau",
                 hint: str = "", details: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.component, self.hint, self.details = component, hint, details or {}


def bind_error(message: str, status: int = 400) -> ApiError:
    """An error raised by the HTTP layer (decode, validate, routing): InternalError/APIServer."""
    return ApiError(status, message, "InternalError", "APIServer")


def now_ns() -> int:
    return time.time_ns()


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- decoding: Go's encoding/json (keys ignore case, unknown keys dropped, types strict) ------


def _get(obj: Mapping[str, Any], name: str) -> Any:
    lowered = name.lower()
    found = None
    for key, value in obj.items():
        if key.lower() == lowered:
            found = value  # Go keeps the last match
    return found


def _obj(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bind_error(f"json: cannot unmarshal {_kind(value)} into Go struct field {where} "
                         "of type object")
    return value


def _str(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise bind_error(f"json: cannot unmarshal {_kind(value)} into Go struct field {where} "
                         "of type string")
    return value


def _int(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise bind_error(f"json: cannot unmarshal {_kind(value)} into Go struct field {where} "
                         "of type int")
    return int(value)


def _str_map(value: Any, where: str) -> dict[str, str]:
    obj = _obj(value, where) or {}
    return {str(k): _str(v, where) for k, v in obj.items()}


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bind_error(f"json: cannot unmarshal {_kind(value)} into Go struct field {where} "
                         "of type array")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else "null"


def _type_params(raw: Any, where: str) -> dict[str, Any] | None:
    obj = _obj(raw, where)
    if obj is None:
        return None
    params = _obj(_get(obj, "Params"), where + ".Params")
    return {"Type": _str(_get(obj, "Type"), where + ".Type"), "Params": params}


def decode_job(raw: Any, profile: str) -> tuple[dict[str, Any], list[str], bool]:
    """The ``Job`` of a PUT body, decoded: (job, warnings, Count omitted). 400 on bad types."""
    if raw is None:
        raise bind_error("empty/nil job")
    obj = _obj(raw, "Job")
    assert obj is not None
    warnings: list[str] = []
    job: dict[str, Any] = {
        "ID": _str(_get(obj, "ID"), "Job.ID"),
        "Name": _str(_get(obj, "Name"), "Job.Name"),
        "Namespace": _str(_get(obj, "Namespace"), "Job.Namespace"),
        "Type": _str(_get(obj, "Type"), "Job.Type"),
        "Priority": _int(_get(obj, "Priority"), "Job.Priority"),
        "Count": _int(_get(obj, "Count"), "Job.Count"),
        "Constraints": [_constraint(c) for c in _list(_get(obj, "Constraints"),
                                                      "Job.Constraints")],
        "Meta": _str_map(_get(obj, "Meta"), "Job.Meta"),
        "Labels": _str_map(_get(obj, "Labels"), "Job.Labels"),
        "Tasks": [_task(t, profile) for t in _list(_get(obj, "Tasks"), "Job.Tasks")],
    }
    count_omitted = _get(obj, "Count") is None
    for key in ("State", "Version", "Revision", "CreateTime", "ModifyTime"):
        if _get(obj, key) not in (None, 0, "", {}):
            warnings.append(f"job {key} is ignored when submitting a job")
    return job, warnings, count_omitted


def _constraint(raw: Any) -> dict[str, Any]:
    obj = _obj(raw, "Job.Constraints") or {}
    return {"Key": _str(_get(obj, "Key"), "LabelSelectorRequirement.Key"),
            "Operator": _str(_get(obj, "Operator"), "LabelSelectorRequirement.Operator"),
            "Values": [_str(v, "Values") for v in _list(_get(obj, "Values"), "Values")]}


def _task(raw: Any, profile: str) -> dict[str, Any]:
    obj = _obj(raw, "Job.Tasks") or {}
    task: dict[str, Any] = {
        "Name": _str(_get(obj, "Name"), "Task.Name"),
        "Engine": _type_params(_get(obj, "Engine"), "Task.Engine"),
        "Publisher": _type_params(_get(obj, "Publisher"), "Task.Publisher"),
        "Env": _str_map(_get(obj, "Env"), "Task.Env"),
        "Meta": _str_map(_get(obj, "Meta"), "Task.Meta"),
        "InputSources": [],
        "ResultPaths": [],
        "Resources": {},
        "Network": None,
        "Timeouts": {},
    }
    for item in _list(_get(obj, "InputSources"), "Task.InputSources"):
        source = _obj(item, "Task.InputSources") or {}
        task["InputSources"].append({
            "Source": _type_params(_get(source, "Source"), "InputSource.Source"),
            "Alias": _str(_get(source, "Alias"), "InputSource.Alias"),
            "Target": _str(_get(source, "Target"), "InputSource.Target"),
        })
    for item in _list(_get(obj, "ResultPaths"), "Task.ResultPaths"):
        path = _obj(item, "Task.ResultPaths") or {}
        task["ResultPaths"].append({"Name": _str(_get(path, "Name"), "ResultPath.Name"),
                                    "Path": _str(_get(path, "Path"), "ResultPath.Path")})
    resources = _obj(_get(obj, "Resources"), "Task.Resources") or {}
    for key in ("CPU", "Memory", "Disk", "GPU"):
        value = _str(_get(resources, key), f"ResourcesConfig.{key}")
        if value:
            task["Resources"][key] = value
    network = _obj(_get(obj, "Network"), "Task.Network")
    if network is not None:
        task["Network"] = _network(network, profile)
    timeouts = _obj(_get(obj, "Timeouts"), "Task.Timeouts") or {}
    for key in ("ExecutionTimeout", "QueueTimeout", "TotalTimeout"):
        seconds = _int(_get(timeouts, key), f"TimeoutConfig.{key}")
        if seconds:
            task["Timeouts"][key] = seconds
    return task


def _network(obj: dict[str, Any], profile: str) -> dict[str, Any]:
    names, default = NETWORKS[profile]
    raw_type = _get(obj, "Type")
    if raw_type is None:
        kind = default
    else:
        text = _str(raw_type, "NetworkConfig.Type").strip().lower()
        if text not in names:
            # An unknown network name fails while decoding, before validation.
            raise bind_error(f"invalid network type: {raw_type!r}")
        kind = names[text]
    out: dict[str, Any] = {"Type": kind}
    domains = [_str(d, "NetworkConfig.Domains") for d in _list(_get(obj, "Domains"),
                                                               "NetworkConfig.Domains")]
    if domains:
        out["Domains"] = domains
    ports = _list(_get(obj, "Ports"), "NetworkConfig.Ports")
    if ports:
        out["Ports"] = ports
    return out


# --- validation (the API's ValidateSubmission, then the store's Validate) ------------------


def validate_submission(job: dict[str, Any]) -> None:
    """All problems joined in one 400 ``InternalError``/``APIServer``, as errors.Join does."""
    problems: list[str] = []
    if job["Type"] not in JOB_TYPES:
        problems.append(f"invalid job type: {job['Type']!r}")
    if job["Count"] < 0:
        problems.append("job count must be >= 0")
    elif job["Type"] in ("ops", "daemon") and job["Count"] > 1:
        problems.append(f"job count must be 0 or 1 for {job['Type']} jobs")
    if not job["Tasks"]:
        problems.append("missing job tasks")
    for constraint in job["Constraints"]:
        problems += _constraint_problems(constraint)
    for task in job["Tasks"]:
        problems += _task_problems(task)
    if problems:
        raise bind_error("\n".join(problems))


def _constraint_problems(c: dict[str, Any]) -> list[str]:
    key, op, values = c["Key"], c["Operator"], c["Values"]
    if not key.strip():
        return ["constraint key must not be blank"]
    if op not in OPERATORS:
        return [f"invalid constraint operator {op!r} for key {key}"]
    if op in ("in", "notin") and not values:
        return [f"constraint {key} {op} needs values"]
    if op in ("exists", "!") and values:
        return [f"constraint {key} {op} must have no values"]
    if op not in ("in", "notin", "exists", "!") and len(values) != 1:
        return [f"constraint {key} {op} needs exactly one value"]
    return []


def _task_problems(task: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if not task["Name"].strip():
        problems.append("task name must not be blank")
    for name, value in task["Env"].items():
        if not _ENV_NAME.fullmatch(name):
            problems.append(f"invalid environment variable name {name!r}: must be upper-case "
                            "letters, digits and underscores, starting with a letter")
        elif name.startswith("BACALHAU_"):
            problems.append(f"environment variable {name} must not start with BACALHAU_")
        if value == "":
            problems.append(f"environment variable {name} must have a value")
    if task["Engine"] is None or not task["Engine"]["Type"].strip():
        problems.append("engine type must not be blank")
    for key, value in task["Timeouts"].items():
        if value < 0:
            problems.append(f"{key} must be >= 0")
    problems += _resource_problems(task["Resources"])
    aliases: set[str] = set()
    targets: set[str] = set()
    for source in task["InputSources"]:
        if not source["Target"]:
            problems.append("input source target must not be blank")
        if source["Source"] is None or not source["Source"]["Type"]:
            problems.append("input source type must not be blank")
        if source["Alias"] and source["Alias"] in aliases:
            problems.append(f"duplicate input source alias {source['Alias']}")
        if source["Target"] and source["Target"] in targets:
            problems.append(f"duplicate input source target {source['Target']}")
        aliases.add(source["Alias"])
        targets.add(source["Target"])
    names: set[str] = set()
    paths: set[str] = set()
    for result in task["ResultPaths"]:
        if not result["Name"]:
            problems.append("result path name must not be blank")
        if not result["Path"].startswith("/"):
            problems.append(f"result path {result['Path']!r} must be absolute")
        if result["Name"] and result["Name"] in names:
            problems.append(f"duplicate result path name {result['Name']}")
        if result["Path"] and result["Path"] in paths:
            problems.append(f"duplicate result path {result['Path']}")
        names.add(result["Name"])
        paths.add(result["Path"])
    if task["Network"] is not None:
        problems += _network_problems(task["Network"])
    return problems


def _resource_problems(resources: dict[str, str]) -> list[str]:
    problems: list[str] = []
    cpu, gpu = resources.get("CPU"), resources.get("GPU")
    if cpu and not _CPU.fullmatch(cpu):
        problems.append(f"invalid CPU value: {cpu!r}")
    for key in ("Memory", "Disk"):
        value = resources.get(key)
        if value and not _BYTES.fullmatch(value.strip()):
            problems.append(f"invalid {key.lower()} value: {value!r}")
    if gpu and not gpu.isdigit():
        problems.append(f"invalid GPU value: {gpu!r}")
    return problems


def _network_problems(network: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    domains = network.get("Domains") or []
    if domains and network["Type"] != "HTTP":
        problems.append(f"domains are only allowed with network type HTTP, not {network['Type']}")
    for domain in domains:
        if not _is_domain_or_ip(domain):
            problems.append(f"invalid domain: {domain}")
    if network.get("Ports") and network["Type"] not in ("Host", "Bridge", "Full"):
        problems.append(f"ports are only allowed with network type Host or Bridge, not "
                        f"{network['Type']}")
    return problems


def _is_domain_or_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return bool(_DOMAIN.fullmatch(value))
    return True


def validate_store(job: dict[str, Any]) -> None:
    """The store's own checks: 400 ``BadRequest``/``JobStore``."""
    problems: list[str] = []
    if not job["ID"].strip() or not job["Name"].strip():
        problems.append("job ID and name must not be blank")
    if " " in job["ID"] or "\x00" in job["ID"] or "\x00" in job["Name"]:
        problems.append("job ID must not contain spaces or NUL characters")
    if not job["Namespace"].strip():
        problems.append("namespace must not be blank")
    for task in job["Tasks"]:
        if task["ResultPaths"] and not (task["Publisher"] or {}).get("Type"):
            problems.append(f"task {task['Name']}: a publisher is required when result paths "
                            "are set")
        timeouts = task["Timeouts"]
        total = timeouts.get("TotalTimeout", 0)
        if total > 0 and timeouts.get("ExecutionTimeout", 0) + timeouts.get(
                "QueueTimeout", 0) > total:
            problems.append(f"task {task['Name']}: execution timeout plus queue timeout must "
                            "not exceed the total timeout")
    if problems:
        raise ApiError(400, "\n".join(problems), "BadRequest", "JobStore")


# --- normalisation, sanitising, transformers ----------------------------------------------


def normalise(job: dict[str, Any], warnings: list[str], count_omitted: bool, profile: str,
              client_meta: dict[str, str]) -> dict[str, Any]:
    """Steps 3-6 of a submit (docs/wire-orchestrator.md): the job as it will be stored."""
    job = json.loads(json.dumps(job))
    job["Namespace"] = job["Namespace"] or "default"
    if job["Type"] in ("ops", "daemon"):
        job["Count"] = 0
    elif count_omitted:
        job["Count"] = 1  # v1.6+: an omitted Count means 1, an explicit 0 stays 0
    if job["Type"] in ("batch", "ops") and job["ID"]:
        warnings.append(f"job ID is ignored when submitting a {job['Type']} job")
        job["ID"] = ""
    if len(job["Tasks"]) > 1:
        warnings.append("only one task is supported per job")
        job["Tasks"] = job["Tasks"][:1]
    reserved = [key for key in job["Meta"] if key.startswith("bacalhau.org/")]
    for key in reserved:
        warnings.append(f"meta key {key} is reserved and was removed")
        del job["Meta"][key]
    job["Meta"].update(client_meta)
    job["ID"] = job["ID"] or "j-" + str(uuid.uuid4())
    job["Name"] = job["Name"] or job["ID"]
    job["Meta"].update(SERVER_META)
    for task in job["Tasks"]:
        for key, value in DEFAULT_RESOURCES.items():
            task["Resources"].setdefault(key, value)
        if task["Network"] is None:
            task["Network"] = {"Type": NETWORKS[profile][1]}
        if task["Publisher"] is None:
            task["Publisher"] = {"Type": "", "Params": None}
    return job


def comparable(job: dict[str, Any]) -> dict[str, Any]:
    """What the update diff compares: no ids, state, times or ``bacalhau.org/`` meta."""
    out = {k: v for k, v in job.items() if k not in ("ID", "State", "Version", "Revision",
                                                      "CreateTime", "ModifyTime")}
    out["Meta"] = {k: v for k, v in job["Meta"].items() if not k.startswith("bacalhau.org/")}
    tasks = []
    for task in job["Tasks"]:
        task = dict(task)
        task["Meta"] = {k: v for k, v in task["Meta"].items()
                        if not k.startswith("bacalhau.org/")}
        task["Resources"] = {k: v.lower() for k, v in task["Resources"].items()}
        tasks.append(task)
    out["Tasks"] = tasks
    return out


# --- label selectors (Kubernetes syntax, as the list's ``labels=`` parameter parses them) ---

_LABEL_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")
_DNS_PREFIX = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_REQUIREMENT = re.compile(
    r"\s*(?P<not>!)?\s*(?P<key>[^\s=!<>(),]+)\s*"
    r"(?:(?P<op>==|=|!=|<|>)\s*(?P<value>[^\s,()]*)|(?P<set>in|notin)\s*\((?P<values>[^)]*)\))?"
    r"\s*")

Requirement = tuple[str, str, tuple[str, ...]]


def _check_key(key: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_PREFIX.fullmatch(prefix))) or not (
            _LABEL_NAME.fullmatch(name)):
        raise bind_error(f"unable to parse requirement: invalid label key {key!r}: name part "
                         "must consist of alphanumeric characters, '-', '_' or '.', at most "
                         "63 characters, starting and ending with an alphanumeric character")


def _check_value(value: str) -> None:
    if value and not _LABEL_NAME.fullmatch(value):
        raise bind_error(f"unable to parse requirement: invalid label value {value!r}: must be "
                         "63 characters or less, alphanumeric, '-', '_' or '.', starting and "
                         "ending with an alphanumeric character")


def parse_selector(text: str) -> list[Requirement]:
    """``a=b,c!=d,e in (f,g),!h,i`` into (key, operator, values); 400 on a parse error."""
    requirements: list[Requirement] = []
    position = 0
    while text.strip() and position <= len(text):
        match = _REQUIREMENT.match(text, position)
        end = match.end() if match else position
        if match is None or (end < len(text) and text[end] != ","):
            raise bind_error(f"unable to parse requirement: found {text[end:end + 10]!r}, "
                             "expected: ',' or an operator")
        key = match["key"]
        _check_key(key)
        if match["not"]:
            if match["op"] or match["set"]:
                raise bind_error("unable to parse requirement: '!' takes a key only")
            requirements.append((key, "!", ()))
        elif match["op"]:
            _check_value(match["value"])
            if match["op"] in "<>" and not match["value"].lstrip("-").isdigit():
                raise bind_error(f"for 'Gt', 'Lt' operators, the value must be an integer: "
                                 f"{match['value']!r}")
            requirements.append((key, match["op"], (match["value"],)))
        elif match["set"]:
            values = tuple(v.strip() for v in match["values"].split(","))
            for value in values:
                _check_value(value)
            requirements.append((key, match["set"], values))
        else:
            requirements.append((key, "exists", ()))
        position = end + 1
        if end >= len(text):
            break
    return requirements


def selector_matches(requirements: list[Requirement], labels: dict[str, str]) -> bool:
    for key, op, values in requirements:
        present = key in labels
        value = labels.get(key, "")
        if op in ("=", "=="):
            ok = present and value == values[0]
        elif op == "!=":
            ok = not present or value != values[0]
        elif op == "in":
            ok = present and value in values
        elif op == "notin":
            ok = not present or value not in values
        elif op == "!":
            ok = not present
        elif op in "<>":
            try:
                number = int(value)
            except ValueError:
                return False
            ok = present and (number < int(values[0]) if op == "<" else number > int(values[0]))
        else:
            ok = present
        if not ok:
            return False
    return True


# --- the job table -------------------------------------------------------------------------


@dataclass
class OrchJob:
    """One stored job: its latest spec plus what the server adds on output."""

    spec: dict[str, Any]
    state: str
    message: str
    version: int
    revision: int
    create_ns: int
    modify_ns: int
    started: float  # when the current version began running (for job_duration)
    seq: int
    history: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def job_id(self) -> str:
        return str(self.spec["ID"])

    @property
    def name(self) -> str:
        return str(self.spec["Name"])

    @property
    def namespace(self) -> str:
        return str(self.spec["Namespace"])

    @property
    def type(self) -> str:
        return str(self.spec["Type"])

    def to_wire(self, version: int = 0) -> dict[str, Any]:
        spec = self.versions.get(version, self.spec) if version else self.spec
        state: dict[str, Any] = {"StateType": self.state}
        if self.message:
            state["Message"] = self.message
        tasks = []
        for task in spec["Tasks"]:
            tasks.append({k: v for k, v in task.items()
                          if v or k in ("Name", "Engine", "Publisher", "Resources", "Network",
                                        "Timeouts")})
        return {**spec, "Tasks": tasks, "State": state,
                "Version": version or self.version, "Revision": self.revision,
                "CreateTime": self.create_ns, "ModifyTime": self.modify_ns}

    def to_record(self) -> dict[str, Any]:
        return {"spec": self.spec, "state": self.state, "message": self.message,
                "version": self.version, "revision": self.revision,
                "create_ns": self.create_ns, "modify_ns": self.modify_ns,
                "started": self.started, "seq": self.seq, "history": self.history,
                "executions": self.executions,
                "versions": {str(k): v for k, v in self.versions.items()}}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> OrchJob:
        record = dict(record)
        record["versions"] = {int(k): v for k, v in record.get("versions", {}).items()}
        return cls(**record)

    # state machine ------------------------------------------------------------------------

    def duration(self, default: float) -> float:
        try:
            return float(self.spec["Meta"].get("devnet/duration", default))
        except ValueError:
            return default

    def set_state(self, state: str, message: str, topic: str = "State Update") -> None:
        self.state, self.message = state, message
        self.revision += 1
        self.modify_ns = now_ns()
        self.event("JobLevel", message or state, topic, {"NewState": state})

    def event(self, level: str, message: str, topic: str, details: dict[str, str],
              execution_id: str = "") -> None:
        stamp = rfc3339(time.time())
        entry: dict[str, Any] = {
            "SeqNum": len(self.history) + 1, "Type": level, "JobID": self.job_id,
            "JobVersion": self.version,
            "Event": {"Message": message, "Topic": topic, "Timestamp": stamp,
                      "Details": details},
            "Time": stamp,
        }
        if execution_id:
            entry["ExecutionID"] = execution_id
        self.history.append(entry)

    def start_executions(self) -> None:
        partitions = 1 if self.type in ("ops", "daemon") else int(self.spec["Count"])
        for index in range(partitions):
            execution_id = "e-" + str(uuid.uuid4())
            stamp = now_ns()
            self.executions.append({
                "ID": execution_id, "Namespace": self.namespace, "EvalID": str(uuid.uuid4()),
                "Name": self.name, "NodeID": "n-devnet-compute", "JobID": self.job_id,
                "JobVersion": self.version, "AllocatedResources": {"Tasks": {}},
                "DesiredState": {"StateType": DESIRED_RUNNING, "Message": ""},
                "ComputeState": {"StateType": EXEC_RUNNING, "Message": ""},
                "PublishedResult": {"Type": "", "Params": None},
                "RunOutput": {"Stdout": "", "StdoutTruncated": False, "stderr": "",
                              "StderrTruncated": False, "ExitCode": 0, "ErrorMsg": ""},
                "PreviousExecution": "", "NextExecution": "", "FollowupEvalID": "",
                "PartitionIndex": index, "Revision": 1, "CreateTime": stamp,
                "ModifyTime": stamp,
            })
            self.event("ExecutionLevel", "Running", "Execution", {}, execution_id)

    def end_executions(self, compute: int, desired: int, message: str,
                       only_version: int | None = None) -> None:
        for execution in self.executions:
            if only_version is not None and execution["JobVersion"] != only_version:
                continue
            if execution["ComputeState"]["StateType"] in (EXEC_COMPLETED, EXEC_FAILED,
                                                          EXEC_CANCELLED):
                continue
            execution["ComputeState"] = {"StateType": compute, "Message": message}
            execution["DesiredState"] = {"StateType": desired, "Message": message}
            execution["Revision"] += 1
            execution["ModifyTime"] = now_ns()
            if compute == EXEC_FAILED:
                execution["RunOutput"]["ExitCode"] = 1
                execution["RunOutput"]["ErrorMsg"] = message

    def advance(self, now: float, default_duration: float) -> bool:
        """Move the job on by the clock. True when anything changed."""
        if self.state not in ACTIVE:
            return False
        changed = False
        total = max((t["Timeouts"].get("TotalTimeout", 0) for t in self.spec["Tasks"]),
                    default=0)
        # The total timeout counts from CreateTime, which an update never resets.
        if total and now - self.create_ns / 1e9 >= total:
            self.end_executions(EXEC_FAILED, DESIRED_STOPPED, "job timed out")
            self.set_state("Failed", f"job timed out after {total}s", "Job Timeout")
            return True
        if self.state == "Pending":
            self.set_state("Running", "")
            changed = True
        fails = bool(self.spec["Meta"].get("devnet/fail"))
        ends = self.type in ("batch", "ops") or fails  # a service or daemon only by failing
        if ends and now - self.started >= self.duration(default_duration):
            if fails:
                self.end_executions(EXEC_FAILED, DESIRED_STOPPED, "failed by devnet/fail")
                self.set_state("Failed", "failed by devnet/fail")
            else:
                self.end_executions(EXEC_COMPLETED, DESIRED_STOPPED, "")
                self.set_state("Completed", "")
            changed = True
        return changed


class OrchStore:
    """Jobs by id, a ``name:namespace`` index (name profiles), an optional JSON-lines journal."""

    def __init__(self, *, names: bool, job_duration: float, state_file: Path | None) -> None:
        self.names = names
        self.job_duration = job_duration
        self._jobs: dict[str, OrchJob] = {}
        self._index: dict[str, str] = {}
        self._ids: list[str] = []  # sorted, for id-prefix lookups
        self._lock = threading.Lock()
        self._seq = 0
        self._journal = None
        if state_file is not None:
            self._replay(state_file)
            self._journal = state_file.open("a", encoding="utf-8")

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()

    @staticmethod
    def _key(name: str, namespace: str) -> str:
        return f"{name}:{namespace}"  # the server's index key, ':' ambiguity included

    def by_name(self, name: str, namespace: str) -> OrchJob | None:
        if not self.names:
            return None
        with self._lock:
            job_id = self._index.get(self._key(name, namespace or "default"))
            job = self._jobs.get(job_id) if job_id else None
            if job is not None:
                self._refresh(job)
            return job

    def lookup(self, ref: str, namespace: str) -> OrchJob:
        """A name in the namespace (name profiles), else an id, else a unique id prefix."""
        found = self.by_name(ref, namespace)
        if found is not None:
            return found
        with self._lock:
            job = self._jobs.get(ref)
            if job is None and not _UUID.fullmatch(ref):
                # A prefix scan over the sorted ids, as the store's cursor seek does: a GET of a
                # missing name (the usual first step of a create) must not cost O(jobs).
                start = bisect.bisect_left(self._ids, ref)
                matches = list(itertools.takewhile(lambda i: i.startswith(ref),
                                                   self._ids[start : start + 2]))
                if len(matches) > 1:
                    raise ApiError(500, f"multiple jobs found for id {ref}", "MultipleJobsFound",
                                   "JobStore", hint="Use full job ID")
                job = self._jobs[matches[0]] if matches else None
            if job is None:
                raise ApiError(404, f"job not found: {ref}", "NotFound", "JobStore")
            self._refresh(job)
            return job

    def all(self) -> list[OrchJob]:
        with self._lock:
            jobs = list(self._jobs.values())
            for job in jobs:
                self._refresh(job)
            return jobs

    def create(self, spec: dict[str, Any]) -> OrchJob:
        with self._lock:
            # Checked again inside the write: a concurrent create of the same name loses here.
            if spec["ID"] in self._jobs:
                raise ApiError(409, f"job already exists: {spec['ID']}", "ResourceInUse",
                               "JobStore")
            key = self._key(spec["Name"], spec["Namespace"])
            if self.names and key in self._index:
                raise ApiError(409, f"job name {spec['Name']} already exists in namespace "
                               f"{spec['Namespace']}", "ResourceInUse", "JobStore")
            stamp = now_ns()
            self._seq += 1
            job = OrchJob(spec, "Pending", "", 1, 1, stamp, stamp, time.time(), self._seq)
            job.event("JobLevel", "Job submitted", "Submission", {"NewState": "Pending"})
            job.start_executions()
            self._jobs[job.job_id] = job
            bisect.insort(self._ids, job.job_id)
            if self.names:
                self._index[key] = job.job_id
            self._write(job)
            return job

    def update(self, job: OrchJob, spec: dict[str, Any]) -> None:
        """An update in place: same id, version + 1, back to Pending from any state."""
        with self._lock:
            job.versions[job.version] = job.spec
            new = dict(job.spec)
            for key in ("Priority", "Count", "Constraints", "Meta", "Labels", "Tasks"):
                new[key] = spec[key]  # the stored Type stays the old one, as the server's does
            old_version = job.version
            job.spec = new
            job.version += 1
            job.started = time.time()
            job.end_executions(EXEC_CANCELLED, DESIRED_STOPPED, "job updated",
                               only_version=old_version)
            job.set_state("Pending", "Job update requested by user", "Submission")
            job.event("JobLevel", "Job updated", "Submission", {})
            job.start_executions()
            self._write(job)

    def rerun(self, job: OrchJob, version: int, reason: str) -> int:
        """v1.8+ rerun: the chosen spec becomes a new version; Pending again. The new version."""
        with self._lock:
            self._refresh(job)
            if job.state not in ("Running", "Completed", "Failed", "Stopped"):
                raise ApiError(500, f"cannot rerun job in state {job.state}",
                               hint="Wait for the job to be running or to end before rerunning")
            spec = job.spec if version in (0, job.version) else job.versions.get(version)
            if spec is None:
                raise ApiError(400, f"job version {version} not found for job {job.job_id}",
                               "BadRequest", "JobStore")
            old_version = job.version
            job.versions[old_version] = job.spec
            job.spec = dict(spec)
            job.version += 1
            job.started = time.time()
            job.end_executions(EXEC_CANCELLED, DESIRED_STOPPED, "job rerun",
                               only_version=old_version)
            job.set_state("Pending", reason or "job rerun", "Submission")
            job.start_executions()
            self._write(job)
            return job.version

    def stop(self, job: OrchJob, reason: str) -> str:
        """DELETE by state: the evaluation id, "" when already stopped; ApiError if terminal."""
        with self._lock:
            self._refresh(job)
            if job.state == "Stopped":
                return ""
            if job.state == "Completed":
                raise ApiError(500, "cannot stop job in state Completed")
            if job.state == "Failed":
                raise ApiError(500, f"job {job.job_id} is in terminal state Failed and cannot "
                               "transition to Stopped", "ConflictJobState", "JobStore")
            job.end_executions(EXEC_CANCELLED, DESIRED_STOPPED, reason)
            job.set_state("Stopped", reason)
            job.event("JobLevel", "Job stop requested", "State Update", {})
            self._write(job)
            return str(uuid.uuid4())

    def _refresh(self, job: OrchJob) -> None:
        if job.advance(time.time(), self.job_duration):
            self._write(job)

    def _write(self, job: OrchJob) -> None:
        if self._journal is not None:
            self._journal.write(json.dumps(job.to_record()) + "\n")
            self._journal.flush()

    def _replay(self, path: Path) -> None:
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                job = OrchJob.from_record(json.loads(line))
            except (ValueError, TypeError, KeyError):
                continue  # a line torn by a crash mid-write
            if job.job_id not in self._jobs:
                bisect.insort(self._ids, job.job_id)
            self._jobs[job.job_id] = job
            self._seq = max(self._seq, job.seq)
            if self.names:
                self._index[self._key(job.name, job.namespace)] = job.job_id
