"""Scenario 7: security. Tampered and replayed envelopes are refused; loose key files are
refused; secrets planted in env vars, S3 fields and URLs never reach logs, status, plan output,
errors or metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from reconciler.backends.signing import load_signer, signed_body, write_new_key
from reconciler.devnet.envelope import raw_members
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import figures
from tests.test_daemon import by_name, wait_until

SECRET = "s3cr3t-planted-value-7f3a"


def submit_body(key: Path) -> bytes:
    signer = load_signer(key)
    payload = {"APIVersion": "V1beta1", "ClientID": signer.client_id,
               "Spec": {"Engine": "Noop", "PublisherSpec": {"Type": "Noop"},
                        "Deal": {"Concurrency": 1}}}
    return signed_body(signer, payload)


def test_tampered_and_replayed_envelopes_are_refused(dev: DevProcess, rsa_key: Path,
                                                     other_rsa_key: Path) -> None:
    url = dev.url + "/api/v1/requester/submit"
    body = submit_body(rsa_key)
    tampered = body.replace(b'"Noop"', b'"Docker"', 1)
    members = raw_members(body)
    other = load_signer(other_rsa_key)
    replayed = body.replace(members["client_public_key"], json.dumps(other.public_key_b64)
                            .encode())
    replayed_as_other = replayed.replace(load_signer(rsa_key).client_id.encode(),
                                         other.client_id.encode())
    statuses = {name: httpx.post(url, content=b).status_code
                for name, b in [("tampered", tampered), ("replayed-with-other-key", replayed),
                                ("replayed-as-other-client", replayed_as_other)]}
    assert set(statuses.values()) == {400}, statuses
    assert dev.jobs() == []
    assert httpx.post(url, content=body).status_code == 200  # the genuine one passes
    figures("security-envelopes", refused=len(statuses), accepted_genuine=1)


def test_loose_key_file_is_refused(tmp_path: Path, dev: DevProcess) -> None:
    key = tmp_path / "key.pem"
    write_new_key(key, "rsa")
    os.chmod(key, 0o644)
    (tmp_path / "m").mkdir()
    daemon = DaemonProcess(daemon_args(tmp_path / "m", tmp_path / "s.db", dev.url, key))
    assert daemon.wait(timeout=20) == 1
    assert "readable or writable by others (mode 0644)" in "".join(daemon.raw)


def test_planted_secrets_never_leak(tmp_path: Path, dev: DevProcess, rsa_key: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    (root / "env.yaml").write_text(f"""apiVersion: reconciler/v1
kind: Job
metadata: {{name: env}}
spec:
  engine: docker
  publisher: s3
  publisherSpec: {{type: s3, params: {{Bucket: out, SecretAccessKey: {SECRET}}}}}
  docker:
    image: ubuntu
    environmentVariables: [AWS_SECRET_ACCESS_KEY={SECRET}, TOKEN={SECRET}]
  inputs:
    - storageSource: s3
      s3: {{bucket: b, key: k, endpoint: "https://id:{SECRET}@s3.example.com"}}
      path: /in
    - storageSource: urldownload
      url: "https://user:{SECRET}@files.example.com/data.csv"
      path: /data
""")
    (root / "broken.yaml").write_text(f"""apiVersion: reconciler/v1
kind: Job
metadata: {{name: broken}}
spec:
  engine: docker
  publisher: ipfs
  docker: {{image: {{{SECRET}: 1}}, environmentVariables: [X={SECRET}]}}
""")
    daemon = DaemonProcess(daemon_args(root, tmp_path / "s.db", dev.url, rsa_key,
                                       "--metrics-listen", "127.0.0.1:0"))
    try:
        metrics = "http://" + daemon.wait_event("metrics.listening")[0]["listen"] + "/metrics"
        wait_until(lambda: by_name(dev).get("env") == ["New"])
        daemon.wait_event("manifest.invalid")
        outputs = {"metrics": httpx.get(metrics).text}
        base = [sys.executable, "-m", "reconciler"]
        common = ["--manifests", str(root), "--state", str(tmp_path / "s.db"), "--key",
                  str(rsa_key), "--endpoint", dev.url]
        for name, args in {"plan": ["plan", *common], "plan-json": ["plan", "--json", *common],
                           "status": ["status", *common], "validate": ["validate", str(root)],
                           "status-json": ["status", "--json", *common]}.items():
            done = subprocess.run([*base, *args], capture_output=True, text=True)
            outputs[name] = done.stdout + done.stderr
        (root / "env.yaml").unlink()  # a cancel, with its events
        wait_until(lambda: by_name(dev).get("env") == ["Cancelled"])
    finally:
        daemon.stop()
    outputs["daemon-log"] = "".join(daemon.raw)
    leaks = [name for name, text in outputs.items() if SECRET in text]
    figures("security-secrets", outputs_checked=len(outputs), leaks=len(leaks))
    assert leaks == []
    assert SECRET in json.dumps(dev.jobs())  # the requester did get the job's own values
