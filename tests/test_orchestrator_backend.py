"""The orchestrator backend (issue 14) against the dev requester's 1.6 and 1.9 profiles.

End to end through the real CLI (in process, against a dev requester on a loopback port):
one job per manifest named after it, updates in place, no PUT when nothing changed, removal
stops, label mode on 1.6, 1.0 still legacy under ``--api auto``, bad inputs refused with
nothing cancelled, auth. In process against the backend: the 409 race, "no changes", a
foreign job of the same name, an ambiguous PUT, paging, version detection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
import pytest
from click.testing import CliRunner, Result

from reconciler.app import wiring
from reconciler.app.cli import main
from reconciler.backends.errors import (
    CredentialsRejected,
    InvalidRequest,
    OutcomeUnknown,
    ServerError,
)
from reconciler.backends.orchestrator import (
    Conflict,
    Credentials,
    OrchestratorBackend,
    OrchestratorClient,
    detect_version,
    mode_of,
)
from reconciler.devnet import DevConfig, DevRequesterThread
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import Action, PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.settings import SettingsError, api_credentials, load_settings
from reconciler.sources.folder import FolderSource
from reconciler.store.sqlite import Store
from tests.fakes import FakeStore

KEY = "k" * 24
JOBS = "/api/v1/orchestrator/jobs"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[Any, ...], DevRequesterThread]]:
    running: dict[tuple[Any, ...], DevRequesterThread] = {}
    yield running
    with ThreadPoolExecutor() as pool:
        list(pool.map(DevRequesterThread.stop, running.values()))


class Dev:
    def __init__(self, thread: DevRequesterThread) -> None:
        self.thread = thread
        self.url = thread.url

    def jobs(self) -> list[dict[str, Any]]:
        return list(httpx.get(self.url + "/devnet/jobs", timeout=5).json()["jobs"])

    def stats(self) -> dict[str, int]:
        return dict(httpx.get(self.url + "/devnet/stats", timeout=5).json())


@pytest.fixture
def dev(servers: dict[tuple[Any, ...], DevRequesterThread]) -> Any:
    def start(version: str = "1.9", **config: Any) -> Dev:
        config.setdefault("job_duration", 30.0)
        key = (version, *sorted(config.items()))
        thread = servers.get(key)
        if thread is None:
            thread = servers[key] = DevRequesterThread(
                DevConfig(bacalhau_version=version, **config)).start()
        if thread.app.orchestrator is not None:
            thread.app.orchestrator.reset()
            thread.app.stats.clear()
        return Dev(thread)

    return start


def envelope(name: str, image: str = "ubuntu:22.04", publisher: str = "ipfs") -> str:
    return (f"apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: {name}\nspec:\n"
            f"  engine: docker\n  publisher: {publisher}\n  docker:\n    image: {image}\n")


def job_manifest(name: str, image: str = "ubuntu:24.04") -> str:
    return (f"apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: {name}\njob:\n"
            "  Type: service\n  Tasks:\n    - Name: main\n      Engine:\n        Type: docker\n"
            f"        Params:\n          Image: {image}\n")


class Folder:
    def __init__(self, tmp: Path, url: str, key: Path | None = None) -> None:
        self.root = tmp / "manifests"
        self.root.mkdir(exist_ok=True)
        self.state = tmp / "state.db"
        self.url = url
        self.key = key

    def write(self, name: str, text: str) -> None:
        (self.root / name).write_text(text)

    def apply(self, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> Result:
        command = ["--log-format", "json", "apply", "--manifests", str(self.root),
                   "--state", str(self.state), "--endpoint", self.url, *args]
        if self.key is not None:
            command += ["--key", str(self.key)]
        result = CliRunner().invoke(main, command, env={"RECONCILER_RESOLVE_DELAY": "0.05",
                                                        **(env or {})})
        assert result.exit_code == expect, result.output
        return result


def by_name(dev: Dev) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for job in dev.jobs():
        found.setdefault(job["Name"], []).append(job)
    return found


B = TypeVar("B", bound=OrchestratorBackend)


@dataclass
class InProcess(Generic[B]):
    """The real reconciler and executor in this process over an in-memory store, against a
    dev requester on a real port: for tests that script a backend's failures."""

    root: Path
    store: FakeStore
    backend: B
    reconciler: Reconciler
    executor: Executor

    def synced_then_changed(self, loop: asyncio.Runner, server: Dev) -> dict[str, Any]:
        """alpha and beta synced (beta keeps the folder from emptying), then alpha's image
        changed on disk; alpha's job as the server has it."""
        (self.root / "a.yaml").write_text(envelope("alpha"))
        (self.root / "b.yaml").write_text(envelope("beta"))
        loop.run(self.reconciler.run_pass(self.executor))
        [job] = by_name(server)["alpha"]
        (self.root / "a.yaml").write_text(envelope("alpha", image="ubuntu:24.04"))
        return job

    def removed_and_stopped(self, loop: asyncio.Runner, server: Dev,
                            job: dict[str, Any]) -> None:
        """alpha's file removed: its record goes and ``job`` (still its only job) stops."""
        (self.root / "a.yaml").unlink()
        loop.run(self.reconciler.run_pass(self.executor))
        assert "alpha" not in self.store.rows
        [stopped] = by_name(server)["alpha"]
        assert (stopped["ID"], stopped["State"]["StateType"]) == (job["ID"], "Stopped")
        loop.run(self.backend.client.aclose())


