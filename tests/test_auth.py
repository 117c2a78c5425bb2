"""Issue 14: a refused credential is a configuration error, not a retry loop; and ``Force``.

- In process (tests/fakes.py): the executor stops at the first :class:`CredentialsRejected`,
  gives the refused intent back (no error record, no backoff), keeps an intent in doubt, and
  raises; observe raises it too.
- The orchestrator client (httpx MockTransport): 401/403 on any route, and on the version
  route, become :class:`CredentialsRejected` naming the setting to fix, never the secret.
- Real processes: ``reconciler run`` against ``dev-requester --bacalhau-version 1.9 --api-key``
  with a wrong key exits 78 at once, says so once, and the requester saw a handful of
  requests; the right key then submits at once. ``apply`` and ``status`` exit 1 with one line.
- ``Force`` (docs/design.md, "The orchestrator backend"): a re-added unchanged manifest is PUT
  with ``Force: true`` once and runs again (same id, next version); a fresh submit, a changed
  spec and the first PUT after an ambiguous one say ``Force: false``.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from reconciler.app import wiring
from reconciler.app.cli import main
from reconciler.backends.errors import CredentialsRejected, NotAuthorized
from reconciler.backends.orchestrator import (
    Credentials,
    OrchestratorBackend,
    OrchestratorClient,
    detect_version,
)
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import Executor
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import Reconciler
from reconciler.settings import load_settings
from reconciler.sources.folder import FolderSource
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess
from tests.fakes import FakeRequester, FakeStore
from tests.harness import envelope
from tests.test_daemon import NotifySocket

KEY = "k" * 24
WRONG = "w" * 24
JOBS = "/api/v1/orchestrator/jobs"
FORCE = "PUT /orchestrator/jobs Force"


def rejected(status: int = 401) -> CredentialsRejected:
    return CredentialsRejected(f"submit: HTTP {status}: Request Unauthorized", status=status,
                               credential="api-key", hint="check api_key")


# --- the executor and observe, in process ----------------------------------------------------


class Engine:
    """One executor kept across passes (as the daemon keeps it), the fakes behind it."""

    def __init__(self, tmp_path: Path, concurrency: int = 8) -> None:
        self.root = tmp_path / "manifests"
        self.root.mkdir()
        self.store = FakeStore()
        self.requester = FakeRequester()
        self.executor = Executor(self.store.as_store(), self.requester.backend(), PlanPolicy(),
                                 concurrency=concurrency, resolve_delay=0)
        self.reconciler = Reconciler(FolderSource(self.root), self.store.as_store(),
                                     PlanPolicy())
        self.loop = asyncio.Runner()  # one loop for every pass, as in the daemon

    def write(self, name: str, image: str = "ubuntu:22.04") -> None:
        (self.root / f"{name}.yaml").write_text(envelope(name, image))

    def run_pass(self) -> Any:
        return self.loop.run(self.reconciler.run_pass(self.executor))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    rig = Engine(tmp_path)
    yield rig
    rig.loop.close()


def test_the_first_rejection_stops_the_pass_and_gives_the_intents_back(engine: Engine) -> None:
    for index in range(40):
        engine.write(f"n{index:02d}")
    engine.requester.latency = 0.01  # several submits in flight when the first is refused
    engine.requester.fail_next("submit", rejected(), times=1000)
    with capture_logs() as events, pytest.raises(CredentialsRejected):
        engine.run_pass()
    # Only the requests already in flight (at most `concurrency`) were sent, not one per
    # manifest; nothing was recorded as an error with a backoff: the intents were given back.
    assert 1 <= engine.requester.calls["submit"] <= 8
    assert engine.store.rows == {}
    assert [e for e in events if e["event"] == "action.failed"] == []
    # The key fixed: the next pass submits every manifest at once, without a backoff.
    engine.requester.faults.clear()
    result = engine.run_pass()
    assert result.report.counts["submit.ok"] == 40
    assert {r.phase for r in engine.store.rows.values()} == {Phase.ACTIVE}


def test_a_refused_cancel_keeps_the_job_and_its_record(engine: Engine) -> None:
    engine.write("alpha")
    engine.run_pass()
    before = engine.store.rows["alpha"]
    engine.write("alpha", image="alpine")  # the legacy API replaces: cancel, then submit
    engine.requester.fail_next("cancel", rejected(403))
    with pytest.raises(CredentialsRejected):
        engine.run_pass()
    assert engine.store.rows["alpha"] == before  # given back: active, old spec, no error
    assert engine.requester.states("alpha") == ["New"]
    assert engine.requester.calls["submit"] == 1


def test_a_submit_in_doubt_keeps_its_intent_when_the_lookup_is_refused(engine: Engine) -> None:
    engine.write("a")
    engine.run_pass()  # the first pass: every name looked up once
    engine.write("b")
    engine.requester.fail_submits(1, "after-store")  # b's job exists, its reply is lost
    engine.requester.fail_next("list", rejected())  # ... and the uid lookup is refused
    with pytest.raises(CredentialsRejected):
        engine.run_pass()
    kept = engine.store.rows["b"]
    assert kept.phase is Phase.SUBMITTING and kept.uid  # never given back: it may exist
    engine.run_pass()
    assert engine.store.rows["b"].phase is Phase.ACTIVE
    assert len(engine.requester.named("b")) == 1  # adopted by uid, not submitted again


def test_resubmits_after_a_confirmed_absence_stop_at_the_first_rejection(tmp_path: Path) -> None:
    engine = Engine(tmp_path, concurrency=1)
    try:
        for name in ("a", "b", "c"):  # intents a crash left behind; no job reached the server
            engine.write(name)
            [manifest] = load_file(f"{name}.yaml", envelope(name).encode()).manifests
            engine.store.commit_intents([Record(name, Phase.SUBMITTING, manifest.spec_hash,
                                                f"{name}.yaml", uid=f"uid-{name}",
                                                attempts=1)])
        engine.requester.latency = 0.01
        engine.requester.fail_next("submit", rejected(), times=10)
        with pytest.raises(CredentialsRejected):
            engine.run_pass()
        assert engine.requester.calls["submit"] == 1  # the others were never sent
        assert {r.phase for r in engine.store.rows.values()} == {Phase.SUBMITTING}
    finally:
        engine.loop.close()


def test_observe_raises_a_rejection_instead_of_skipping_the_job(tmp_path: Path) -> None:
    store = FakeStore([Record("a", Phase.ACTIVE, "h" * 64, "a.yaml", job_id="job-9",
                              uid="u1", job_state="New")])
    requester = FakeRequester()  # job-9 is not listed, so its state is asked for
    requester.fail_next("states", rejected())
    with pytest.raises(CredentialsRejected):
        asyncio.run(observe(store.as_store(), requester.backend(), PlanPolicy()))
    assert store.rows["a"].job_state == "New"


# --- the orchestrator client -------------------------------------------------------------------


def mock(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.MockTransport:
    return httpx.MockTransport(handler)


def refusing(status: int, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        # A server that echoes what it was sent (Bacalhau does not; the secret must not
        # travel on into our message if one ever did).
        text = f"Request Unauthorized: {request.headers.get('authorization', '')}"
        return httpx.Response(status, json={"Code": "Unauthorized", "Message": text})

    return mock(handle)


@pytest.mark.parametrize(("credentials", "status", "names"), [
    (Credentials(api_key=WRONG), 401, "BACALHAU_API_KEY"),
    (Credentials(username="ops", password="s3cret-pw"), 401, "BACALHAU_API_PASSWORD"),
    (Credentials(), 401, "set api_key"),
    (Credentials(api_key=WRONG), 403, "lacks the capability"),
])
def test_401_and_403_on_any_route_name_the_setting_never_the_secret(
    credentials: Credentials, status: int, names: str,
) -> None:
    seen: list[httpx.Request] = []

    async def go() -> list[CredentialsRejected]:
        client = OrchestratorClient("http://orch", credentials=credentials,
                                    transport=refusing(status, seen))
        backend = OrchestratorBackend(client, mode="name", version="v1.9.3")
        [manifest] = load_file("a.yaml", envelope("alpha").encode()).manifests
        errors = []
        for call in (lambda: backend.submit(manifest, "u1"), lambda: backend.find(["u1"]),
                     lambda: backend.stop("j-1", "gone"), lambda: backend.status("j-1"),
                     lambda: backend.find_by_name(["alpha"])):
            with pytest.raises(CredentialsRejected) as error:
                await call()
            errors.append(error.value)
        await client.aclose()
        return errors

    errors = asyncio.run(go())
    assert len(seen) == 5  # one request each: never retried
    for error in errors:
        assert not isinstance(error, NotAuthorized)  # that is the legacy API's per-job 401
        assert (error.status, error.credential) == (status, credentials.kind)
        assert names in str(error) and "configuration error" in str(error)
        assert WRONG not in str(error) and "s3cret-pw" not in str(error)
        assert base64.b64encode(b"ops:s3cret-pw").decode() not in str(error)  # nor the token


def test_a_refused_version_route_is_a_configuration_error(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []
    with pytest.raises(CredentialsRejected, match="check endpoint"):
        asyncio.run(detect_version("http://orch", transport=refusing(401, seen)))
    assert seen[0].headers.get("authorization") is None  # the version route is never signed


# --- real processes: the daemon, apply, status ---------------------------------------------


def manifests(tmp_path: Path, count: int) -> Path:
    """A folder of ``count`` manifests, n00.yaml, n01.yaml, ..."""
    root = tmp_path / "manifests"
    root.mkdir()
    for index in range(count):
        (root / f"n{index:02d}.yaml").write_text(envelope(f"n{index:02d}"))
    return root


def wrong_key_env(tmp_path: Path, key: str) -> dict[str, str]:
    return {"BACALHAU_API_KEY": key, "NOTIFY_SOCKET": str(tmp_path / "notify"),
            "HOME": str(tmp_path)}  # no ~/.bacalhau key: the orchestrator needs none


def test_daemon_with_a_wrong_key_exits_78_at_once(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--api-key", KEY, "--job-duration", "600")
    root = manifests(tmp_path, 30)
    args = ["--manifests", str(root), "--state", str(tmp_path / "state.db"),
            "--endpoint", dev.url]
    notify = NotifySocket(str(tmp_path / "notify"))
    try:
        daemon = DaemonProcess(args, wrong_key_env(tmp_path, WRONG))
        assert daemon.wait(timeout=15) == 78  # EX_CONFIG, within seconds
        [event] = daemon.named("api.unauthorized")
        assert (event["auth"], event["status"], event["exit_status"]) == ("api-key", 401, 78)
        assert "BACALHAU_API_KEY" in event["hint"] and event["endpoint"] == dev.url
        assert daemon.named("daemon.stopped")  # the usual orderly way out
        assert daemon.named("pass.failed") == [] and daemon.named("action.failed") == []
        output = "".join(daemon.raw)
        assert WRONG not in output and KEY not in output
        [(_, status)] = [m for m in notify.with_key("STATUS") if "refused" in m[1]]
        assert "api-key" in status and WRONG not in status
        assert notify.with_key("STOPPING") and not notify.with_key("READY")
    finally:
        notify.close()
    stats = dev.stats()
    assert stats.get("unauthorized", 0) <= 3  # a handful, not one per manifest
    assert "PUT /orchestrator/jobs" not in stats and dev.jobs() == []
    # The key fixed: the next start submits every manifest in its first pass.
    daemon = DaemonProcess(args, wrong_key_env(tmp_path, KEY))
    try:
        daemon.wait_event("pass.completed", timeout=30)
        assert len(daemon.named("job.submitted")) == 30
    finally:
        assert daemon.stop() == 0
    assert KEY not in "".join(daemon.raw)


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def refusing_server() -> Iterator[str]:
    """A server that wants credentials on every route, the version route included (as a
    proxy in front of Bacalhau might)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_daemon_whose_version_check_is_refused_exits_78(tmp_path: Path,
                                                        refusing_server: str) -> None:
    (tmp_path / "manifests").mkdir()
    daemon = DaemonProcess(["--manifests", str(tmp_path / "manifests"), "--state",
                            str(tmp_path / "state.db"), "--endpoint", refusing_server],
                           {"HOME": str(tmp_path)})
    assert daemon.wait(timeout=15) == 78
    [event] = daemon.named("api.unauthorized")
    assert event["status"] == 401 and "check endpoint" in event["hint"]
    assert daemon.named("daemon.started") == []


