"""Approval as policy: decide() rules, and the probe flow end to end with a real dev requester
(compute side calling the probe), a real daemon and the approve command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from reconciler.backends.signing import load_signer
from reconciler.domain.approval import ApprovalPolicy, ProbeRequest, cpu, decide, memory
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.harness import envelope
from tests.test_daemon import wait_until

POLICY = """apiVersion: reconciler/v1
kind: ApprovalPolicy
metadata: {name: compute-policy}
spec:
  default: manual
  rules:
    - name: no-full-network
      match: {networks: [full]}
      decision: reject
      reason: full network access is not allowed here
    - name: trusted-images
      match: {images: [IMAGES], maxCpu: "2", maxMemory: 4Gb}
      decision: approve
"""


def policy(images: str = '"ubuntu:*"') -> str:
    return POLICY.replace("IMAGES", images)


def networked(name: str) -> str:
    return envelope(name, "ubuntu:22.04").replace(
        "  docker:", "  network: {type: full}\n  docker:")


def request(image: str = "ubuntu:22.04", **spec: object) -> ProbeRequest:
    return ProbeRequest("node-1", "job-1", {"Engine": "Docker", "Docker": {"Image": image},
                                            **spec}, "http://node/compute/approve")


def test_first_matching_rule_wins_and_default_applies() -> None:
    policies = {"p": ApprovalPolicy.model_validate(json.loads(json.dumps({
        "default": "reject",
        "rules": [{"name": "big", "match": {"maxCpu": "1"}, "decision": "approve"},
                  {"name": "any-ubuntu", "match": {"images": ["ubuntu:*"]},
                   "decision": "manual"}]})))}
    small = decide(policies, request(Resources={"CPU": "500m"}))
    assert (small.verdict, small.rule) == ("approve", "p/big")
    large = decide(policies, request(Resources={"CPU": "4"}))
    assert (large.verdict, large.rule) == ("manual", "p/any-ubuntu")
    other = decide(policies, request("alpine", Resources={"CPU": "4"}))
    assert (other.verdict, other.rule) == ("reject", "default:p")
    assert other.probe_reply() == {"shouldBid": False, "shouldWait": False,
                                   "reason": "no rule matched; default is reject"}
    assert decide({}, request()).probe_reply()["shouldWait"] is True


def test_conditions() -> None:
    policies = {"p": ApprovalPolicy.model_validate({"rules": [{
        "name": "r", "decision": "approve",
        "match": {"clientIds": ["me"], "engines": ["docker"], "nodeIds": ["node-1"],
                  "annotations": ["team:*"], "maxGpu": "0"}}]})}
    good = request(Annotations=["team:data"])
    assert decide(policies, good, client_id="me").verdict == "approve"
    assert decide(policies, good, client_id="someone").verdict == "manual"
    assert decide(policies, request(Annotations=["x"]), client_id="me").verdict == "manual"
    assert decide(policies, request(Annotations=["team:a"], Resources={"GPU": "1"}),
                  client_id="me").verdict == "manual"


def test_quantities() -> None:
    assert cpu("500m") == 0.5 and cpu("2") == 2 and cpu("lots") is None
    assert memory("1Gb") == 10**9 and memory("1Gi") == 2**30 and memory("256Mb") == 256 * 10**6
    # A ceiling cannot be shown to hold for a value that does not parse: no match.
    policies = {"p": ApprovalPolicy.model_validate({"default": "reject", "rules": [
        {"name": "r", "match": {"maxMemory": "1Gb"}, "decision": "approve"}]})}
    assert decide(policies, request(Resources={"Memory": "much"})).verdict == "reject"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(*args: str, key: Path, state: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reconciler", "--log-format", "json", *args, "--key", str(key),
         "--state", str(state), "--manifests", str(root)], capture_output=True, text=True)


def test_probe_flow_end_to_end(tmp_path: Path, dev_factory: Callable[..., DevProcess],
                               rsa_key: Path, other_rsa_key: Path) -> None:
    port = free_port()
    approver = load_signer(rsa_key).client_id
    dev = dev_factory("--probe-url", f"http://127.0.0.1:{port}/probe", "--approver", approver,
                      "--job-duration", "0.3")
    root, state = tmp_path / "manifests", tmp_path / "state.db"
    root.mkdir()
    (root / "policy.yaml").write_text(policy())
    (root / "a.yaml").write_text(envelope("a", "ubuntu:22.04"))
    (root / "b.yaml").write_text(networked("b"))
    (root / "c.yaml").write_text(envelope("c", "alpine:3"))
    daemon = DaemonProcess(daemon_args(root, state, dev.url, rsa_key, "--probe-listen",
                                       f"127.0.0.1:{port}"))
    try:
        def states() -> dict[str, tuple[str, str]]:
            out: dict[str, tuple[str, str]] = {}
            for job in dev.jobs():
                tags = [t for t in job["Job"]["Spec"]["Annotations"]
                        if t.startswith("reconciler-manifest:")]
                out[tags[0].split(":", 1)[1]] = (job["Job"]["Metadata"]["ID"],
                                                 job["State"]["State"])
            return out

        wait_until(lambda: states().get("a", ("", ""))[1] == "Completed")  # auto-approve
        wait_until(lambda: states().get("b", ("", ""))[1] == "Error")  # auto-reject
        errored = dev.jobs(id=states()["b"][0])[0]["State"]["Executions"][0]
        assert errored["Status"] == "full network access is not allowed here"
        decided = daemon.wait_event("approval.decided", 3)
        assert {e["rule"] for e in decided} == {"compute-policy/trusted-images",
                                                "compute-policy/no-full-network",
                                                "default:compute-policy"}
        pending = daemon.wait_event("approval.pending")[0]
        c_id = states()["c"][0]
        assert pending["job_id"] == c_id
        time.sleep(0.5)
        assert states()["c"][1] == "New"  # waiting for an operator

        listed = cli("status", "--approvals", "--json", key=rsa_key, state=state, root=root)
        rows = {r["job_id"]: r for r in json.loads(listed.stdout)["approvals"]}
        assert rows[c_id]["state"] == "pending" and rows[c_id]["job"]["image"] == "alpine:3"

        wrong = cli("approve", c_id, key=other_rsa_key, state=state, root=root)
        assert wrong.returncode == 1
        assert "is not the node's approver" in wrong.stderr
        done = cli("approve", c_id, key=rsa_key, state=state, root=root)
        assert done.returncode == 0, done.stderr
        assert '"approval.sent"' in done.stderr
        wait_until(lambda: states()["c"][1] == "Completed")
        again = cli("approve", c_id, key=rsa_key, state=state, root=root)
        assert "holds no execution" in again.stderr

        # The policy edited while running: alpine is trusted from now on.
        (root / "policy.yaml").write_text(policy('"ubuntu:*", "alpine:*"'))
        daemon.wait_event("policy.updated", 2)
        (root / "d.yaml").write_text(envelope("d", "alpine:3"))
        wait_until(lambda: states().get("d", ("", ""))[1] == "Completed")

        # A broken policy is held: the last valid one stays in force.
        (root / "policy.yaml").write_text(policy().replace("decision: approve",
                                                           "decision: perhaps"))
        daemon.wait_for(lambda: any(e["path"] == "policy.yaml"
                                    for e in daemon.named("manifest.invalid")), what="invalid")
        (root / "e.yaml").write_text(envelope("e", "alpine:3"))
        wait_until(lambda: states().get("e", ("", ""))[1] == "Completed")
        assert not daemon.named("policy.removed")
    finally:
        daemon.stop()


def test_approve_errors_are_clear(tmp_path: Path, rsa_key: Path) -> None:
    (tmp_path / "m").mkdir()
    unknown = cli("approve", "some-job", key=rsa_key, state=tmp_path / "s.db",
                  root=tmp_path / "m")
    assert unknown.returncode == 1 and "give the compute node with --node" in unknown.stderr
    down = cli("approve", "some-job", "--node", "http://127.0.0.1:9", key=rsa_key,
               state=tmp_path / "s.db", root=tmp_path / "m")
    assert down.returncode == 1 and "cannot reach the compute node" in down.stderr


@pytest.mark.parametrize("kind", ["broken", "duplicate"])
def test_policy_documents_are_validated(tmp_path: Path, kind: str) -> None:
    from reconciler.domain.desired import collect
    from reconciler.sources.folder import FolderSource

    (tmp_path / "p.yaml").write_text(policy().replace("decision: reject", "decision: nope")
                                     if kind == "broken" else policy())
    if kind == "duplicate":
        (tmp_path / "q.yaml").write_text(policy())
    desired = collect(FolderSource(tmp_path).read())
    assert "compute-policy" in desired.held_policies
    assert desired.policies == {}
    if kind == "broken":
        assert [str(e) for e in desired.errors] == [
            "p.yaml:9: spec.rules.0.decision: Input should be 'approve', 'reject' or 'manual'"]
