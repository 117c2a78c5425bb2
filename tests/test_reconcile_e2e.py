"""The plan rules end to end: real files, real SQLite, the real CLI, a real requester.

Every case asserts on the requester's own job list, not only on our store. The rules that need
only the engine's logic run in-process against fakes in ``test_engine.py``; the cases here prove
the real pieces fit and check what only the CLI does (exit codes, output, running as another
user, secrets in every output).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from reconciler.app.cli import main
from tests.conftest import DevProcess
from tests.harness import Harness, envelope


@pytest.fixture
def h(tmp_path: Path, dev: DevProcess, rsa_key: Path) -> Harness:
    return Harness(tmp_path, dev, rsa_key)


def test_add_then_nothing_then_change_then_remove(h: Harness) -> None:
    h.write("a.yaml", envelope("a"))
    h.apply()
    [job] = h.jobs("a")
    assert job["State"]["State"] == "New"
    assert h.records()["a"].job_id == job["Job"]["Metadata"]["ID"]

    h.apply()  # unchanged: nothing happens
    assert len(h.jobs("a")) == 1

    h.write("a.yaml", envelope("a", image="ubuntu:24.04"))
    h.apply()
    assert h.states("a") == ["Cancelled", "New"]
    live = next(j for j in h.jobs("a") if j["State"]["State"] == "New")
    assert live["Job"]["Spec"]["Docker"]["Image"] == "ubuntu:24.04"
    assert h.records()["a"].job_id == live["Job"]["Metadata"]["ID"]

    h.write("b.yaml", envelope("b"))  # keep the folder non-empty
    (h.root / "a.yaml").unlink()
    h.apply()
    assert h.states("a") == ["Cancelled", "Cancelled"]
    assert "a" not in h.records()


@pytest.mark.parametrize("make", ["missing"])  # all three in-process: test_engine.py
def test_unusable_folder_is_not_ready_and_cancels_nothing(h: Harness, make: str) -> None:
    h.write("a.yaml", envelope("a"))
    h.apply()
    (h.root / "a.yaml").unlink()
    if make == "missing":
        h.root.rmdir()
    elif make == "file-instead":
        h.root.rmdir()
        h.root.write_text("not a folder")
    result = h.apply(expect=1)  # README, "Exit codes"
    assert h.states("a") == ["New"]
    assert "not ready" in result.stdout
    assert any(e["event"] == "source.not_ready" for e in h.events(result))


@pytest.fixture
def unprivileged(tmp_path: Path, dev: DevProcess, rsa_key: Path) -> Iterator[Harness]:
    """A harness whose commands run as ``nobody`` when the tests run as root: root reads any
    file whatever its mode, so an unreadable manifest can only be staged for another user."""
    if os.geteuid() != 0:
        yield Harness(tmp_path, dev, rsa_key)
        return
    user = pwd.getpwnam("nobody")
    prefix = ("setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups")
    if shutil.which("setpriv") is None or subprocess.run(
            [*prefix, sys.executable, "-c", "import reconciler"], capture_output=True).returncode:
        pytest.skip("cannot run this checkout's Python as nobody")
    home = Path(tempfile.mkdtemp(prefix="reconciler-unprivileged-"))
    key = home / "key.pem"
    shutil.copy(rsa_key, key)
    for path in (home, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield Harness(home, dev, key, prefix=prefix)
    finally:
        shutil.rmtree(home)


def test_permission_denied_holds(unprivileged: Harness) -> None:
    h = unprivileged
    h.write("a.yaml", envelope("a"))
    h.write("b.yaml", envelope("b", "alpine:3"))
    h.apply()
    (h.root / "a.yaml").chmod(0)
    (h.root / "b.yaml").chmod(0o644)
    h.write("b.yaml", envelope("b", "alpine:3.20"))
    result = h.apply(expect=1)
    assert "a.yaml:1: file: cannot read (Permission denied)" in result.stdout, result.stdout
    assert result.stdout.splitlines()[-1].startswith("degraded; 1 manifests; 1 held")
    events = h.events(result)
    assert [e["name"] for e in events if e.get("event") == "manifest.hold"] == ["a"]
    [invalid] = [e for e in events if e.get("event") == "manifest.invalid"]
    assert invalid["path"] == "a.yaml" and "ermission denied" in invalid["reason"], invalid
    assert h.states("a") == ["New"]  # unreadable: held, not cancelled
    assert sorted(h.states("b")) == ["Cancelled", "New"]  # the other file still reconciles


def test_mass_removal_is_blocked_then_allowed_once(h: Harness) -> None:
    for name in "abcdef":
        h.write(f"{name}.yaml", envelope(name))
    h.apply()
    for name in "abcde":
        (h.root / f"{name}.yaml").unlink()
    result = h.apply(expect=3)
    assert "prune.blocked" in result.stdout
    assert all(h.states(n) == ["New"] for n in "abcde")
    plan = h.cli("plan")
    assert plan.returncode == 3  # a guard blocks (README, "Exit codes")
    assert "x blocked" in plan.stdout
    h.apply("--allow-mass-cancel")
    assert all(h.states(n) == ["Cancelled"] for n in "abcde")
    assert h.states("f") == ["New"]
    h.apply()  # allowed once: nothing left to block
    assert set(h.records()) == {"f"}


def test_secrets_never_appear_in_any_output(h: Harness) -> None:
    secret = "hunter2-very-secret"
    h.write("a.yaml", envelope("a", env=(f"PASSWORD={secret}",)))
    h.write("s3.yaml", f"""apiVersion: reconciler/v1
