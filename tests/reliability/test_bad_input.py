"""Scenario 5: bad input at scale. Generated and mutated manifests, YAML bombs, deep nesting,
huge strings, binary and non-UTF-8 files, symlink loops, files that vanish mid-read, colliding
names: no crash, one single-line error each, no cancel of any held job, bounded memory."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.domain.manifest import FileResult, load_file
from reconciler.sources.folder import FolderSource
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, daemon_args
from tests.reliability.common import figures, manifest, rss_kib, seeded, size
from tests.test_daemon import by_name, wait_until

VALID = manifest("base", "ubuntu:22.04", "onFailure: resubmit, maxRetries: 2") + \
    "  resources: {cpu: 500m, memory: 1Gb}\n  annotations: [a, b]\n"


def check(result: FileResult) -> None:
    assert result.manifests or result.errors or result.policies
    for error in result.errors:
        assert "\n" not in str(error) and str(error).startswith(error.path + ":")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() |
                           st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=30)


@pytest.mark.usefixtures("scale")
@settings(max_examples=size(150, 5000), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode),
                 json_values.map(lambda v: json.dumps(v).encode())),
       st.sampled_from(["x.yaml", "x.json"]))
def test_generated_input_never_crashes(data: bytes, name: str) -> None:
    check(load_file(name, data))


@pytest.mark.usefixtures("scale")
@settings(max_examples=size(100, 5000), deadline=None)
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec", "policy",
                                       "APIVersion", "Spec", "other"]), json_values, max_size=6))
def test_generated_documents_never_crash(document: dict[str, object]) -> None:
    if "apiVersion" in document and random.random() < 0.5:
        document["apiVersion"] = "reconciler/v1"
    check(load_file("doc.yaml", json.dumps(document).encode()))


def mutate(rng: random.Random, text: str) -> bytes:
    data = bytearray(text.encode())
    kind = rng.randrange(9)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randrange(len(data)):]
    elif kind == 2:  # drop a line
        lines = text.splitlines(keepends=True)
        del lines[rng.randrange(len(lines))]
        data = bytearray("".join(lines).encode())
    elif kind == 3:  # wrong types
        data = bytearray(text.replace("ubuntu:22.04", rng.choice(["[1, 2]", "{a: b}", "12",
                                                                  "null", "true"])).encode())
    elif kind == 4:  # alias bomb
        data = bytearray(b"a: &a [" + b",".join([b"x"] * 9) + b"]\n" + b"".join(
            f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n".encode()
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + data)
    elif kind == 5:  # deep nesting
        depth = rng.choice([50, 500, 5000])
        data = bytearray(b"spec: " + b"[" * depth + b"]" * depth + b"\n")
    elif kind == 6:  # a huge string
        data = bytearray(text.replace("ubuntu:22.04", "x" * rng.choice([10**4, 10**6])).encode())
    elif kind == 7:  # not UTF-8
        data = bytearray(text.encode("utf-16"))
    else:  # indentation damage
        data = bytearray(text.replace("  ", " " * rng.randint(0, 3)).encode())
    return bytes(data)


@pytest.mark.usefixtures("scale")
def test_mutated_manifests_never_crash() -> None:
    rng = seeded("bad-input-mutations")
    cases = size(500, 10000)
    tracemalloc.start()
    errors = valid = 0
    started = time.monotonic()
    for _ in range(cases):
        result = load_file(rng.choice(["m.yaml", "m.yml", "m.json"]), mutate(rng, VALID))
        check(result)
        errors += len(result.errors)
        valid += len(result.manifests)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    figures("bad-input-mutations", cases=cases, errors=errors, still_valid=valid,
            peak_traced_mib=round(peak / 2**20, 1), seconds=round(time.monotonic() - started, 1))
    assert peak < 200 * 2**20


@pytest.mark.usefixtures("scale")
def test_files_vanishing_mid_read_never_drop_stable_files(tmp_path: Path) -> None:
    stable = {f"stable-{i}.yaml" for i in range(30)}
    for name in stable:
        (tmp_path / name).write_text(manifest(name[:-5], "img"))
    stop = threading.Event()

    def churn() -> None:
        index = 0
        while not stop.is_set():
            path = tmp_path / f"churn-{index % 20}.yaml"
            path.write_text(manifest(f"churn-{index % 20}", "img"))
            path.unlink()
            (tmp_path / "sub").mkdir(exist_ok=True)
            (tmp_path / "sub" / "x.yaml").write_text("a: 1")
            (tmp_path / "sub" / "x.yaml").unlink()
            (tmp_path / "sub").rmdir()
            index += 1

    thread = threading.Thread(target=churn)
    thread.start()
    source = FolderSource(tmp_path)
    reads = 0
    try:
        deadline = time.monotonic() + size(1, 10)
        while time.monotonic() < deadline:
            snapshot = source.read()
            reads += 1
            if snapshot.ready:  # a read that kept moving says so; it never drops files
                assert stable <= set(snapshot.files)
    finally:
        stop.set()
        thread.join()
    figures("bad-input-vanishing", reads=reads, partial_listings=0)


def replace_with_self_link(path: Path) -> None:
    path.unlink()
    os.symlink(path.name, path)


def replace_with_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


def test_a_folder_of_bad_files_holds_every_job(tmp_path: Path, dev: DevProcess,
                                               rsa_key: Path) -> None:
    rng = seeded("bad-input-folder")
    root = tmp_path / "manifests"
    root.mkdir()
    names = [f"b-{i:02d}" for i in range(16)]
    for name in names:
        (root / f"{name}.yaml").write_text(manifest(name, f"img:{name}"))
    daemon = DaemonProcess(daemon_args(root, tmp_path / "state.db", dev.url, rsa_key))
    try:
        wait_until(lambda: len(by_name(dev)) == 16)
        nasty: list[Callable[[Path], object]] = [
            lambda p: p.write_bytes(os.urandom(4096)),
            lambda p: p.write_bytes(b"\xff\xfe\x00bad"),
            lambda p: p.write_bytes(mutate(rng, VALID).replace(b"base", p.stem.encode())[:40]),
            lambda p: p.write_text("a: &a [1,1,1,1,1,1,1,1,1]\n" + "".join(
                f"{c}: &{c} [{','.join(['*' + q] * 9)}]\n"
                for q, c in zip("abcdefgh", "bcdefghi", strict=True))),
            lambda p: p.write_text("[" * 100000),
            lambda p: p.write_text(manifest(p.stem, "x" * (2 * 2**20))),
            replace_with_self_link,
            replace_with_folder,
            lambda p: p.write_text(manifest(p.stem, "img").replace("engine: docker",
                                                                   "engine: 3")),
        ]
        for name, damage in zip(names, nasty, strict=False):
            damage(root / f"{name}.yaml")
        (root / "dup.yaml").write_text(manifest("b-10", "other"))  # a name claimed twice
        (root / "claims.yaml").write_text(manifest("b-00", "other"))  # a broken file's name
        broken = len(nasty) + 2  # + dup.yaml and b-10.yaml (both claims of b-10)
        daemon.wait_for(lambda: len({e["path"] for e in daemon.named("manifest.invalid")})
                        >= broken - 1, 60, "every broken file reported")
        daemon.wait_quiet_after("manifest.invalid")  # nothing left settling or to change
        rss = rss_kib(daemon.process.pid)
    finally:
        daemon.stop()
    invalid = daemon.named("manifest.invalid")
    paths = [e["path"] for e in invalid]
    cancelled = [n for n, states in by_name(dev).items() if "Cancelled" in states]
    figures("bad-input-folder", broken_files=broken, invalid_events=len(invalid),
            wrongful_cancels=len(cancelled), rss_mib=round(rss / 1024, 1))
    assert cancelled == [], cancelled
    holds = {e["name"]: e["reason"] for e in daemon.named("manifest.hold")}
    assert "may still define this name" in holds["b-00"]
    assert all(states == ["New"] for states in by_name(dev).values())
    assert sorted(set(paths)) == sorted(paths)  # one event per broken file, not one per pass
    assert daemon.named("pass.completed")[-1]["state"] == "degraded"
    assert rss < 300 * 1024
