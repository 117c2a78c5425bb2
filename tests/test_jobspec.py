"""Orchestrator job manifests: the third form, the envelope's job:, the server's submit rules
offline, translation both ways, wire hygiene (docs/design.md "Orchestrator job manifests")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from reconciler.app.cli import main
from reconciler.domain.jobspec import hygienic, job_problems, job_wire, parse_job
from reconciler.domain.manifest import ORCHESTRATOR, V1BETA1, LoadError, Manifest, load_file
from reconciler.domain.spec import parse_spec
from reconciler.domain.translate import needs_orchestrator, to_legacy, to_orchestrator

FIXTURES = Path(__file__).parent / "fixtures" / "orchestrator"

JOB = """\
Type: batch
Count: 1
Tasks:
  - Name: main
    Engine:
      Type: docker
      Params:
        Image: ubuntu:24.04
        Entrypoint: [/bin/sh, -c]
        Parameters: [echo hi]
    Publisher: {Type: noop}
"""


def one(path: str, text: str | bytes) -> Manifest:
    result = load_file(path, text.encode() if isinstance(text, str) else text)
    assert result.errors == (), [str(e) for e in result.errors]
    [manifest] = result.manifests
    return manifest


def errors(path: str, text: str) -> list[str]:
    result = load_file(path, text.encode())
    assert result.manifests == ()
    return [str(e) for e in result.errors]


def envelope(job: str, name: str = "hello") -> str:
    body = "\n".join("  " + line for line in job.splitlines())
    return f"apiVersion: reconciler/v1\nkind: Job\nmetadata: {{name: {name}}}\njob:\n{body}\n"


# --- the examples ----------------------------------------------------------------------------


def test_the_documented_full_job_loads_with_its_name() -> None:
    manifest = one("jobs/rc-hello.json", (FIXTURES / "rc-hello.json").read_bytes())
    assert (manifest.name, manifest.form, manifest.long_running) == (
        "rc-hello-3f9a2c1d7e", ORCHESTRATOR, False)
    wire = manifest.wire()
    original = json.loads((FIXTURES / "rc-hello.json").read_text())
    # canonical: nothing added or lost; only the source type lower-cased (the server's update
    # diff compares types exactly, the nodes look them up lower-cased)
    original["Tasks"][0]["InputSources"][0]["Source"]["Type"] = "urldownload"
    assert wire == original


def test_the_sdk_probe_job_is_refused_for_its_name_only() -> None:
    result = load_file("sdk-probe.json", (FIXTURES / "sdk-probe.json").read_bytes())
    assert [str(e) for e in result.errors] == [
        "sdk-probe.json:1: Name: not a valid manifest name: 1-63 of a-z 0-9 . _ - starting "
        "with a letter or digit"]
    data = json.loads((FIXTURES / "sdk-probe.json").read_text())
    del data["Name"]
    manifest = one("sdk-probe.json", json.dumps(data))
    assert manifest.name == "sdk-probe"


@pytest.mark.parametrize("name", ["v1beta1-job-noop.yaml", "v1beta1-job-noop-url.yaml",
                                  "v1beta1-job-s3.yaml"])
def test_bacalhau_v1beta1_examples_translate(name: str) -> None:
    manifest = one(name, (FIXTURES / name).read_bytes())
    job = to_orchestrator(manifest)
    assert isinstance(job, dict), job
    [task] = job["Tasks"]
    assert job["Type"] == "batch" and job["Count"] == 1
    assert task["ResultPaths"] == [{"Name": "output_custom", "Path": "/output_custom"}]
    assert task["Network"] == {"Type": "None"}
    assert task["Engine"]["Type"] == task["Engine"]["Type"].lower()
    assert job_problems(parse_job(job)) == []
    back = to_legacy(Manifest.of_job(manifest.name, parse_job(job), name))
    assert isinstance(back, dict)
    assert back["Outputs"] == [{"Name": "output_custom", "Path": "/output_custom"}]


def test_s3_input_checksum_and_publisher_params_translate() -> None:
    manifest = one("s3.yaml", (FIXTURES / "v1beta1-job-s3.yaml").read_bytes())
    job = to_orchestrator(manifest)
    assert isinstance(job, dict)
    [task] = job["Tasks"]
    assert task["Publisher"] == {"Type": "s3", "Params": {
        "Bucket": "bacalhau-test-datasets", "Key": "integration-tests-published-result/job-{jobID}",
        "Region": "eu-west-1"}}
    assert task["InputSources"] == [{"Source": {"Type": "s3", "Params": {
        "Bucket": "bacalhau-test-datasets", "Key": "integration-tests-do-not-delete/set1/",
        "Region": "eu-west-1"}}, "Target": "/input_custom"}]


def test_estuary_is_refused_naming_the_manifest_and_field() -> None:
    manifest = one("job.yaml", (FIXTURES / "v1beta1-job.yaml").read_bytes())
    refused = to_orchestrator(manifest)
    assert isinstance(refused, LoadError)
    assert str(refused) == "job.yaml:1: spec.PublisherSpec.Type: Estuary has no orchestrator " \
                           "counterpart"
    assert refused.names == ("job",)


# --- the third form and the envelope ---------------------------------------------------------


def test_a_job_file_is_named_by_its_stem_lower_cased() -> None:
    manifest = one("jobs/Nightly.yaml", JOB)
    assert (manifest.name, manifest.form, manifest.policy.on_change) == (
        "nightly", ORCHESTRATOR, "replace")
    assert manifest.wire()["Tasks"][0]["Engine"]["Params"]["Image"] == "ubuntu:24.04"


def test_name_wins_over_the_stem_and_follows_the_name_rules() -> None:
    assert one("x.yaml", "Name: report\n" + JOB).name == "report"
    assert errors("x.yaml", "Name: Report\n" + JOB) == [
        "x.yaml:1: Name: not a valid manifest name: 1-63 of a-z 0-9 . _ - starting with a "
        "letter or digit"]


@pytest.mark.parametrize("text, path, where", [
    ("Name: j-0a\n" + JOB, "x.yaml", "x.yaml:1: Name"),
    ("Name: j\n" + JOB, "x.yaml", "x.yaml:1: Name"),
    (JOB, "j-1.yaml", "j-1.yaml:1: file name"),
    (envelope(JOB, "j-abc"), "x.yaml", "x.yaml:3: metadata.name"),
    ("APIVersion: v1beta1\nSpec: {Engine: Noop, Publisher: Noop}\n", "j-2.yaml",
     "j-2.yaml:1: file name"),
])
def test_names_that_look_like_a_job_id_are_refused(text: str, path: str, where: str) -> None:
    assert errors(path, text) == [
        f"{where}: must not be j or start with j-: Bacalhau could take it for a job id prefix"]


def test_j_inside_a_name_is_fine() -> None:
    assert one("x.yaml", "Name: job-1\n" + JOB).name == "job-1"
    assert one("x.yaml", "Name: jj-1\n" + JOB).name == "jj-1"


def test_the_envelope_takes_a_job() -> None:
    text = envelope(JOB) + "policy: {onFailure: resubmit}\n"
    manifest = one("x.yaml", text)
    assert (manifest.name, manifest.form, manifest.policy.on_failure) == (
        "hello", ORCHESTRATOR, "resubmit")
    assert manifest.spec_hash == one("hello.yaml", JOB).spec_hash  # the same job, either form


def test_the_envelope_takes_exactly_one_of_spec_and_job() -> None:
    both = envelope(JOB) + "spec: {engine: noop, publisher: noop}\n"
    assert errors("x.yaml", both) == [
        "x.yaml:5: job: give spec (a V1beta1 Spec) or job (an orchestrator Job), not both"]
    neither = "apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: hello}\n"
    result = load_file("x.yaml", neither.encode())
    assert [str(e) for e in result.errors] == [
        "x.yaml:1: spec: Field required (or job: an orchestrator Job)"]
    assert result.errors[0].names == ("hello",)  # still held by name
    assert errors("x.yaml", neither + "spec:\n") == [
        "x.yaml:1: spec: Field required (or job: an orchestrator Job)"]
    assert errors("x.yaml", "apiVersion: reconciler/v1\nkind: Job\n") == [
        "x.yaml:1: metadata: Field required",
        "x.yaml:1: spec: Field required (or job: an orchestrator Job)"]


def test_a_job_name_inside_the_envelope_must_match() -> None:
    assert errors("x.yaml", envelope("Name: other\n" + JOB)) == [
        "x.yaml:5: job.Name: differs from metadata.name (leave it out)"]
    assert one("x.yaml", envelope("Name: hello\n" + JOB)).name == "hello"


def test_unknown_keys_are_refused_with_the_nearest_field() -> None:
    text = JOB.replace("Publisher:", "Publsher:")
    assert errors("x.yaml", text) == [
        "x.yaml:11: Tasks.0.Publsher: Extra inputs are not permitted (did you mean "
        "`Publisher`?)"]
    assert errors("x.yaml", envelope(JOB.replace("Count:", "Cuont:"))) == [
        "x.yaml:6: job.Cuont: Extra inputs are not permitted (did you mean `Count`?)"]


def test_keys_are_case_insensitive_and_output_fields_refused() -> None:
    lower = yaml.safe_dump(_lower_keys(yaml.safe_load(JOB)))
    assert one("hello.yaml", lower).spec_hash == one("hello.yaml", JOB).spec_hash
    assert errors("x.yaml", "ID: j-123\n" + JOB) == [
        "x.yaml:1: document: ID: set by the server, never sent (remove it)"]


def _lower_keys(value: Any) -> Any:
    """Every field name lower-cased; the keys of free maps (Params, Env, ...) kept."""
    if isinstance(value, dict):
        return {key.lower(): item if key in _FREE else _lower_keys(item)
                for key, item in value.items()}
    if isinstance(value, list):
        return [_lower_keys(item) for item in value]
    return value


_FREE = frozenset({"Params", "Env", "Meta", "Labels"})


@pytest.mark.parametrize("job_type, long_running", [
    ("batch", False), ("ops", False), ("service", True), ("daemon", True)])
def test_every_job_type_is_accepted(job_type: str, long_running: bool) -> None:
    manifest = one("x.yaml", JOB.replace("Type: batch", f"Type: {job_type}").replace(
        "Count: 1\n", ""))
    assert manifest.long_running is long_running
    assert manifest.job_type == job_type
    assert manifest.wire()["Count"] == (0 if job_type in ("ops", "daemon") else 1)


def test_v1beta1_manifests_keep_their_form_and_hash() -> None:
    text = ("apiVersion: reconciler/v1\nkind: Job\nmetadata: {name: a}\n"
            "spec: {engine: noop, publisher: noop}\n")
    manifest = one("a.yaml", text)
    assert (manifest.form, manifest.job_type, manifest.long_running) == (V1BETA1, "batch", False)
    assert manifest == Manifest.of("a", parse_spec({"Engine": "Noop", "Publisher": "Noop"}),
                                   "a.yaml")


def test_validate_lists_orchestrator_problems_offline(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "good.yaml").write_text(JOB)
    (folder / "j-1.yaml").write_text(JOB)
    (folder / "bad.yaml").write_text(JOB.replace("Type: batch", "Type: cron"))
    (folder / "both.yaml").write_text(envelope(JOB) + "spec: {engine: noop, publisher: noop}\n")
    result = CliRunner().invoke(main, ["validate", "--manifests", str(folder)])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert "bad.yaml:1: Type: must be one of batch, ops, service, daemon" in lines
    assert any(line.startswith("j-1.yaml:1: file name: must not be j") for line in lines)
    assert any(line.startswith("both.yaml:5: job: give spec") for line in lines)
    assert not any("good.yaml" in line for line in lines)


# --- the server's rules, offline (docs/wire-orchestrator.md section 5) -----------------------


@pytest.mark.parametrize("old, new, line, where, message", [
    ("Type: batch", "Type: cron", 1, "Type", "must be one of batch, ops, service, daemon"),
    ("Count: 1", "Count: -1", 2, "Count", "must be >= 0"),
    ("Type: batch\nCount: 1", "Type: ops\nCount: 2", 2, "Count",
     "must be 0 or 1 for ops jobs (they run on every node)"),
    ("Tasks:\n  - Name: main", "Tasks:\n  - Name: ' '", 4, "Tasks.0.Name", "required"),
    ("Type: docker", "Type: ''", 6, "Tasks.0.Engine.Type", "required (docker, wasm or noop)"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Resources: {CPU: lots}", 12,
     "Tasks.0.Resources.CPU", "not a quantity: cores as 2, 0.5 or 500m"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Resources: {Memory: 1 lots}", 12,
     "Tasks.0.Resources.Memory", "not a quantity: bytes as 512Mb or 1GiB"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Resources: {GPU: '0.5'}", 12,
     "Tasks.0.Resources.GPU", "not a quantity: a whole number"),
    ("Publisher: {Type: noop}", "ResultPaths: [{Name: out, Path: /out}]", 4,
     "Tasks.0.Publisher.Type", "required when ResultPaths are set"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    ResultPaths:\n"
     "      - {Name: out, Path: out}", 13, "Tasks.0.ResultPaths.0.Path",
     "must be an absolute path"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    ResultPaths:\n"
     "      - {Name: out, Path: /a}\n      - {Name: out, Path: /b}", 14,
     "Tasks.0.ResultPaths.1.Name", "given twice"),
    ("Count: 1", "Count: 1\nConstraints:\n  - {Key: region, Operator: in}", 4,
     "Constraints.0.Values", "required for operator in"),
    ("Count: 1", "Count: 1\nConstraints:\n  - {Key: region, Operator: exists, Values: [a]}", 4,
     "Constraints.0.Values", "must be empty for operator exists"),
    ("Count: 1", "Count: 1\nConstraints:\n  - {Key: ' ', Operator: '='}", 4,
     "Constraints.0.Key", "required"),
    ("Count: 1", "Count: 1\nConstraints:\n  - {Key: a, Operator: like, Values: [b]}", 4,
     "Constraints.0.Operator", "expected one of !, !=, =, ==, exists, gt, in, lt, notin"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Env: {lower: x}", 12,
     "Tasks.0.Env.lower", "names are A-Z, 0-9 and _, starting with a letter, not BACALHAU_"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Env: {BACALHAU_X: x}", 12,
     "Tasks.0.Env.BACALHAU_X",
     "names are A-Z, 0-9 and _, starting with a letter, not BACALHAU_"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Env: {TOKEN: ''}", 12,
     "Tasks.0.Env.TOKEN", "value must not be empty"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Network: {Type: Warp}", 12,
     "Tasks.0.Network.Type",
     "unknown to Bacalhau v1.9; one of Bridge, Default, Full, HTTP, Host, None"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
     "    Network: {Type: None, Domains: [example.org]}", 12, "Tasks.0.Network.Domains",
     "only with Network.Type HTTP"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
     "    Network: {Type: HTTP, Ports: [{Name: web}]}", 12, "Tasks.0.Network.Ports",
     "only with Network.Type Host or Bridge"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
     "    InputSources: [{Source: {Type: ipfs}}]", 12, "Tasks.0.InputSources.0.Target",
     "required (where it is mounted)"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
     "    Timeouts: {ExecutionTimeout: 60, TotalTimeout: 30}", 12,
     "Tasks.0.Timeouts.TotalTimeout", "must be at least ExecutionTimeout + QueueTimeout"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Timeouts: {QueueTimeout: -1}", 12,
     "Tasks.0.Timeouts.QueueTimeout", "must be >= 0"),
    ("Count: 1", "Count: 1\nMeta: {bacalhau.org/requester.id: n-1}", 3,
     "Meta.bacalhau.org/requester.id", "keys starting bacalhau.org/ are the server's"),
])
def test_each_submit_rule_names_file_line_and_field(
        old: str, new: str, line: int, where: str, message: str) -> None:
    assert old in JOB
    text = JOB.replace(old, new, 1)
    assert errors("x.yaml", text) == [f"x.yaml:{line}: {where}: {message}"]
    # the same rule inside the envelope, with its own line and the job. prefix
    found = errors("x.yaml", envelope(text))
    assert found == [f"x.yaml:{line + 4}: job.{where}: {message}"]


def test_more_than_one_task_is_refused_not_dropped() -> None:
    text = JOB + "  - Name: second\n    Engine: {Type: noop}\n"
    assert errors("x.yaml", text) == [
        "x.yaml:4: Tasks: exactly one task is used; the server drops the others"]


def test_network_types_depend_on_the_server_version() -> None:
    def network(kind: str) -> list[str]:
        job = parse_job(yaml.safe_load(JOB.replace(
            "Publisher: {Type: noop}",
            f"Publisher: {{Type: noop}}\n    Network: {{Type: {kind}}}")))
        return [message for _, message in job_problems(job, (1, 5))]

    assert network("Full") == []
    assert network("Host") == ["unknown to Bacalhau v1.5; one of Full, HTTP, None"]
    assert one("x.yaml", JOB.replace("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
                                     "    Network: {Type: bridge}")).wire()[
        "Tasks"][0]["Network"] == {"Type": "Bridge"}  # the canonical spelling


def test_errors_never_echo_values() -> None:
    secret = "hunter2-secret-token"
    text = JOB.replace("Publisher: {Type: noop}",
                       f"Publisher: {{Type: noop}}\n    Env: {{bad: {secret}}}\n"
                       f"    Resources: {{CPU: {secret}}}")
    assert all(secret not in line for line in errors("x.yaml", text))


# --- translation -----------------------------------------------------------------------------


V1_FULL = {
    "Engine": "Docker", "Publisher": "Ipfs",
    "Docker": {"Image": "ubuntu:22.04", "Entrypoint": ["/bin/sh", "-c", "echo"],
               "EnvironmentVariables": ["A=1"], "WorkingDirectory": "/w"},
    "Resources": {"CPU": "1", "Memory": "1Gb"},
    "Network": {"Type": "HTTP", "Domains": ["example.org"]},
    "Timeout": 300,
    "Inputs": [{"StorageSource": "IPFS", "CID": "Qm1", "Path": "/in", "Name": "data"},
               {"StorageSource": "LocalDirectory", "SourcePath": "/srv", "ReadWrite": True,
                "Path": "/srv"}],
    "Outputs": [{"Name": "out", "Path": "/out"}],
    "Annotations": ["team-a", "nightly"],
    "NodeSelectors": [{"Key": "region", "Operator": "in", "Values": ["eu"]}],
    "Deal": {"Concurrency": 2},
}


def v1(spec: dict[str, Any], name: str = "full") -> Manifest:
    return Manifest.of(name, parse_spec(spec), f"{name}.yaml", 3)


def test_v1beta1_translates_as_the_wire_notes_say() -> None:
    job = to_orchestrator(v1(V1_FULL))
    assert job == {
        "Type": "batch", "Count": 2,
        "Constraints": [{"Key": "region", "Operator": "in", "Values": ["eu"]}],
        "Labels": {"team-a": "", "nightly": ""},
        "Tasks": [{
            "Name": "main",
            "Engine": {"Type": "docker", "Params": V1_FULL["Docker"]},
            "Publisher": {"Type": "ipfs"},
            "InputSources": [
                {"Source": {"Type": "ipfs", "Params": {"CID": "Qm1"}}, "Alias": "data",
                 "Target": "/in"},
                {"Source": {"Type": "local", "Params": {"SourcePath": "/srv", "ReadWrite": True}},
                 "Target": "/srv"}],
            "ResultPaths": [{"Name": "out", "Path": "/out"}],
            "Resources": {"CPU": "1", "Memory": "1Gb"},
            "Network": {"Type": "HTTP", "Domains": ["example.org"]},
            "Timeouts": {"ExecutionTimeout": 300},
        }],
    }


def test_targeting_all_is_an_ops_job_and_wasm_modules_become_inputs() -> None:
    spec = {"Engine": "Wasm", "Publisher": "Noop", "Deal": {"TargetingMode": True},
            "Wasm": {"EntryModule": {"StorageSource": "IPFS", "CID": "Qm2"},
                     "EntryPoint": "_start", "EnvironmentVariables": {"MODE": "x"},
                     "ImportModules": [{"StorageSource": "URLDownload", "URL": "https://e/l.wasm"}]}}
    manifest = v1(spec, "wasm")
    assert manifest.job_type == "ops"
    job = to_orchestrator(manifest)
    assert isinstance(job, dict)
    [task] = job["Tasks"]
    assert (job["Type"], job["Count"]) == ("ops", 0)
    assert task["Engine"] == {"Type": "wasm", "Params": {
        "EntryModule": "/wasm/entry.wasm", "Entrypoint": "_start",
        "ImportModules": ["/wasm/imports/module_0.wasm"]}}
    assert task["Env"] == {"MODE": "x"}
    assert [s["Target"] for s in task["InputSources"]] == [
        "/wasm/entry.wasm", "/wasm/imports/module_0.wasm"]
    back = to_legacy(Manifest.of_job("wasm", parse_job(job), "w.yaml"))
    assert isinstance(back, dict)
    assert back["Wasm"]["EntryModule"] == {"StorageSource": "IPFS", "CID": "Qm2",
                                           "Path": "/wasm/entry.wasm"}
    assert back["Deal"] == {"TargetingMode": True}


@pytest.mark.parametrize("change, field, message", [
    ({"Inputs": [{"StorageSource": "RepoClone", "Repo": "https://g/r", "Path": "/r"}]},
     "spec.Inputs.0.StorageSource", "RepoClone has no orchestrator counterpart"),
    ({"Inputs": [{"StorageSource": "Estuary", "CID": "Qm", "Path": "/r"}]},
     "spec.Inputs.0.StorageSource", "Estuary has no orchestrator counterpart"),
    ({"Inputs": [{"StorageSource": "IPFS", "CID": "Qm"}]},
     "spec.Inputs.0.Path", "required by the orchestrator API (where it is mounted)"),
    ({"Inputs": [{"StorageSource": "IPFS", "CID": "Qm", "Path": "/a", "Metadata": {"k": "v"}}]},
     "spec.Inputs.0.Metadata", "has no orchestrator counterpart; remove it"),
    ({"DoNotTrack": True}, "spec.DoNotTrack", "has no orchestrator counterpart; remove it"),
    ({"Publisher": "Estuary"}, "spec.PublisherSpec.Type",
     "Estuary has no orchestrator counterpart"),
    ({"Outputs": [{"Name": "o", "Path": "rel"}]}, "spec",
     "as an orchestrator job, Tasks.0.ResultPaths.0.Path: must be an absolute path"),
])
def test_v1beta1_fields_without_a_counterpart_are_refused(
        change: dict[str, Any], field: str, message: str) -> None:
    refused = to_orchestrator(v1({**V1_FULL, **change}))
    assert isinstance(refused, LoadError)
    assert str(refused) == f"full.yaml:3: {field}: {message}"


def test_an_orchestrator_job_translates_back_where_it_can() -> None:
    manifest = one("hello.yaml", JOB.replace("Publisher: {Type: noop}",
                                             "Publisher: {Type: noop}\n    Env: {A: '1'}"))
    spec = to_legacy(manifest)
    assert spec == {"Engine": "Docker", "PublisherSpec": {"Type": "Noop"},
                    "Docker": {"Image": "ubuntu:24.04", "Entrypoint": ["/bin/sh", "-c"],
                               "Parameters": ["echo hi"], "EnvironmentVariables": ["A=1"]},
                    "Deal": {"Concurrency": 1}}
    assert needs_orchestrator(manifest) is None
    assert to_orchestrator(manifest) == manifest.wire()


@pytest.mark.parametrize("old, new, field, message", [
    ("Type: batch", "Type: service", "Type", "service jobs have no V1beta1 counterpart"),
    ("Type: batch", "Type: daemon", "Type", "daemon jobs have no V1beta1 counterpart"),
    ("Count: 1", "Count: 0", "Count", "0 (stop every execution) has no V1beta1 counterpart"),
    ("Count: 1", "Count: 1\nPriority: 5", "Priority", "has no V1beta1 counterpart"),
    ("Count: 1", "Count: 1\nLabels: {team: a}", "Labels",
     "V1beta1 annotations are keys only; values have no counterpart"),
    ("Publisher: {Type: noop}", "Publisher: {Type: local}", "Tasks.0.Publisher.Type",
     "local has no V1beta1 counterpart"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Network: {Type: Bridge}",
     "Tasks.0.Network.Type", "Bridge has no V1beta1 counterpart"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Timeouts: {QueueTimeout: 5}",
     "Tasks.0.Timeouts.QueueTimeout", "has no V1beta1 counterpart"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n    Env: {A: 'env:HOST_A'}",
     "Tasks.0.Env", "values read from the node (env:NAME) have no V1beta1 counterpart"),
    ("Publisher: {Type: noop}", "Publisher: {Type: noop}\n"
     "    InputSources: [{Source: {Type: s3PreSigned}, Target: /x}]",
     "Tasks.0.InputSources.0.Source.Type", "s3presigned has no V1beta1 counterpart"),
])
def test_orchestrator_only_jobs_say_they_need_the_orchestrator_api(
        old: str, new: str, field: str, message: str) -> None:
    manifest = one("hello.yaml", JOB.replace(old, new, 1))
    refused = to_legacy(manifest)
    assert isinstance(refused, LoadError)
    assert str(refused) == (f"hello.yaml:1: {field}: {message}: this manifest needs the "
                            "orchestrator API (Bacalhau v1.5+)")
    assert needs_orchestrator(manifest) == refused


# --- wire hygiene ----------------------------------------------------------------------------


def test_hygiene_fills_type_count_network_and_strips_server_fields() -> None:
    dirty = {"ID": "j-1", "State": {"StateType": "Running"}, "Version": 2, "Type": "service",
             "Meta": {"bacalhau.org/requester.id": "n", "ours": "1"},
             "Tasks": [{"Name": "main", "Engine": {"Type": "Docker"},
                        "Publisher": {"Type": "IPFS"},
                        "InputSources": [{"Source": {"Type": "URLDownload"}, "Target": "/a"}],
                        "Meta": {"bacalhau.org/x": "y"}}]}
    clean = hygienic(dirty)
    assert clean == {"Type": "service", "Count": 1, "Meta": {"ours": "1"},
                     "Tasks": [{"Name": "main", "Engine": {"Type": "docker"},
                                "Publisher": {"Type": "ipfs"},
                                "InputSources": [{"Source": {"Type": "urldownload"},
                                                  "Target": "/a"}],
                                "Network": {"Type": "Default"}}]}
    assert dirty["ID"] == "j-1"  # the input is not changed
    assert hygienic(dirty, (1, 6))["Tasks"][0]["Network"] == {"Type": "None"}
    assert hygienic({"Type": "daemon", "Tasks": []})["Count"] == 0


def test_the_canonical_wire_is_lower_case_and_always_counted() -> None:
    job = parse_job({"type": "batch", "tasks": [{"name": "main", "engine": {"type": "Docker"},
                                                 "publisher": {"type": "S3"}}]})
    assert job_wire(job) == {"Type": "batch", "Count": 1, "Tasks": [{
        "Name": "main", "Engine": {"Type": "docker"}, "Publisher": {"Type": "s3"}}]}


# --- properties ------------------------------------------------------------------------------

_word = st.text("abcdefgh", min_size=1, max_size=6)
_upper = st.text("ABCDEFGH", min_size=1, max_size=6)


@st.composite
def orchestrator_jobs(draw: st.DrawFn) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": draw(_word),
        "Engine": {"Type": draw(st.sampled_from(["docker", "wasm", "noop"])),
                   "Params": draw(st.dictionaries(_upper, _word, max_size=2))},
        "Publisher": {"Type": draw(st.sampled_from(["noop", "ipfs", "s3", "local"]))},
        "Env": draw(st.dictionaries(_upper, _word, max_size=3)),
        "ResultPaths": [{"Name": n, "Path": f"/{n}"}
                        for n in draw(st.lists(_word, unique=True, max_size=2))],
        "Resources": {"CPU": draw(st.sampled_from(["1", "500m", "0.5"]))},
        "Network": {"Type": draw(st.sampled_from(["None", "Full", "HTTP", "Host", "Default"]))},
        "Timeouts": {"ExecutionTimeout": draw(st.integers(0, 10_000))},
    }
    job_type = draw(st.sampled_from(["batch", "ops", "service", "daemon"]))
    return {"Type": job_type,
            "Count": draw(st.integers(0, 1 if job_type in ("ops", "daemon") else 50)),
            "Labels": draw(st.dictionaries(_word, _word, max_size=3)),
            "Constraints": [{"Key": k, "Operator": "=", "Values": ["v"]}
                            for k in draw(st.lists(_word, max_size=2))],
            "Tasks": [task]}


@settings(max_examples=60, deadline=None)
@given(orchestrator_jobs())
@example({"Type": "ops", "Count": 1, "Tasks": [{  # the server forces an ops job's Count to 0
    "Name": "t", "Engine": {"Type": "docker", "Params": {"Image": "a"}},
    "Publisher": {"Type": "noop"}, "Network": {"Type": "None"}}]})
def test_jobs_round_trip_through_files_and_the_wire(data: dict[str, Any]) -> None:
    manifest = one("prop.json", json.dumps(data))
    assert job_problems(parse_job(manifest.wire())) == []
    again = one("prop.yaml", yaml.safe_dump(_lower_keys(manifest.wire())))
    assert (again.wire(), again.spec_hash) == (manifest.wire(), manifest.spec_hash)
    assert hygienic(manifest.wire()) == manifest.wire()  # canonical is already clean
    back = to_legacy(manifest)
    if isinstance(back, dict):  # where it translates back, it comes round unchanged
        assert to_orchestrator(v1(back)) == {
            **manifest.wire(), "Tasks": [{**manifest.wire()["Tasks"][0], "Name": "main"}]}


@st.composite
def legacy_specs(draw: st.DrawFn) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "Engine": "Docker", "PublisherSpec": {"Type": draw(st.sampled_from(["Noop", "Ipfs"]))},
        "Docker": {"Image": draw(_word)},
        "Network": {"Type": draw(st.sampled_from(["None", "Full", "HTTP"]))},
        "Deal": draw(st.one_of(st.just({"TargetingMode": True}),
                               st.builds(lambda n: {"Concurrency": n}, st.integers(1, 9)))),
    }
    if draw(st.booleans()):
        spec["Timeout"] = draw(st.integers(1, 10_000))
    annotations = draw(st.lists(_word, unique=True, max_size=3))
    if annotations:
        spec["Annotations"] = sorted(annotations)
    outputs = draw(st.lists(_word, unique=True, max_size=2))
    if outputs:
        spec["Outputs"] = [{"Name": n, "Path": f"/{n}"} for n in outputs]
    return spec


@settings(max_examples=60, deadline=None)
@given(legacy_specs())
def test_v1beta1_specs_round_trip_through_the_orchestrator_form(spec: dict[str, Any]) -> None:
    manifest = v1(spec, "prop")
    job = to_orchestrator(manifest)
    assert isinstance(job, dict), job
    back = to_legacy(Manifest.of_job("prop", parse_job(job), "prop.yaml"))
    assert back == manifest.wire()


def test_hygiene_without_copy_changes_the_callers_own_job_in_place() -> None:
    """What a backend does with a fresh translation: no deep copy per submit
    (docs/performance.md)."""
    fresh = {"Type": "batch", "Tasks": [{"Name": "main", "Engine": {"Type": "Docker"}}]}
    task = fresh["Tasks"][0]
    clean = hygienic(fresh, (1, 9), copy=False)
    assert clean["Tasks"][0] is task and task["Engine"] == {"Type": "docker"}
    assert clean == hygienic({"Type": "batch", "Tasks": [{"Name": "main",
                                                           "Engine": {"Type": "Docker"}}]})