kind: Job
metadata: {{name: s3}}
spec:
  engine: noop
  publisher: noop
  inputs:
    - storageSource: s3
      s3: {{bucket: b, key: k, endpoint: "https://user:{secret}@s3.example.com"}}
      path: /in
    - storageSource: urldownload
      url: "https://admin:{secret}@data.example.com/x"
      path: /x
""")
    h.write("broken.yaml", envelope("broken", env=(f"TOKEN={secret}",)).replace(
        "image: ubuntu:22.04", f"image: {{{secret}: 1}}"))
    outputs = [h.apply(expect=1), h.cli("plan", "--json"), h.cli("plan"), h.cli("status"),
               h.cli("status", "--json"), h.cli("validate")]
    (h.root / "a.yaml").unlink()
    outputs.append(h.apply(expect=1))
    for result in outputs:
        assert secret not in result.stdout + result.stderr
    # The requester itself got the values (they are the job's), of course.
    assert any(secret in str(j["Job"]["Spec"]) for j in h.jobs("s3"))


@pytest.mark.parametrize("profile", ["1.0", "1.6", "1.9"])
def test_add_change_remove_on_every_profile(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path, profile: str
) -> None:
    """Issue 14: the same folder history against Bacalhau 1.0 (legacy), 1.6 (orchestrator, by
    label) and 1.9 (by name) under --api auto: 0 duplicates, 0 lost, removals stopped; and
    `status` shows each job's version and state message as the next poll recorded them."""
    from tests.reliability.common import audit

    dev = dev_factory("--job-duration", "600", "--bacalhau-version", profile)
    h = Harness(tmp_path, dev, rsa_key)
    wanted = {"a": "img:1", "b": "img:2", "c": "img:3"}
    for name, image in wanted.items():
        h.write(f"{name}.yaml", envelope(name, image=image))
    h.apply("--api", "auto")
    first = h.records()["a"].job_id
    wanted["a"] = "img:4"
    h.write("a.yaml", envelope("a", image="img:4"))
    (h.root / "c.yaml").unlink()
    del wanted["c"]
    h.apply()
    result = audit(dev.jobs(), wanted)
    assert result.clean, result.problems
    assert set(h.records()) == {"a", "b"}
    # The update's PUT reply has no version; name mode knows it from the lookup before it.
    assert h.records()["a"].job_version == (2 if profile == "1.9" else None)
    if profile == "1.0":
        return  # the legacy API has no job version; its messages: tests/test_observe.py
    # Someone stops b by hand with a reason (the JSON body: docs/wire-orchestrator.md 3.4);
    # the next apply polls first (observe), then finds nothing to do.
    url = f"{dev.url}/api/v1/orchestrator/jobs/{h.records()['b'].job_id}"
    stopped = httpx.request("DELETE", url, json={"reason": "stopped by hand: maintenance"},
                            timeout=10)
    assert stopped.status_code == 200, stopped.text
    h.apply()

    def status(*args: str) -> str:  # in process: an interpreter start costs seconds here
        shown = CliRunner().invoke(main, ["status", *args, "--manifests", str(h.root),
                                          "--state", str(h.state), "--endpoint", dev.url])
        assert shown.exit_code == 0, shown.output
        return shown.stdout

    rows = {row["name"]: row for row in json.loads(status("--json"))["jobs"]}
    # 1.9 updated the job in place (same id, version 2); 1.6 stopped it and made a new job.
    assert (rows["a"]["job_id"] == first, rows["a"]["job_version"]) == {
        "1.6": (False, 1), "1.9": (True, 2)}[profile]
    assert rows["a"]["job_state"] in ("Pending", "Running")
    assert (rows["b"]["job_state"], rows["b"]["job_message"]) == (
        "Stopped", "stopped by hand: maintenance")
    table = status()
    assert "Stopped v1" in table and "stopped by hand: maintenance" in table
