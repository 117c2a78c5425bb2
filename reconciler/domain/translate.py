"""A manifest's job in the form a backend speaks: V1beta1 Spec <-> orchestrator Job.

The rules are docs/wire-orchestrator.md section 11 (Bacalhau's own V1beta1 -> Job mapping, read
from its source). Nothing is dropped silently: a field with no counterpart on the other side is
a :class:`LoadError` naming the manifest and the field, so the planner holds the job and
``validate`` can say why, instead of running something other than what the file says.

:func:`to_orchestrator` returns the job in canonical wire form (``domain/jobspec.py``); the
backend still applies ``jobspec.hygienic`` for its server's version, and sets ``Name``,
``Namespace``, labels and meta of its own.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from reconciler.domain.jobspec import job_problems, job_wire, parse_job
from reconciler.domain.manifest import ORCHESTRATOR, LoadError, Manifest
from reconciler.domain.spec import parse_spec, to_wire

__all__ = ["needs_orchestrator", "to_legacy", "to_orchestrator"]

#: V1beta1 storage source -> orchestrator source type; the others have no counterpart.
_SOURCES = {"IPFS": "ipfs", "URLDownload": "urlDownload", "Inline": "inline",
            "LocalDirectory": "local", "S3": "s3"}
_SOURCES_BACK = {"ipfs": "IPFS", "urldownload": "URLDownload", "inline": "Inline",
                 "local": "LocalDirectory", "localdirectory": "LocalDirectory", "s3": "S3"}
_PUBLISHERS = {"Noop": "noop", "Ipfs": "ipfs", "S3": "s3"}
_PUBLISHERS_BACK = {"noop": "Noop", "ipfs": "Ipfs", "s3": "S3"}
_ENGINES_BACK = {"docker": "Docker", "wasm": "Wasm", "noop": "Noop"}
_NETWORKS_BACK = {"none": "None", "full": "Full", "http": "HTTP"}
#: Where Bacalhau's own translation mounted Wasm modules that had no path.
_WASM_ENTRY = "/wasm/entry.wasm"
_WASM_IMPORT = "/wasm/imports/module_{}.wasm"


class _Refused(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _error(manifest: Manifest, field: str, message: str) -> LoadError:
    return LoadError(manifest.path, manifest.line, field, message, (manifest.name,))


def to_orchestrator(manifest: Manifest) -> dict[str, Any] | LoadError:
    """The manifest's job as an orchestrator Job (canonical wire form; a new dict at each call,
    the caller's to change), or why it cannot be."""
    if manifest.form == ORCHESTRATOR:
        return manifest.wire()
    try:
        job = _spec_to_job(manifest.wire())
    except _Refused as refused:
        return _error(manifest, f"spec.{refused.field}", refused.message)
    try:
        parsed = parse_job(job)
    except ValidationError as exc:  # a translation bug, not the user's: still no input echoed
        first = exc.errors(include_input=False)[0]
        return _error(manifest, "spec", f"does not translate: {first['msg']}")
    problems = job_problems(parsed)
    if problems:
        loc, message = problems[0]
        return _error(manifest, "spec",
                      f"as an orchestrator job, {'.'.join(map(str, loc))}: {message}")
    return job_wire(parsed)


def to_legacy(manifest: Manifest) -> dict[str, Any] | LoadError:
    """The manifest's job as a V1beta1 Spec (wire form), or an error saying it needs the
    orchestrator API."""
    if manifest.form != ORCHESTRATOR:
        return manifest.wire()
    try:
        spec = _job_to_spec(manifest.wire())
    except _Refused as refused:
        return _error(manifest, refused.field,
                      f"{refused.message}: this manifest needs the orchestrator API "
                      "(Bacalhau v1.5+)")
    try:
        return to_wire(parse_spec(spec))
    except ValidationError as exc:
        first = exc.errors(include_input=False)[0]
        where = ".".join(map(str, first["loc"]))
        return _error(manifest, "Tasks.0",
                      f"no V1beta1 counterpart ({where}: {first['msg']}): this manifest needs "
                      "the orchestrator API (Bacalhau v1.5+)")