def in_process(tmp_path: Path, server: Dev, backend_type: type[B]) -> InProcess[B]:
    root = tmp_path / "manifests"
    root.mkdir()
    store = FakeStore()
    backend = backend_type(OrchestratorClient(server.url), mode="name", version="v1.9.3")
    return InProcess(root, store, backend,
                     Reconciler(FolderSource(root), store.as_store(), PlanPolicy()),
                     Executor(store.as_store(), backend, PlanPolicy(), resolve_delay=0))


def forget_name_index(server: Dev) -> None:
    """What a job made before v1.8 looks like to the server (as after an upgrade from label
    mode): its name index does not know it (docs/wire-orchestrator.md 4.4)."""
    orchestrator = server.thread.app.orchestrator
    assert orchestrator is not None
    orchestrator.store._index.clear()


# --- end to end through the CLI ----------------------------------------------------------------


def test_name_mode_one_job_per_manifest_updated_in_place(tmp_path: Path, dev: Any) -> None:
    server = dev("1.9")
    folder = Folder(tmp_path, server.url)  # no --key: the orchestrator needs none
    folder.write("a.yaml", envelope("alpha"))
    folder.write("b.yaml", envelope("beta"))
    folder.apply("--api", "auto")
    jobs = by_name(server)
    assert sorted(jobs) == ["alpha", "beta"]
    [alpha] = jobs["alpha"]
    assert alpha["Version"] == 1
    assert alpha["Labels"]["managed-by"] == "reconciler"

    folder.write("a.yaml", envelope("alpha", image="ubuntu:24.04"))
    folder.apply()
    [updated] = by_name(server)["alpha"]
    assert (updated["ID"], updated["Version"]) == (alpha["ID"], 2)
    assert updated["Tasks"][0]["Engine"]["Params"]["Image"] == "ubuntu:24.04"
    assert server.stats()["PUT /orchestrator/jobs"] == 3
    assert "DELETE /orchestrator/jobs/{id}" not in server.stats()  # no cancel first

    folder.apply()  # unchanged: no PUT
    assert server.stats()["PUT /orchestrator/jobs"] == 3

    (folder.root / "a.yaml").unlink()
    folder.apply()
    [stopped] = by_name(server)["alpha"]
    assert stopped["State"] == {"StateType": "Stopped", "Message": "manifest removed"}

    folder.write("a.yaml", envelope("alpha", image="ubuntu:24.04"))  # re-added unchanged
    folder.apply()
    [again] = by_name(server)["alpha"]
    assert (again["ID"], again["Version"]) == (alpha["ID"], 3)
    assert again["State"]["StateType"] in ("Pending", "Running")


