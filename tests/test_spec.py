"""The Spec models: tolerant input, the server's checks, canonical wire JSON, no echoed input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.domain.manifest import load_file
from reconciler.domain.spec import ValidationError, parse_spec, spec_hash, to_wire

EXAMPLES = Path(__file__).parent / "fixtures/examples"


def errors_of(data: object) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as info:
        parse_spec(data)
    return [(".".join(map(str, e["loc"])), e["msg"])
            for e in info.value.errors(include_input=False, include_url=False)]


@pytest.mark.parametrize("name", ["job.yaml", "job.json", "job-noop.yaml", "job-noop-url.yaml",
                                  "job-s3.yaml", "job_cancel.json"])
def test_native_examples_load(name: str) -> None:
    result = load_file(name, (EXAMPLES / name).read_bytes())
    assert result.errors == ()
    [manifest] = result.manifests
    wire = manifest.wire()
    assert wire["PublisherSpec"]["Type"] in {"Noop", "Ipfs", "Estuary", "S3"}
    assert "Publisher" not in wire  # migrated into PublisherSpec, as the CLI does
    assert wire["Deal"]["Concurrency"] >= 1


def test_invalid_example_fails_clearly() -> None:
    result = load_file("job-invalid.yml", (EXAMPLES / "job-invalid.yml").read_bytes())
    assert result.manifests == ()
    assert [str(e) for e in result.errors] == ["job-invalid.yml:3: APIVersion: Field required"]


def test_wire_names_and_string_enums() -> None:
    spec = parse_spec({
        "engine": "DOCKER", "publisher_spec": {"type": "s3", "params": {"Bucket": "b"}},
        "docker": {"image": "ubuntu", "environment_variables": ["A=1"]},
        "inputs": [{"storage_source": "s3", "s3": {"bucket": "b", "version_id": "v",
                                                   "checksum": "c"}, "path": "/in"},
                   {"storagesource": "ipfs", "cid": "Qm", "path": "/cid"},
                   {"StorageSource": "urldownload", "url": "https://x.test/f", "path": "/u"}],
        "network": {"type": "http", "domains": ["example.com", "10.0.0.1"]},
        "node_selectors": [{"key": "zone", "operator": "in", "values": ["a"]}],
        "resources": {"cpu": 1, "memory": "1Gb"},
        "do_not_track": True, "timeout": 60,
    })
    wire = to_wire(spec)
    assert wire["Engine"] == "Docker"
    assert wire["PublisherSpec"] == {"Type": "S3", "Params": {"Bucket": "b"}}
    assert wire["Inputs"][0] == {"StorageSource": "S3", "Path": "/in",
                                 "S3": {"Bucket": "b", "VersionID": "v", "Checksum": "c"}}
    assert wire["Inputs"][1] == {"StorageSource": "IPFS", "CID": "Qm", "Path": "/cid"}
    assert wire["Inputs"][2]["URL"] == "https://x.test/f"
    assert wire["Network"] == {"Type": "HTTP", "Domains": ["example.com", "10.0.0.1"]}
    assert wire["NodeSelectors"] == [{"Key": "zone", "Operator": "in", "Values": ["a"]}]
    assert wire["Resources"] == {"CPU": "1", "Memory": "1Gb"}
    assert wire["DoNotTrack"] is True and wire["Timeout"] == 60
    assert wire["Deal"] == {"Concurrency": 1}


def test_reformatting_keeps_the_hash() -> None:
    a = parse_spec({"Engine": "Noop", "Publisher": "Noop", "Annotations": []})
    b = parse_spec({"engine": "noop", "publisher_spec": {"type": "NOOP"},
                    "deal": {"concurrency": 1}})
    c = parse_spec({"Engine": "Noop", "Publisher": "Noop", "Timeout": 5})
    assert spec_hash(a) == spec_hash(b) != spec_hash(c)


@pytest.mark.parametrize(
    ("data", "where", "message"),
    [
        ({"Engine": 2, "Publisher": "noop"}, "Engine", "must be a string"),
        ({"Engine": "spark", "Publisher": "noop"}, "Engine", "unknown value"),
        ({"Engine": "noop", "Publisher": "ftp"}, "Publisher", "unknown value"),
        ({"Engine": "noop"}, "", "PublisherSpec.Type: required"),
        ({"Engine": "docker", "Publisher": "noop"}, "", "Docker.Image: required"),
        ({"Engine": "wasm", "Publisher": "noop"}, "", "Wasm.EntryModule: required"),
        ({"Engine": "noop", "Publisher": "noop", "Timeout": 600.0}, "Timeout", "valid integer"),
        ({"Engine": "noop", "Publisher": "noop", "Timeout": "600"}, "Timeout", "valid integer"),
        ({"Engine": "noop", "Publisher": "noop", "Deal": {"Concurrency": 0}}, "Deal", ">= 1"),
        ({"Engine": "noop", "Publisher": "noop",
          "Deal": {"TargetingMode": True, "Concurrency": 3}}, "Deal", "must be == 0"),
        ({"Engine": "noop", "Publisher": "noop", "Dokcer": {}}, "Dokcer", "Extra inputs"),
        ({"Engine": "noop", "Publisher": "noop", "Inputs": [{"Path": "/x"}]}, "",
         "Inputs.0.StorageSource: required"),
        ({"Engine": "noop", "Publisher": "noop", "Inputs": [{"StorageSource": "nfs"}]},
         "Inputs.0.StorageSource", "unknown value"),
        ({"Engine": "noop", "Publisher": "noop", "Network": {"Domains": ["No Host"]}},
         "Network", "host name"),
        ({"Engine": "noop", "Publisher": "noop",
          "NodeSelectors": [{"Key": "a", "Operator": "~"}]}, "NodeSelectors.0", "Operator"),
        ({"Engine": "noop", "engine": "docker", "Publisher": "noop"}, "", "given twice"),
    ],
)
def test_rejections_name_the_field(data: dict[str, Any], where: str, message: str) -> None:
    found = errors_of(data)
    assert any(loc == where and message in msg for loc, msg in found), found


def test_errors_never_echo_input() -> None:
    secret = "AKIA-SUPER-SECRET-VALUE"
    data = {"Engine": "docker", "Publisher": "noop",
            "Docker": {"Image": 5, "EnvironmentVariables": [secret]},
            "Inputs": [{"StorageSource": "s3", "S3": {"Bucket": {"k": secret}}}]}
    with pytest.raises(ValidationError) as info:
        parse_spec(data)
    assert secret not in str(info.value)
    assert secret not in json.dumps(info.value.errors(include_input=False, include_url=False))
    assert secret not in repr(parse_spec({"Engine": "docker", "Publisher": "noop",
                                          "Docker": {"Image": "x"}}))


# --- property: wire JSON -> model -> wire JSON is stable -----------------------------------

text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
strings = st.lists(text, max_size=3)
storage = st.fixed_dictionaries(
    {"StorageSource": st.sampled_from(["IPFS", "URLDownload", "S3", "Inline", "RepoClone"])},
    optional={"Name": text, "CID": text, "URL": text, "Path": text, "ReadWrite": st.booleans(),
              "Metadata": st.dictionaries(text, text, max_size=2),
              "S3": st.fixed_dictionaries({}, optional={"Bucket": text, "Key": text,
                                                        "Region": text, "VersionID": text})},
)
docker = st.fixed_dictionaries({"Image": text}, optional={
    "Entrypoint": strings, "Parameters": strings, "EnvironmentVariables": strings,
    "WorkingDirectory": text})
specs = st.fixed_dictionaries(
    {"Engine": st.sampled_from(["Noop", "Docker"]),
     "PublisherSpec": st.fixed_dictionaries(
         {"Type": st.sampled_from(["Noop", "Ipfs", "Estuary", "S3"])},
         optional={"Params": st.dictionaries(text, text, max_size=2)})},
    optional={
        "Docker": docker,
        "Resources": st.fixed_dictionaries({}, optional={"CPU": text, "Memory": text,
                                                         "GPU": text, "Disk": text}),
        "Network": st.fixed_dictionaries(
            {"Type": st.sampled_from(["None", "Full", "HTTP"])},
            optional={"Domains": st.lists(st.sampled_from(["a.example.com", "10.1.2.3"]),
                                          max_size=2)}),
        "Timeout": st.integers(0, 10**9),
        "Inputs": st.lists(storage, max_size=2),
        "Outputs": st.lists(storage, max_size=2),
        "Annotations": strings,
        "NodeSelectors": st.lists(st.fixed_dictionaries(
            {"Key": text, "Operator": st.sampled_from(["=", "in", "exists", "gt"])},
            optional={"Values": strings}), max_size=2),
        "DoNotTrack": st.booleans(),
        "Deal": st.one_of(st.fixed_dictionaries({"Concurrency": st.integers(1, 50)}),
                          st.fixed_dictionaries({"TargetingMode": st.just(True),
                                                 "Concurrency": st.integers(0, 1)})),
    },
).filter(lambda s: s["Engine"] != "Docker" or "Docker" in s)


@settings(max_examples=300, deadline=None)
@given(specs)
def test_wire_round_trip_is_stable(data: dict[str, Any]) -> None:
    wire = to_wire(parse_spec(data))
    again = to_wire(parse_spec(json.loads(json.dumps(wire))))
    assert again == wire
    assert spec_hash(parse_spec(wire)) == spec_hash(parse_spec(data))


HASHES = Path(__file__).parent / "fixtures/hashes"


def test_spec_hashes_and_translations_never_change() -> None:
    """A manifest's spec hash is what every record and job is matched on: a release whose
    parsing changed one hash would replace every such job on upgrade (docs/design.md,
    "Manifests"). The golden figures were made by the code before the parse path was last
    made faster; a deliberate change of the wire form must update them, and say why."""
    from reconciler.domain.spec import canonical_json, hash_wire
    from reconciler.domain.translate import to_legacy, to_orchestrator

    golden = json.loads((HASHES / "golden.json").read_text())
    seen = {}
    for path in sorted(HASHES.glob("*.y*ml")) + sorted(HASHES.glob("*.json")):
        if path.name == "golden.json":
            continue
        result = load_file(path.name, path.read_bytes())
        assert result.errors == (), result.errors
        for manifest in result.manifests:
            translated = {}
            for form, outcome in (("orchestrator", to_orchestrator(manifest)),
                                  ("legacy", to_legacy(manifest))):
                translated[form] = (hash_wire(canonical_json(outcome))
                                    if isinstance(outcome, dict) else str(outcome))
            seen[manifest.name] = {"file": path.name, "spec_hash": manifest.spec_hash,
                                   **translated}
    assert seen == golden


def test_canonical_keys_in_any_mapping_and_never_the_callers_changed() -> None:
    """A mapping whose keys are all wire names is passed through as it is (a cheaper parse):
    a read-only or other non-dict mapping must still read as before, when the keys were
    always copied into a dict (strict models take dicts only), and the client defaults
    (Deal, PublisherSpec) are set in a copy, never in the caller's mapping."""
    from types import MappingProxyType

    docker: dict[str, object] = {"Image": "ubuntu", "Entrypoint": ["echo"]}
    deal: dict[str, object] = {"Concurrency": 2}
    data = {"Engine": "Docker", "Publisher": "Ipfs",
            "Docker": MappingProxyType(docker), "Deal": MappingProxyType(deal)}
    plain = {**data, "Docker": docker, "Deal": deal}
    assert to_wire(parse_spec(MappingProxyType(data))) == to_wire(parse_spec(plain))
    assert spec_hash(parse_spec(data)) == spec_hash(parse_spec(plain))
    before = json.dumps(plain, sort_keys=True)
    parse_spec(plain)
    assert json.dumps(plain, sort_keys=True) == before
    assert "Image: given twice" in str(errors_of({
        "Engine": "docker", "Publisher": "noop", "Docker": {"Image": "a", "image": "b"}}))