def needs_orchestrator(manifest: Manifest) -> LoadError | None:
    """Why the legacy API cannot run this manifest, or ``None``."""
    outcome = to_legacy(manifest)
    return outcome if isinstance(outcome, LoadError) else None


# --- V1beta1 -> orchestrator -----------------------------------------------------------------


def _spec_to_job(spec: dict[str, Any]) -> dict[str, Any]:
    deal = spec.get("Deal") or {}
    targeting_all = bool(deal.get("TargetingMode"))
    if spec.get("DoNotTrack"):
        raise _Refused("DoNotTrack", "has no orchestrator counterpart; remove it")
    inputs: list[dict[str, Any]] = [
        _input_source(storage, f"Inputs.{index}", None)
        for index, storage in enumerate(spec.get("Inputs") or [])]
    task: dict[str, Any] = {"Name": "main"}
    engine = str(spec["Engine"]).lower()
    params: dict[str, Any] = {}
    if engine == "docker":
        params = dict(spec.get("Docker") or {})  # the same keys (docs section 11)
    elif engine == "wasm":
        params, env, modules = _wasm(spec.get("Wasm") or {})
        inputs = modules + inputs
        if env:
            task["Env"] = env
    task["Engine"] = {"Type": engine, **({"Params": params} if params else {})}
    publisher = spec.get("PublisherSpec") or {}
    kind = _PUBLISHERS.get(str(publisher.get("Type")))
    if kind is None:
        raise _Refused("PublisherSpec.Type", "Estuary has no orchestrator counterpart")
    task["Publisher"] = {"Type": kind,
                         **({"Params": publisher["Params"]} if publisher.get("Params") else {})}
    if inputs:
        task["InputSources"] = inputs
    outputs = [_result_path(output, index) for index, output in
               enumerate(spec.get("Outputs") or [])]
    if outputs:
        task["ResultPaths"] = outputs
    if spec.get("Resources"):
        task["Resources"] = dict(spec["Resources"])
    # Always a network type: the default changed in v1.7 (None before, Default after), and a
    # V1beta1 spec without one meant None.
    task["Network"] = dict(spec.get("Network") or {"Type": "None"})
    task["Network"].setdefault("Type", "None")
    if spec.get("Timeout"):
        # ExecutionTimeout, not Bacalhau's TotalTimeout: the total counts from the job's first
        # creation, so an update in place (name mode) after that long would fail at once.
        task["Timeouts"] = {"ExecutionTimeout": spec["Timeout"]}
    job: dict[str, Any] = {
        "Type": "ops" if targeting_all else "batch",
        "Count": 0 if targeting_all else int(deal.get("Concurrency") or 1),
        "Tasks": [task],
    }
    if spec.get("NodeSelectors"):
        job["Constraints"] = [dict(selector) for selector in spec["NodeSelectors"]]
    if spec.get("Annotations"):
        # As Bacalhau did: each annotation a label key with an empty value.
        job["Labels"] = {annotation: "" for annotation in spec["Annotations"]}
    return job


def _input_source(storage: dict[str, Any], where: str, target: str | None) -> dict[str, Any]:
    source = str(storage.get("StorageSource"))
    kind = _SOURCES.get(source)
    if kind is None:
        raise _Refused(f"{where}.StorageSource", f"{source} has no orchestrator counterpart")
    if storage.get("Metadata"):
        raise _Refused(f"{where}.Metadata", "has no orchestrator counterpart; remove it")
    if storage.get("ReadWrite") and kind != "local":
        raise _Refused(f"{where}.ReadWrite", "only a LocalDirectory can be read-write")
    mount = storage.get("Path") or target
    if not mount:
        raise _Refused(f"{where}.Path", "required by the orchestrator API (where it is mounted)")
    params: dict[str, Any] = {}
    if kind == "ipfs":
        params = {"CID": storage.get("CID")}
    elif kind in ("urlDownload", "inline"):
        params = {"URL": storage.get("URL")}
    elif kind == "local":
        params = {"SourcePath": storage.get("SourcePath"), "ReadWrite": storage.get("ReadWrite")}
    elif kind == "s3":
        s3 = dict(storage.get("S3") or {})
        if "Checksum" in s3:
            s3["ChecksumSHA256"] = s3.pop("Checksum")
        params = s3
    params = {key: value for key, value in params.items() if value}
    entry: dict[str, Any] = {"Source": {"Type": kind, **({"Params": params} if params else {})},
                             "Target": mount}
    if storage.get("Name"):
        entry["Alias"] = storage["Name"]
    return entry