def test_an_update_that_creates_a_second_job_stops_the_first(tmp_path: Path, dev: Any) -> None:
    """A job made before v1.8 (here: the dev requester's name index forgets it, as after an
    upgrade from label mode) is not found by name, so the update in place creates a job of the
    same name: the old one must be stopped, or both run (docs/wire-orchestrator.md 4.4)."""
    server = dev("1.9")
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    folder.apply("--api", "orchestrator")
    [old] = by_name(server)["alpha"]
    forget_name_index(server)

    folder.write("a.yaml", envelope("alpha", image="ubuntu:24.04"))
    result = folder.apply()
    jobs = {job["ID"]: job for job in by_name(server)["alpha"]}
    assert len(jobs) == 2 and old["ID"] in jobs
    assert jobs.pop(old["ID"])["State"]["StateType"] == "Stopped"
    [(new_id, new)] = jobs.items()
    assert new["State"]["StateType"] in ("Pending", "Running")
    assert "superseded by job " + new_id in result.output
    status = CliRunner().invoke(main, ["status", "--json", "--manifests", str(folder.root),
                                       "--state", str(folder.state), "--endpoint", server.url])
    [row] = json.loads(status.stdout)["jobs"]
    assert row["job_id"] == new_id


def test_label_mode_on_1_6_stops_then_submits(tmp_path: Path, dev: Any) -> None:
    server = dev("1.6")
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    folder.apply()
    [first] = by_name(server)["alpha"]
    assert first["Labels"]["reconciler-uid"]
    folder.write("a.yaml", envelope("alpha", image="ubuntu:24.04"))
    folder.apply()
    states = sorted(j["State"]["StateType"] for j in by_name(server)["alpha"])
    assert states in (["Pending", "Stopped"], ["Running", "Stopped"])
    folder.apply()
    assert len(by_name(server)["alpha"]) == 2


def test_1_0_is_still_legacy_under_auto(tmp_path: Path, dev: Any, rsa_key: Path) -> None:
    server = dev("1.0")
    folder = Folder(tmp_path, server.url, rsa_key)
    folder.write("a.yaml", envelope("alpha"))
    folder.apply("--api", "auto")
    reply = httpx.post(server.url + "/devnet/jobs", json={"return_all": True, "max_jobs": 0},
                       timeout=5).json()
    [job] = reply["jobs"]
    assert "reconciler-manifest:alpha" in job["Job"]["Spec"]["Annotations"]


def test_orchestrator_only_manifest_on_legacy_is_refused(tmp_path: Path, dev: Any,
                                                          rsa_key: Path) -> None:
    server = dev("1.0")
    folder = Folder(tmp_path, server.url, rsa_key)
    folder.write("svc.yaml", job_manifest("svc"))
    folder.write("b.yaml", envelope("beta"))
    result = folder.apply(expect=1)
    assert "svc.yaml:1: Type: service jobs have no V1beta1 counterpart" in result.output
    reply = httpx.post(server.url + "/devnet/jobs", json={"return_all": True, "max_jobs": 0},
                       timeout=5).json()
    names = [a for j in reply["jobs"] for a in j["Job"]["Spec"]["Annotations"]
             if a.startswith("reconciler-manifest:")]
    assert "reconciler-manifest:beta" in names  # the others went ahead
    assert "reconciler-manifest:svc" not in names


@pytest.mark.parametrize("version", ["1.6", "1.9"])
def test_untranslatable_change_cancels_nothing(tmp_path: Path, dev: Any, version: str) -> None:
    server = dev(version)
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    folder.apply()
    [alpha] = by_name(server)["alpha"]
    folder.write("a.yaml", envelope("alpha", publisher="estuary"))
    result = folder.apply(expect=1)
    assert "a.yaml:1: spec.PublisherSpec.Type: Estuary has no orchestrator counterpart" \
        in result.output
    [kept] = by_name(server)["alpha"]
    assert (kept["ID"], kept["Version"], kept["State"]["StateType"]) == (
        alpha["ID"], 1, "Running")
    assert "DELETE /orchestrator/jobs/{id}" not in server.stats()
    folder.write("new.yaml", envelope("gamma", publisher="estuary"))
    result = folder.apply(expect=1)
    assert "new.yaml:1: spec.PublisherSpec.Type" in result.output
    assert "gamma" not in by_name(server)


def test_api_key_and_a_401(tmp_path: Path, dev: Any) -> None:
    server = dev("1.9", api_key=KEY)
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    wrong = "w" * 24
    result = folder.apply(expect=1, env={"BACALHAU_API_KEY": wrong})
    assert "HTTP 401" in result.output and "configuration error" in result.output
    assert wrong not in result.output
    assert by_name(server) == {}
    folder.apply(env={"BACALHAU_API_KEY": KEY})
    assert list(by_name(server)) == ["alpha"]