def test_apply_and_status_with_a_wrong_key_say_so_in_one_line(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--api-key", KEY, "--job-duration", "600")
    root = manifests(tmp_path, 20)
    common = ["--manifests", str(root), "--state", str(tmp_path / "state.db"),
              "--endpoint", dev.url]
    env = {"BACALHAU_API_KEY": WRONG, "HOME": str(tmp_path)}
    runner = CliRunner()
    applied = runner.invoke(main, ["--log-format", "json", "apply", *common], env=env)
    assert applied.exit_code == 1
    [line] = [x for x in applied.stderr.splitlines() if x.startswith("Error:")]
    assert "HTTP 401" in line and "BACALHAU_API_KEY" in line
    assert WRONG not in applied.output and "action.failed" not in applied.output
    assert dev.stats().get("unauthorized", 0) <= 2 and dev.jobs() == []
    status = runner.invoke(main, ["status", *common], env=env)
    assert status.exit_code == 1
    assert status.stderr.startswith("Error: list: HTTP 401") and WRONG not in status.output
    runner.invoke(main, ["apply", *common], env={**env, "BACALHAU_API_KEY": KEY})
    assert runner.invoke(main, ["status", "--json", *common],
                         env={**env, "BACALHAU_API_KEY": KEY}).exit_code == 0


def test_choose_api_lets_a_refusal_through(refusing_server: str) -> None:
    for api in ("auto", "orchestrator"):
        settings = load_settings(None, endpoint=refusing_server, api=api)
        with pytest.raises(CredentialsRejected):
            asyncio.run(wiring.choose_api(settings))


# --- Force --------------------------------------------------------------------------------------


def force_puts(dev: DevProcess) -> tuple[int, int]:
    stats = dev.stats()
    return stats.get("PUT /orchestrator/jobs", 0), stats.get(FORCE, 0)


def test_a_re_added_unchanged_manifest_is_forced_to_run_again(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    common = ["apply", "--manifests", str(root), "--state", str(tmp_path / "state.db"),
              "--endpoint", dev.url]
    env = {"HOME": str(tmp_path)}

    def apply() -> None:
        result = CliRunner().invoke(main, common, env=env)
        assert result.exit_code == 0, result.output

    (root / "keep.yaml").write_text(envelope("keep"))  # the folder never empties
    (root / "a.yaml").write_text(envelope("alpha"))
    apply()
    assert force_puts(dev) == (2, 0)  # fresh submits
    def alpha() -> dict[str, Any]:
        [job] = [j for j in dev.jobs() if j["Name"] == "alpha"]
        return job

    first = alpha()
    (root / "a.yaml").write_text(envelope("alpha", image="alpine"))
    apply()
    assert force_puts(dev) == (3, 0)  # a changed spec: an update, not forced
    (root / "a.yaml").unlink()
    apply()
    assert alpha()["State"]["StateType"] == "Stopped"
    (root / "a.yaml").write_text(envelope("alpha", image="alpine"))
    apply()
    assert force_puts(dev) == (4, 1)  # re-added unchanged: forced, once
    again = alpha()
    assert (again["ID"], again["Version"]) == (first["ID"], 3)
    assert again["State"]["StateType"] in ("Pending", "Running")
    apply()  # converged: nothing more is sent
    assert force_puts(dev) == (4, 1)


class DropFirstForced(httpx.AsyncBaseTransport):
    """Forwards to the real server, but loses the first forced PUT on the way (a dropped
    connection: ambiguous to the client, never stored), and records every request."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.log: list[tuple[str, str, bool | None]] = []
        self.dropped = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        force = None
        if request.method == "PUT":
            force = json.loads(request.content)["Force"]
        self.log.append((request.method, request.url.path, force))
        if force and not self.dropped:
            self.dropped = True
            raise httpx.ReadError("connection reset by peer", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def stopped_by_hand(client: OrchestratorClient, root: Path, log: list[Any]
                          ) -> tuple[FakeStore, Executor, Reconciler]:
    """alpha synced through ``client``, then its job stopped by hand and its record failed
    (ended, same spec: the next run of it is forced); ``log`` cleared and backoff off, so
    the next pass resubmits at once."""
    backend = OrchestratorBackend(client, mode="name", version="v1.9.3")
    store = FakeStore()
    executor = Executor(store.as_store(), backend, PlanPolicy(), resolve_delay=0)
    reconciler = Reconciler(FolderSource(root), store.as_store(), PlanPolicy())
    await reconciler.run_pass(executor)
    [job] = await client.list_jobs("")
    await client.stop(job["ID"], "stopped by hand")
    store.rows["alpha"] = Record("alpha", Phase.FAILED, store.rows["alpha"].spec_hash,
                                 "a.yaml", job_id=job["ID"], uid="old", attempts=1)
    log.clear()
    reconciler.policy = PlanPolicy(honour_backoff=False)
    return store, executor, reconciler


def test_no_force_after_an_ambiguous_put(tmp_path: Path,
                                         dev_factory: Callable[..., DevProcess]) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("alpha"))
    transport = DropFirstForced()

    async def scenario() -> None:
        client = OrchestratorClient(dev.url, transport=transport)
        _, executor, reconciler = await stopped_by_hand(client, root, transport.log)
        await reconciler.run_pass(executor)
        await client.aclose()

    (root / "a.yaml").write_text(envelope("alpha", policy="onFailure: resubmit"))
    asyncio.run(scenario())
    puts = [(i, force) for i, (method, _, force) in enumerate(transport.log) if method == "PUT"]
    assert [force for _, force in puts] == [True, False]  # never forced after the doubt
    between = transport.log[puts[0][0] + 1 : puts[1][0]]
    assert ("GET", JOBS, None) in between  # looked up by uid first
    [job] = dev.jobs()
    assert job["Version"] == 2 and job["State"]["StateType"] in ("Pending", "Running")


def test_a_key_revoked_under_a_running_daemon_stops_it_at_the_next_poll(
    tmp_path: Path, dev_factory: Callable[..., DevProcess],
) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--api-key", KEY, "--job-duration", "600")
    port = dev.url.rsplit(":", 1)[1]
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("alpha"))
    env = {**wrong_key_env(tmp_path, KEY), "RECONCILER_POLL_INTERVAL": "0.2",
           "RECONCILER_RESYNC_INTERVAL": "3600"}  # only polls (observe) after the first pass
    daemon = DaemonProcess(["--manifests", str(root), "--state", str(tmp_path / "state.db"),
                            "--endpoint", dev.url], env)
    try:
        daemon.wait_event("job.submitted", timeout=30)
        dev.stop()  # the same server with another key: ours is no longer accepted
        other = dev_factory("--port", port, "--bacalhau-version", "1.9",
                            "--api-key", "o" * 24, "--job-duration", "600")
        assert daemon.wait(timeout=20) == 78
    finally:
        daemon.stop()
    [event] = daemon.named("api.unauthorized")
    assert event["status"] == 401
    # A poll may fall between the two servers (connection refused: retried); the 401 never
    # is one of those, it stops the daemon.
    assert all("cannot connect" in e["error"] for e in daemon.named("observe.failed"))
    assert other.stats().get("unauthorized", 0) <= 2
    assert KEY not in "".join(daemon.raw)


class DropFirstForcedThenFailLookups(DropFirstForced):
    """As DropFirstForced, then answers the next name lookups (GET /jobs/alpha) with 503."""

    def __init__(self, lookups: int) -> None:
        super().__init__()
        self.lookups = lookups

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (self.dropped and self.lookups and request.method == "GET"
                and request.url.path == JOBS + "/alpha"):
            self.lookups -= 1
            self.log.append((request.method, request.url.path, None))
            return httpx.Response(503, text="Server Timeout!", request=request)
        return await super().handle_async_request(request)


def test_no_force_after_an_ambiguous_put_even_when_the_next_lookup_failed(
        tmp_path: Path, dev_factory: Callable[..., DevProcess]) -> None:
    """The first PUT after an ambiguous one is never forced, even when the submit made right
    after the doubt failed at its name lookup (before any PUT): that submit must not use up
    the doubt, or the next pass's PUT is forced (it was)."""
    from reconciler.backends.legacy import RetryPolicy

    dev = dev_factory("--bacalhau-version", "1.9", "--job-duration", "600")
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "a.yaml").write_text(envelope("alpha"))
    transport = DropFirstForcedThenFailLookups(lookups=1)

    async def scenario() -> None:
        client = OrchestratorClient(dev.url, transport=transport,
                                    retry=RetryPolicy(attempts=1))
        store, executor, reconciler = await stopped_by_hand(client, root, transport.log)
        await reconciler.run_pass(executor)  # forced PUT dropped; resubmit's lookup: 503
        assert store.rows["alpha"].phase is Phase.ERROR
        await reconciler.run_pass(executor)  # the first PUT after the doubt
        await client.aclose()

    (root / "a.yaml").write_text(envelope("alpha", policy="onFailure: resubmit"))
    asyncio.run(scenario())
    puts = [force for method, _, force in transport.log if method == "PUT"]
    assert puts == [True, False]
    [job] = dev.jobs()
    assert job["Version"] == 2 and job["State"]["StateType"] in ("Pending", "Running")