def _wasm(wasm: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    modules = [_input_source(wasm["EntryModule"], "Wasm.EntryModule", _WASM_ENTRY)]
    params: dict[str, Any] = {"EntryModule": modules[0]["Target"]}
    if wasm.get("EntryPoint"):
        params["Entrypoint"] = wasm["EntryPoint"]
    if wasm.get("Parameters"):
        params["Parameters"] = wasm["Parameters"]
    imports = [_input_source(module, f"Wasm.ImportModules.{index}", _WASM_IMPORT.format(index))
               for index, module in enumerate(wasm.get("ImportModules") or [])]
    if imports:
        params["ImportModules"] = [module["Target"] for module in imports]
    return params, dict(wasm.get("EnvironmentVariables") or {}), modules + imports


def _result_path(output: dict[str, Any], index: int) -> dict[str, Any]:
    # An output's StorageSource (IPFS in every Bacalhau example) never meant anything: the
    # publisher decides where results go; Bacalhau's own translation ignored it too.
    for key in ("CID", "URL", "S3", "Repo", "SourcePath", "Metadata"):
        if output.get(key):
            raise _Refused(f"Outputs.{index}.{key}", "an output is only a Name and a Path")
    return {key: output[key] for key in ("Name", "Path") if output.get(key)}


# --- orchestrator -> V1beta1 -----------------------------------------------------------------


def _job_to_spec(job: dict[str, Any]) -> dict[str, Any]:
    job_type = job.get("Type")
    if job_type not in ("batch", "ops"):
        raise _Refused("Type", f"{job_type} jobs have no V1beta1 counterpart")
    for key in ("Priority", "Meta", "Namespace"):
        if job.get(key):
            raise _Refused(key, "has no V1beta1 counterpart")
    spec: dict[str, Any] = {}
    if job_type == "ops":
        spec["Deal"] = {"TargetingMode": True}
    else:
        if job["Count"] < 1:
            raise _Refused("Count", "0 (stop every execution) has no V1beta1 counterpart")
        spec["Deal"] = {"Concurrency": job["Count"]}
    if job.get("Constraints"):
        spec["NodeSelectors"] = job["Constraints"]
    labels = job.get("Labels") or {}
    if any(value for value in labels.values()):
        raise _Refused("Labels", "V1beta1 annotations are keys only; values have no counterpart")
    if labels:
        spec["Annotations"] = sorted(labels)
    [task] = job["Tasks"]
    for key in ("Env", "Meta"):
        if task.get(key) and not (key == "Env" and task["Engine"]["Type"] in ("docker", "wasm")):
            raise _Refused(f"Tasks.0.{key}", "has no V1beta1 counterpart")
    engine = task["Engine"]
    kind = _ENGINES_BACK.get(engine["Type"])
    if kind is None:
        raise _Refused("Tasks.0.Engine.Type", f"{engine['Type']} has no V1beta1 counterpart")
    spec["Engine"] = kind
    params = dict(engine.get("Params") or {})
    env = task.get("Env") or {}
    if any(value.startswith("env:") for value in env.values()):
        raise _Refused("Tasks.0.Env", "values read from the node (env:NAME) have no V1beta1 "
                                      "counterpart")
    sources = list(task.get("InputSources") or [])
    if kind == "Docker":
        if env:
            params["EnvironmentVariables"] = [
                *params.get("EnvironmentVariables", []), *(f"{k}={v}" for k, v in env.items())]
        spec["Docker"] = params
    elif kind == "Wasm":
        spec["Wasm"] = _wasm_back(params, sources, env)
    elif params:
        raise _Refused("Tasks.0.Engine.Params", "a V1beta1 Noop engine takes none")
    publisher = task.get("Publisher") or {"Type": "noop"}  # none publishes nothing: Noop
    back = _PUBLISHERS_BACK.get(publisher.get("Type", ""))
    if back is None:
        raise _Refused("Tasks.0.Publisher.Type",
                       f"{publisher.get('Type')} has no V1beta1 counterpart")
    spec["PublisherSpec"] = {"Type": back,
                             **({"Params": publisher["Params"]} if publisher.get("Params") else {})}
    if sources:
        spec["Inputs"] = [_storage_back(source, f"Tasks.0.InputSources.{index}")
                          for index, source in enumerate(sources)]
    if task.get("ResultPaths"):
        spec["Outputs"] = task["ResultPaths"]
    if task.get("Resources"):
        spec["Resources"] = task["Resources"]
    network = dict(task.get("Network") or {})
    if network:
        if network.get("Ports"):
            raise _Refused("Tasks.0.Network.Ports", "have no V1beta1 counterpart")
        # Omitted means None on v1.5 and v1.6, as in V1beta1; Default, Host and Bridge came later.
        net = _NETWORKS_BACK.get(str(network.get("Type", "None")).lower())
        if net is None:
            raise _Refused("Tasks.0.Network.Type",
                           f"{network.get('Type')} has no V1beta1 counterpart")
        spec["Network"] = {"Type": net, **({"Domains": network["Domains"]}
                                           if network.get("Domains") else {})}
    timeouts = task.get("Timeouts") or {}
    if timeouts.get("QueueTimeout"):
        raise _Refused("Tasks.0.Timeouts.QueueTimeout", "has no V1beta1 counterpart")
    given = {value for value in (timeouts.get("ExecutionTimeout"), timeouts.get("TotalTimeout"))
             if value}
    if len(given) > 1:
        raise _Refused("Tasks.0.Timeouts", "V1beta1 has one Timeout: give ExecutionTimeout or "
                                           "TotalTimeout, or both equal")
    if given:
        spec["Timeout"] = given.pop()
    return spec


def _wasm_back(params: dict[str, Any], sources: list[dict[str, Any]],
               env: dict[str, str]) -> dict[str, Any]:
    """Wasm modules are input sources mounted where the params point: take them back out."""

    def module(target: object, where: str) -> dict[str, Any]:
        for index, source in enumerate(sources):
            if source.get("Target") == target:
                return _storage_back(sources.pop(index), where)
        raise _Refused(where, "names no input source's Target")

    wasm: dict[str, Any] = {
        "EntryModule": module(params.pop("EntryModule", None), "Tasks.0.Engine.Params.EntryModule"),
    }
    imports = params.pop("ImportModules", None) or []
    if imports:
        wasm["ImportModules"] = [module(target, f"Tasks.0.Engine.Params.ImportModules.{i}")
                                 for i, target in enumerate(imports)]
    for key, back in (("Entrypoint", "EntryPoint"), ("EntryPoint", "EntryPoint"),
                      ("Parameters", "Parameters")):
        if key in params:
            wasm[back] = params.pop(key)
    if params:
        raise _Refused(f"Tasks.0.Engine.Params.{sorted(params)[0]}",
                       "has no V1beta1 counterpart")
    if env:
        wasm["EnvironmentVariables"] = env
    return wasm


def _storage_back(source: dict[str, Any], where: str) -> dict[str, Any]:
    spec = source.get("Source") or {}
    kind = _SOURCES_BACK.get(str(spec.get("Type", "")).lower())
    if kind is None:
        raise _Refused(f"{where}.Source.Type", f"{spec.get('Type')} has no V1beta1 counterpart")
    params = dict(spec.get("Params") or {})
    storage: dict[str, Any] = {"StorageSource": kind, "Path": source.get("Target")}
    if source.get("Alias"):
        storage["Name"] = source["Alias"]
    if kind == "S3":
        if "ChecksumSHA256" in params:
            params["Checksum"] = params.pop("ChecksumSHA256")
        if params.get("Filter"):
            raise _Refused(f"{where}.Source.Params.Filter", "has no V1beta1 counterpart")
        params.pop("Filter", None)
        storage["S3"] = params
        return storage
    if kind == "LocalDirectory" and params.get("CreateAs"):
        raise _Refused(f"{where}.Source.Params.CreateAs", "has no V1beta1 counterpart")
    params.pop("CreateAs", None)
    storage.update(params)
    return storage