def test_approve_against_an_orchestrator_says_there_is_none(tmp_path: Path, dev: Any) -> None:
    server = dev("1.9")
    result = CliRunner().invoke(main, ["approve", "j-1", "--endpoint", server.url,
                                       "--state", str(tmp_path / "s.db")])
    assert result.exit_code == 1
    assert "no job approval" in result.output


# --- in process ---------------------------------------------------------------------------


def manifest(text: str, path: str = "a.yaml") -> Any:
    [one] = load_file(path, text.encode()).manifests
    return one


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _backend(url: str, mode: str = "name", **client: Any) -> OrchestratorBackend:
    return OrchestratorBackend(OrchestratorClient(url, **client), mode=mode,  # type: ignore[arg-type]
                               version="v1.9.3")


def test_versions_and_modes(dev: Any) -> None:
    assert [mode_of(v) for v in (None, "v1.4.0", "v1.5.2", "v1.7.0", "v1.8.0", "v1.9.3",
                                 "v0.0.0-dev", "garbage")] == [
        "legacy", "legacy", "label", "label", "name", "name", "name", "legacy"]
    assert run(detect_version(dev("1.0").url)) is None
    assert run(detect_version(dev("1.6").url)).startswith("v1.6")
    assert mode_of(run(detect_version(dev("1.9", git_version="v0.0.0-abc").url))) == "name"


def test_credentials_never_mixed_nor_shown(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.setenv("BACALHAU_API_KEY", KEY)
    monkeypatch.setenv("BACALHAU_API_USERNAME", "ops")
    with pytest.raises(SettingsError, match="both set") as error:
        api_credentials(load_settings(None))
    assert KEY not in str(error.value)
    monkeypatch.delenv("BACALHAU_API_USERNAME")
    (tmp_path / "api-key").write_text("c" * 24 + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert api_credentials(load_settings(None))[0] == "c" * 24  # systemd's before the env
    assert "c" * 24 not in repr(wiring.credentials(load_settings(None)))
    assert Credentials(username="u", password="p").header() == "Basic dTpw"


def test_foreign_job_of_the_name_is_never_touched(dev: Any) -> None:
    server = dev("1.9")
    foreign = {"Name": "alpha", "Type": "batch", "Tasks": [
        {"Name": "main", "Engine": {"Type": "docker", "Params": {"Image": "x"}}}]}
    httpx.put(server.url + JOBS, json={"Job": foreign}, timeout=5).raise_for_status()

    async def go() -> None:
        backend = await _backend(server.url)
        with pytest.raises(Conflict, match="not ours"):
            await backend.submit(manifest(envelope("alpha")), "u1")
        await backend.client.aclose()

    run(go())
    [job] = by_name(server)["alpha"]
    assert job["Version"] == 1 and "managed-by" not in (job.get("Labels") or {})


def test_no_changes_is_up_to_date_and_409_looks_again(dev: Any) -> None:
    server = dev("1.9", latency=0.2)  # between the name lookup and the write: a race

    async def go() -> None:
        backend = await _backend(server.url)
        one = manifest(envelope("alpha"))
        first, second = await asyncio.gather(backend.submit(one, "u1"), backend.submit(one, "u2"))
        assert first.job_id == second.job_id  # the loser of the 409 updated the winner's job
        await backend.client.aclose()

    run(go())
    [job] = by_name(server)["alpha"]
    assert job["Version"] == 2


def test_ambiguous_put_is_resolved_by_uid(dev: Any) -> None:
    server = dev("1.9", fail_after_store=1.0)

    async def go() -> None:
        backend = await _backend(server.url)
        with pytest.raises(OutcomeUnknown):
            await backend.submit(manifest(envelope("alpha")), "u1")
        found = await backend.find(["u1", "u2"])
        assert list(found) == ["u1"]
        await backend.client.aclose()

    run(go())


def test_polling_pages_and_resends_the_selector(dev: Any, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    import reconciler.backends.orchestrator as orchestrator

    monkeypatch.setattr(orchestrator, "PAGE", 2)
    server = dev("1.9")

    async def go() -> None:
        backend = await _backend(server.url)
        for index in range(5):
            await backend.submit(manifest(envelope(f"n{index}")), f"u{index}")
        found = await backend.find([f"u{i}" for i in range(5)])
        assert sorted(found) == [f"u{i}" for i in range(5)]
        named = await backend.find_by_name(["n1", "n4"])
        assert sorted(named) == ["n1", "n4"]
        await backend.client.aclose()

    run(go())
    assert server.stats()["GET /orchestrator/jobs"] == 6  # 3 pages each


def test_401_is_not_retried(dev: Any) -> None:
    server = dev("1.9", api_key=KEY)

    async def go() -> None:
        backend = await _backend(server.url, credentials=Credentials(api_key="z" * 24))
        with pytest.raises(CredentialsRejected, match="configuration error"):
            await backend.find(["u1"])
        await backend.client.aclose()

    run(go())
    assert server.stats().get("GET /orchestrator/jobs", 0) <= 1


def test_our_own_key_never_reaches_a_recorded_state_message(dev: Any) -> None:
    """A stop reason is anyone's text, recorded and shown by `status`: one quoting the API
    key we send (pasted by someone, or echoed) is masked before the engine sees it."""
    server = dev("1.9", api_key=KEY)
    [item] = load_file("a.yaml", envelope("alpha").encode()).manifests

    async def go() -> tuple[str, str]:
        backend = await _backend(server.url, credentials=Credentials(api_key=KEY))
        job = await backend.submit(item, "u" * 32)
        reply = await backend.client._http.request(
            "DELETE", f"{JOBS}/{job.job_id}", params={"namespace": "default"},
            content=json.dumps({"reason": f"rotated key {KEY} by hand"}).encode())
        assert reply.status_code == 200, reply.text
        status = await backend.status(job.job_id)
        [[found]] = (await backend.find(["u" * 32])).values()
        await backend.client.aclose()
        assert status is not None
        return status.message, found.message

    for message in run(go()):
        assert message == "rotated key [secret] by hand"


def test_the_wire_stays_in_backends() -> None:
    # Nothing above backends/ names an orchestrator wire field.
    for module in ("engine/executor.py", "service/daemon.py", "domain/plan.py", "ports.py"):
        text = (Path(__file__).parents[1] / "reconciler" / module).read_text()
        assert "Labels" not in text and "next_token" not in text, module


def test_status_shows_the_api_and_mode(tmp_path: Path, dev: Any) -> None:
    server = dev("1.9")
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    folder.apply()
    result = CliRunner().invoke(main, ["status", "--json", "--manifests", str(folder.root),
                                       "--state", str(folder.state), "--endpoint", server.url])
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["api"] == {"api": "orchestrator", "mode": "name", "server_version": "v1.9.3"}
    assert status["jobs"][0]["job_id"].startswith("j-")


def test_a_cold_sync_puts_alone_yet_never_takes_a_foreign_name(tmp_path: Path,
                                                               dev: Any) -> None:
    server = dev("1.9")
    foreign = {"Name": "alpha", "Type": "batch", "Tasks": [
        {"Name": "main", "Engine": {"Type": "docker", "Params": {"Image": "x"}}}]}
    httpx.put(server.url + JOBS, json={"Job": foreign}, timeout=5).raise_for_status()
    folder = Folder(tmp_path, server.url)
    for name in ("alpha", "beta", "gamma"):
        folder.write(f"{name}.yaml", envelope(name))
    result = folder.apply(expect=1)
    assert "alpha.yaml: a job named alpha" in result.output and "not ours" in result.output
    jobs = by_name(server)
    assert jobs["alpha"][0]["Version"] == 1  # untouched
    assert sorted(jobs) == ["alpha", "beta", "gamma"]
    stats = server.stats()
    # beta and gamma: one listing, then their PUTs alone; alpha (taken) was looked up.
    assert stats["GET /orchestrator/jobs/{id}"] == 1
    assert stats["PUT /orchestrator/jobs"] == 3  # the foreign one and ours


def test_user_and_password_are_basic_auth(tmp_path: Path, dev: Any) -> None:
    server = dev("1.9", api_user="ops:s3cretpw")
    folder = Folder(tmp_path, server.url)
    folder.write("a.yaml", envelope("alpha"))
    result = folder.apply(expect=1, env={"BACALHAU_API_USERNAME": "ops",
                                         "BACALHAU_API_PASSWORD": "wrongpw"})
    assert "HTTP 401" in result.output and "wrongpw" not in result.output
    folder.apply(env={"BACALHAU_API_USERNAME": "ops", "BACALHAU_API_PASSWORD": "s3cretpw"})
    assert list(by_name(server)) == ["alpha"]
    result = folder.apply(expect=1, env={"BACALHAU_API_USERNAME": "ops",
                                         "BACALHAU_API_PASSWORD": "s3cretpw",
                                         "BACALHAU_API_KEY": KEY})
    assert "give one" in result.output and KEY not in result.output


def test_an_unreachable_server_without_a_key_does_not_stop_the_backend_opening() -> None:
    """api = auto, the server not up yet and no signing key: legacy cannot be opened, so the
    backend opens in name mode rather than failing the daemon's start (the resync asks the
    server again); found in review."""
    import asyncio

    from reconciler.app import wiring
    from reconciler.backends.orchestrator import OrchestratorBackend
    from reconciler.settings import Settings

    settings = Settings(endpoint="http://127.0.0.1:9", api="auto", request_timeout=0.5)

    async def opened() -> str:
        async with wiring.backend(settings, None) as backend:
            assert isinstance(backend, OrchestratorBackend)
            return backend.mode

    assert asyncio.run(opened()) == "name"


@pytest.mark.parametrize("refusal", ["503", "401"])
def test_a_superseded_job_whose_stop_failed_is_stopped_by_the_next_pass(
        tmp_path: Path, dev: Any, refusal: str) -> None:
    """The update by name created a second job (the old one unknown to the name index) and
    the stop of the old one failed: the record follows the new job, so only the duplicate
    sweep can find the old one. The name is a suspect, so the next pass of the same executor
    (a daemon's) stops it; before, both ran until the daemon restarted. A 401 there stops the
    pass like any refused credential (it was logged as one failed cancel and the pass went
    on), and the new job's record stays."""

    class FlakyStop(OrchestratorBackend):
        failures = 0

        async def stop(self, job_id: str, reason: str) -> str:
            if self.failures:
                self.failures -= 1
                if refusal == "401":
                    raise CredentialsRejected("cancel: HTTP 401: Request Unauthorized",
                                              status=401, credential="none")
                raise ServerError("cancel: HTTP 503: Server Timeout!", status=503)
            return await super().stop(job_id, reason)

    server = dev("1.9")
    rig = in_process(tmp_path, server, FlakyStop)
    root, store, backend, reconciler, executor = (rig.root, rig.store, rig.backend,
                                                  rig.reconciler, rig.executor)
    with asyncio.Runner() as loop:
        (root / "a.yaml").write_text(envelope("alpha"))
        loop.run(reconciler.run_pass(executor))
        [old] = by_name(server)["alpha"]
        forget_name_index(server)

        (root / "a.yaml").write_text(envelope("alpha", image="ubuntu:24.04"))
        backend.failures = 1
        if refusal == "401":
            with pytest.raises(CredentialsRejected):
                loop.run(reconciler.run_pass(executor))
        else:
            result = loop.run(reconciler.run_pass(executor))
            assert result.report.counts["cancel.failed"] == 1
        assert store.rows["alpha"].phase == "active"
        assert store.rows["alpha"].job_id != old["ID"]
        states = {j["ID"]: j["State"]["StateType"] for j in by_name(server)["alpha"]}
        assert states[old["ID"]] in ("Pending", "Running")  # both run for now

        result = loop.run(reconciler.run_pass(executor))  # nothing changed in the folder
        assert result.report.counts["duplicate.cancelled"] == 1
        states = {j["ID"]: j["State"]["StateType"] for j in by_name(server)["alpha"]}
        assert states.pop(old["ID"]) == "Stopped"
        assert list(states.values()) in (["Pending"], ["Running"])
        assert store.rows["alpha"].job_id in states
        loop.run(backend.client.aclose())


def test_an_update_in_doubt_twice_then_removed_still_stops_its_job(
        tmp_path: Path, dev: Any) -> None:
    """An update in place whose PUT was in doubt, confirmed absent, then sent again under a
    fresh uid and in doubt again (or a kill -9 before that PUT): the fresh intent must keep
    the job the update lands on. Once the manifest is removed, its absence is confirmed and
    that job is stopped; before, the fresh intent had no job id, the record was forgotten and
    the job of the name ran on with no record (docs/design.md, "Update in place")."""

    class FlakyPut(OrchestratorBackend):
        failures = 0

        async def submit(self, manifest: Any, uid: str) -> Any:
            if self.failures:  # a connection reset before the request left: nothing stored
                self.failures -= 1
                raise OutcomeUnknown("submit: reply lost (ReadError)")
            return await super().submit(manifest, uid)

    server = dev("1.9")
    rig = in_process(tmp_path, server, FlakyPut)
    with asyncio.Runner() as loop:
        job = rig.synced_then_changed(loop, server)
        rig.backend.failures = 2  # the update, then its resubmit after the confirmed absence
        loop.run(rig.reconciler.run_pass(rig.executor))
        assert rig.store.rows["alpha"].phase == "submitting"  # in doubt: kept for next pass
        rig.removed_and_stopped(loop, server, job)


def test_a_refused_update_in_place_backs_off_instead_of_being_sent_every_pass(
        tmp_path: Path, dev: Any) -> None:
    """A 400 on an update in place (one the offline checks did not foresee) leaves the old
    job running under its record. It was sent again at every pass, and the daemon follows a
    pass with changes by another a second later: one refused PUT a second, forever. Now the
    record waits out a backoff that doubles at each refusal; ``apply`` (no backoff) still
    tries at once."""

    class Refusing(OrchestratorBackend):
        refusals = 0

        async def submit(self, manifest: Any, uid: str) -> Any:
            if manifest.spec_hash == refused_hash:
                self.refusals += 1
                raise InvalidRequest("submit: HTTP 400: a rule of this server")
            return await super().submit(manifest, uid)

    server = dev("1.9")
    root = tmp_path / "manifests"
    root.mkdir()
    refused_hash = manifest(envelope("alpha", image="ubuntu:24.04")).spec_hash
    backend = Refusing(OrchestratorClient(server.url), mode="name", version="v1.9.3")
    with Store(tmp_path / "state.db") as store, asyncio.Runner() as loop:
        executor = Executor(store, backend, PlanPolicy(), resolve_delay=0)
        reconciler = Reconciler(FolderSource(root), store, PlanPolicy())
        (root / "a.yaml").write_text(envelope("alpha"))
        loop.run(reconciler.run_pass(executor))
        [job] = by_name(server)["alpha"]

        (root / "a.yaml").write_text(envelope("alpha", image="ubuntu:24.04"))
        loop.run(reconciler.run_pass(executor))
        assert backend.refusals == 1
        [first] = store.records()
        assert (first.phase, first.job_id) == ("active", job["ID"])  # the old job runs on
        assert first.next_attempt_at - first.updated_at == pytest.approx(10.0, abs=1)
        for _ in range(3):  # the daemon's next passes: nothing is sent, the plan waits
            result = loop.run(reconciler.run_pass(executor))
            [decision] = result.plan.decisions
            assert decision.action is Action.WAIT and "update was refused" in decision.reason
            assert decision.retry_at == first.next_attempt_at
            assert result.overall == "degraded"  # the job runs the old spec
        assert backend.refusals == 1

        reconciler.policy = PlanPolicy(honour_backoff=False)  # `apply`: tried at once
        loop.run(reconciler.run_pass(executor))
        assert backend.refusals == 2
        [second] = store.records()
        assert second.next_attempt_at - second.updated_at == pytest.approx(20.0, abs=1)
        [still] = by_name(server)["alpha"]
        assert (still["ID"], still["Version"]) == (job["ID"], 1)
        loop.run(backend.client.aclose())


def test_an_update_in_doubt_then_refused_keeps_its_job_recorded(
        tmp_path: Path, dev: Any) -> None:
    """An update in place in doubt, confirmed absent, sent again under a fresh uid and then
    refused (a 400): the job of the name still runs its old spec, so it stays recorded as
    live (and is stopped when the manifest goes), not as an error record without a job,
    which the removal forgot while the job ran on."""

    class DoubtThenRefuse(OrchestratorBackend):
        faults: list[Exception] = []

        async def submit(self, manifest: Any, uid: str) -> Any:
            if self.faults:
                raise self.faults.pop(0)
            return await super().submit(manifest, uid)

    server = dev("1.9")
    rig = in_process(tmp_path, server, DoubtThenRefuse)
    with asyncio.Runner() as loop:
        job = rig.synced_then_changed(loop, server)
        rig.backend.faults = [OutcomeUnknown("submit: reply lost (ReadError)"),
                              InvalidRequest("submit: HTTP 400: a rule of this server")]
        loop.run(rig.reconciler.run_pass(rig.executor))
        record = rig.store.rows["alpha"]
        assert (record.phase, record.job_id) == ("active", job["ID"])
        assert record.last_error and "400" in record.last_error
        rig.removed_and_stopped(loop, server, job)


def test_a_crash_between_a_superseding_put_and_its_stop_is_resolved_with_the_stop(
        tmp_path: Path, dev: Any) -> None:
    """The update by name created a second job (the old one unknown to the name index) and
    the daemon died before it stopped the old one, its outcome unsaved (outcomes wait to be
    saved in batches). At the restart the intent, which keeps the old job id, is resolved by
    uid and the new job adopted: the old one must be stopped then, as _submit would have.
    The first sweep skips intents (names in submitting) and later sweeps only suspects, so
    both jobs ran on until the next restart."""

    server = dev("1.9")
    rig = in_process(tmp_path, server, OrchestratorBackend)
    root, store, backend, reconciler = rig.root, rig.store, rig.backend, rig.reconciler
    with asyncio.Runner() as loop:
        (root / "a.yaml").write_text(envelope("alpha"))
        loop.run(reconciler.run_pass(Executor(store.as_store(), backend, PlanPolicy())))
        [old] = by_name(server)["alpha"]
        forget_name_index(server)

        (root / "a.yaml").write_text(envelope("alpha", image="ubuntu:24.04"))
        _, plan = reconciler.plan()
        [replace_] = plan.changes
        assert replace_.action is Action.REPLACE and replace_.manifest is not None
        # What the dead daemon left: its intent (with the old job id), and the PUT's job.
        intent = Record("alpha", Phase.SUBMITTING, replace_.manifest.spec_hash, "a.yaml",
                        job_id=old["ID"], uid="c0ffee" * 5, attempts=1)
        store.rows["alpha"] = intent
        loop.run(backend.submit(replace_.manifest, "c0ffee" * 5))
        assert len(by_name(server)["alpha"]) == 2

        result = loop.run(reconciler.run_pass(Executor(store.as_store(), backend,
                                                       PlanPolicy(), resolve_delay=0)))
        assert result.report.counts["resolve.adopted"] == 1
        states = {j["ID"]: j["State"]["StateType"] for j in by_name(server)["alpha"]}
        assert states.pop(old["ID"]) == "Stopped"
        [(new_id, state)] = states.items()
        assert state in ("Pending", "Running") and store.rows["alpha"].job_id == new_id
        loop.run(backend.client.aclose())


def test_job_of_each_uid_has_its_own_labels_and_the_translation_is_kept() -> None:
    """job_of shares the cached translation's nested values (no deep copy per submit): the
    keys it sets are each job's own, and the cache is never changed by them."""
    backend = OrchestratorBackend(OrchestratorClient("http://127.0.0.1:9"), mode="name",
                                  version="v1.6.0")
    [item] = load_file("a.yaml", envelope("a").encode()).manifests
    first, second = backend.job_of(item, "uid1"), backend.job_of(item, "uid2")
    assert first["Labels"]["reconciler-uid"] == "uid1"
    assert second["Labels"]["reconciler-uid"] == "uid2"
    assert first["Tasks"] == second["Tasks"]
    assert first["Tasks"][0]["Network"] == {"Type": "None"}  # v1.6's own default, spelled out
    assert first["Tasks"][0]["Engine"]["Type"] == "docker"
    assert first["Meta"]["reconciler/spec"] == item.spec_hash
    cached = backend._translate(item)
    assert isinstance(cached, dict)
    assert "reconciler-uid" not in cached.get("Labels", {}) and "Name" not in cached
    asyncio.run(backend.client.aclose())
