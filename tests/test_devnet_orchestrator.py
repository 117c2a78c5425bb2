"""The dev requester's orchestrator profiles against plain httpx requests on a loopback port.

Each test checks one rule of docs/wire-orchestrator.md: the three profiles' routes, submit and
update by name, lookups and the id-prefix fallback, list paging and label selectors, DELETE by
state, validation, the error envelope, the 409 name race, job states, the fault flags, auth,
and the official Python SDK's orchestrator calls (when it is installed).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from reconciler.app.cli import main
from reconciler.devnet import DevConfig, DevRequesterThread
from tests.conftest import DevProcess

JOBS = "/api/v1/orchestrator/jobs"
KEY = "k" * 24
Factory = Callable[..., httpx.Client]


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[tuple[Any, ...], DevRequesterThread]]:
    """One dev requester per distinct configuration, shared by the module's tests."""
    running: dict[tuple[Any, ...], DevRequesterThread] = {}
    yield running
    with ThreadPoolExecutor() as pool:  # each stop waits for its server's loop to notice
        list(pool.map(DevRequesterThread.stop, running.values()))


@pytest.fixture
def orch(servers: dict[tuple[Any, ...], DevRequesterThread]) -> Iterator[Factory]:
    """``orch(version="1.9", **DevConfig fields)``: an httpx client on an emptied requester."""
    clients: list[httpx.Client] = []

    def start(version: str = "1.9", **config: Any) -> httpx.Client:
        config.setdefault("job_duration", 30.0)
        key = (version, *sorted(config.items()))
        dev = servers.get(key)
        if dev is None:
            dev = servers[key] = DevRequesterThread(
                DevConfig(bacalhau_version=version, **config)).start()
        assert dev.app.orchestrator is not None
        dev.app.orchestrator.reset()
        client = httpx.Client(base_url=dev.url, timeout=5)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.close()


def job(name: str = "hello", kind: str = "batch", **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "Name": "main",
        "Engine": {"Type": "docker", "Params": {"Image": "ubuntu:24.04"}},
        "Publisher": {"Type": "noop"},
    }
    task.update(fields.pop("task", {}))
    return {"Name": name, "Type": kind, "Tasks": [task], **fields}


def put(client: httpx.Client, body: dict[str, Any], force: bool | None = None) -> httpx.Response:
    request: dict[str, Any] = {"Job": body}
    if force is not None:
        request["Force"] = force
    return client.put(JOBS, json=request)


def get(client: httpx.Client, ref: str, **params: str) -> httpx.Response:
    return client.get(f"{JOBS}/{ref}", params=params)


def stored(client: httpx.Client) -> list[dict[str, Any]]:
    return list(client.get("/devnet/jobs").json()["jobs"])


def error(reply: httpx.Response, status: int, code: str, message: str) -> dict[str, Any]:
    """The error envelope, checked: status, code, message prefix, JSON content type."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body: dict[str, Any] = reply.json()
    assert body["Status"] == status
    assert body["Code"] == code, body
    assert body["Message"].startswith(message), body
    return body


# --- profiles ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.0", "1.6", "1.9"])
def test_each_profile_serves_its_own_routes(version: str) -> None:
    with DevRequesterThread(DevConfig(bacalhau_version=version)) as dev:
        agent = httpx.get(dev.url + "/api/v1/agent/version")
        legacy = httpx.post(dev.url + "/api/v1/requester/list", json={})
        root_legacy = httpx.post(dev.url + "/requester/list", json={})
        jobs = httpx.get(dev.url + JOBS, params={"namespace": "default"})
        approve = httpx.post(dev.url + "/api/v1/compute/approve", json={})
    if version == "1.0":
        assert (agent.status_code, agent.text) == (404, "404 page not found\n")
        assert legacy.status_code == root_legacy.status_code == 200
        assert jobs.status_code == 404
        return
    assert agent.json()["GitVersion"] == {"1.6": "v1.6.5", "1.9": "v1.9.3"}[version]
    assert agent.json()["Major"] == "1" and agent.json()["Minor"] == version[-1]
    assert jobs.status_code == 200 and jobs.json() == {"Items": [], "NextToken": ""}
    if version == "1.6":
        # A JSON string pointing to the migration guide, not an error envelope.
        for reply in (legacy, root_legacy):
            assert reply.status_code == 410
            assert "migration" in reply.json()
    else:
        for reply in (legacy, root_legacy):
            error(reply, 404, "NotFound", "")
    assert approve.status_code == 404


def test_unknown_profile_and_misplaced_api_key_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bacalhau_version"):
        DevConfig(bacalhau_version="1.7")
    with pytest.raises(ValueError, match=r"need bacalhau_version 1\.9"):
        DevConfig(bacalhau_version="1.6", api_key=KEY)
    with pytest.raises(ValueError, match="alphanumeric"):
        DevConfig(bacalhau_version="1.9", api_user="a b:pw")
    with pytest.raises(ValueError, match="20 to 255"):
        DevConfig(bacalhau_version="1.9", api_key="short")
    result = CliRunner().invoke(main, ["dev-requester", "--bacalhau-version", "1.6",
                                       "--api-key", KEY])
    assert result.exit_code == 2 and "api_key: credentials need bacalhau_version 1.9" in (
        result.output)
    assert KEY not in result.output


def test_redirects_and_alive(orch: Factory) -> None:
    client = orch()
    for path, target in (("/", "/api/v1/agent/version"), ("/version", "/api/v1/agent/version"),
                         ("/livez", "/api/v1/agent/alive")):
        reply = client.get(path)
        assert (reply.status_code, reply.headers["location"]) == (301, target)
    assert client.get("/api/v1/agent/alive").json() == {"Status": "OK"}


def test_git_version_override_for_dev_builds(orch: Factory) -> None:
    client = orch(git_version="v0.0.0-xdev")
    assert client.get("/api/v1/agent/version").json()["GitVersion"] == "v0.0.0-xdev"
    assert client.get(JOBS).headers["x-bacalhau-git-version"] == "v0.0.0-xdev"


# --- submit and update ---------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.6", "1.9"])
def test_submit_normalises_and_sanitises(orch: Factory, version: str) -> None:
    client = orch(version)
    body = job(ID="mine", Meta={"bacalhau.org/x": "1", "owner": "me"}, State={"StateType": "x"})
    reply = put(client, body)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["JobID"].startswith("j-") and answer["EvaluationID"]
    assert "job ID is ignored when submitting a batch job" in answer["Warnings"]
    shown = get(client, answer["JobID"]).json()["Job"]
    assert shown["ID"] == answer["JobID"]
    assert (shown["Namespace"], shown["Count"], shown["Version"]) == ("default", 1, 1)
    assert shown["State"]["StateType"] in ("Pending", "Running")
    assert shown["Meta"]["owner"] == "me" and "bacalhau.org/x" not in shown["Meta"]
    assert shown["Meta"]["bacalhau.org/requester.id"]
    task = shown["Tasks"][0]
    assert task["Resources"] == {"CPU": "500m", "Memory": "512Mb"}
    # The default network changed in v1.7: None before, Default after.
    assert task["Network"] == {"Type": "None" if version == "1.6" else "Default"}
    assert isinstance(shown["CreateTime"], int) and shown["CreateTime"] > 10**18


def test_blank_name_becomes_the_id_and_ops_count_zero(orch: Factory) -> None:
    client = orch()
    job_id = put(client, job(name="", kind="ops", Count=1)).json()["JobID"]
    shown = get(client, job_id).json()["Job"]
    assert (shown["Name"], shown["Count"]) == (job_id, 0)
    explicit = put(client, job("zero", Count=0)).json()["JobID"]
    assert get(client, explicit).json()["Job"]["Count"] == 0  # only an omitted Count is 1


def test_client_telemetry_headers_land_in_meta(orch: Factory) -> None:
    client = orch()
    reply = client.put(JOBS, json={"Job": job()}, headers={"X-Bacalhau-InstallationID": "i-1"})
    meta = get(client, reply.json()["JobID"]).json()["Job"]["Meta"]
    assert meta["bacalhau.org/client.installation.id"] == "i-1"


def test_rerun_makes_a_new_version_from_the_chosen_one(orch: Factory) -> None:
    client = orch("1.9", job_duration=0.05)
    job_id = put(client, job()).json()["JobID"]
    put(client, job(Labels={"v": "2"}))
    time.sleep(0.1)
    reply = client.put(f"{JOBS}/hello/rerun", json={"Namespace": "default", "JobVersion": 1,
                                                    "Reason": "again"})
    assert reply.json()["JobID"] == job_id and reply.json()["JobVersion"] == 3
    shown = get(client, "hello").json()["Job"]
    assert (shown["Version"], shown["Labels"]) == (3, {})
    error(client.put(f"{JOBS}/nope/rerun", json={}), 400, "BadRequest", "job not found: nope")


def test_name_mode_updates_in_place_refuses_no_change_and_forces(orch: Factory) -> None:
    client = orch("1.9")
    first = put(client, job()).json()["JobID"]
    same = put(client, job())
    body = error(same, 500, "", "no changes detected for new job spec")
    assert body["Hint"] == "Use the --force flag to override this warning"
    assert get(client, "hello").json()["Job"]["Version"] == 1  # nothing written
    changed = put(client, job(Labels={"team": "data"}))
    assert changed.json()["JobID"] == first
    shown = get(client, "hello").json()["Job"]
    assert (shown["ID"], shown["Version"], shown["Labels"]) == (first, 2, {"team": "data"})
    forced = put(client, job(Labels={"team": "data"}), force=True)
    assert forced.json()["JobID"] == first
    assert get(client, "hello").json()["Job"]["Version"] == 3
    assert len(stored(client)) == 1
    versions = client.get(f"{JOBS}/hello/versions").json()["Items"]
    assert [v["Version"] for v in versions] == [1, 2, 3]
    assert get(client, "hello", job_version="1").json()["Job"]["Labels"] == {}


def test_resource_case_does_not_count_as_a_change(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job(task={"Resources": {"Memory": "1Gb"}}))
    error(put(client, job(task={"Resources": {"Memory": "1gb"}})), 500, "", "no changes")


def test_label_mode_creates_a_new_job_for_every_put(orch: Factory) -> None:
    client = orch("1.6")
    first = client.put(JOBS, json={"Job": job(), "Force": "yes"}).json()["JobID"]  # unknown
    second = put(client, job()).json()["JobID"]
    assert first != second and len(stored(client)) == 2
    # No name index before v1.8: a name is looked up as an id prefix only.
    error(get(client, "hello"), 404, "NotFound", "job not found: hello")
    assert client.put(f"{JOBS}/diff", json={"Job": job()}).status_code == 405


def test_update_revives_a_completed_job_keeps_the_type(orch: Factory) -> None:
    client = orch("1.9", job_duration=0.05)
    job_id = put(client, job()).json()["JobID"]
    time.sleep(0.1)
    assert get(client, job_id).json()["Job"]["State"]["StateType"] == "Completed"
    put(client, job(kind="service", Labels={"v": "2"}))
    shown = get(client, job_id).json()["Job"]
    assert (shown["Version"], shown["Type"]) == (2, "batch")
    assert shown["State"]["StateType"] in ("Pending", "Running")


def test_diff_describes_the_change_and_writes_nothing(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job())
    reply = client.put(f"{JOBS}/diff", json={"Job": job(Labels={"team": "x"})})
    assert reply.status_code == 200 and "team" in reply.json()["Diff"]
    assert get(client, "hello").json()["Job"]["Version"] == 1
    error(client.put(f"{JOBS}/diff", json={"Job": job(name="")}), 400, "InternalError",
          "invalid job spec: name is missing")
    error(client.put(f"{JOBS}/diff", json={"Job": job(name="other")}), 404, "NotFound",
          "job name index not found: other:default")


def test_concurrent_creates_of_one_name_race_into_a_409(orch: Factory) -> None:
    client = orch("1.9", latency=0.2)
    url = str(client.base_url)

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            return list(await asyncio.gather(*(http.put(JOBS, json={"Job": job()})
                                               for _ in range(2))))

    replies = asyncio.run(both())
    assert sorted(r.status_code for r in replies) == [200, 409]
    [lost] = [r for r in replies if r.status_code == 409]
    body = error(lost, 409, "ResourceInUse", "job name hello already exists in namespace default")
    assert body["Component"] == "JobStore"
    assert len(stored(client)) == 1


# --- lookups -------------------------------------------------------------------------------


def test_get_by_short_id_and_ambiguous_prefix(orch: Factory) -> None:
    client = orch("1.9")
    first = put(client, job("a")).json()["JobID"]
    second = put(client, job("b")).json()["JobID"]
    assert get(client, first[:10]).json()["Job"]["ID"] == first
    body = error(get(client, "j-"), 500, "MultipleJobsFound", "multiple jobs found for id j-")
    assert body["Hint"] == "Use full job ID"
    # The trap: a name that is not there but is an id prefix finds some other job.
    if not second.startswith(first[:6]):
        assert get(client, first[:6]).json()["Job"]["Name"] == "a"
    error(get(client, "j-00000000-0000-4000-8000-000000000000"), 404, "NotFound",
          "job not found")


def test_name_lookup_is_per_namespace_and_include_is_one_of(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job(Namespace="team-a"))
    error(get(client, "hello"), 404, "NotFound", "job not found: hello")
    reply = get(client, "hello", namespace="team-a", include="executions")
    [execution] = reply.json()["Executions"]["Items"]
    assert execution["ComputeState"]["StateType"] == 6 and execution["JobVersion"] == 1
    history = get(client, "hello", namespace="team-a", include="history").json()["History"]
    assert history["Items"][0]["Event"]["Message"] == "Job submitted"
    error(get(client, "hello", namespace="team-a", include="history,executions"), 400,
          "InternalError", "invalid include")


# --- list ----------------------------------------------------------------------------------


def test_list_by_namespace_labels_and_pages(orch: Factory) -> None:
    client = orch("1.9")
    for index in range(5):
        put(client, job(f"j{index}", Namespace="rc", Labels={"managed-by": "reconciler",
                                                             "n": str(index)}))
    put(client, job("other", Namespace="rc", Labels={"managed-by": "someone"}))
    put(client, job("elsewhere"))
    assert len(client.get(JOBS).json()["Items"]) == 7  # no namespace: every namespace
    assert len(client.get(JOBS, params={"namespace": "*"}).json()["Items"]) == 7
    params = {"namespace": "rc", "labels": "managed-by=reconciler", "limit": "2"}
    names: list[str] = []
    tokens = 0
    while True:
        page = client.get(JOBS, params=params).json()
        names += [item["Name"] for item in page["Items"]]
        if not page["NextToken"]:
            break
        tokens += 1
        params["next_token"] = page["NextToken"]
    assert names == [f"j{i}" for i in range(5)] and tokens == 2
    newest = client.get(JOBS, params={"namespace": "rc", "reverse": "True", "limit": "1"})
    assert newest.json()["Items"][0]["Name"] == "other"
    several = client.get(JOBS, params=[("namespace", "rc"), ("labels", "managed-by"),
                                       ("labels", "n in (1,3)")])
    assert [i["Name"] for i in several.json()["Items"]] == ["j1", "j3"]
    absent = client.get(JOBS, params={"namespace": "rc", "labels": "!n"})
    assert [i["Name"] for i in absent.json()["Items"]] == ["other"]


def test_list_errors(orch: Factory) -> None:
    client = orch("1.9")
    error(client.get(JOBS, params={"labels": "a in (b"}), 400, "InternalError",
          "unable to parse requirement")
    error(client.get(JOBS, params={"labels": "uid=" + "a" * 64}), 400, "InternalError",
          "unable to parse requirement")
    error(client.get(JOBS, params={"next_token": "!!"}), 400, "InternalError",
          "invalid pagination token")
    error(client.get(JOBS, params={"order_by": "id"}), 500, "InternalError",
          "Internal server error")
    error(client.get(JOBS, params={"reverse": "yes"}), 400, "InternalError", "strconv")
    # The SDK's request shape: empty token and order, False spelled the Python way.
    reply = client.get(JOBS, params={"limit": "5", "next_token": "", "reverse": "False",
                                     "order_by": "created_at"})
    assert reply.status_code == 200


# --- stop ----------------------------------------------------------------------------------


def test_stop_takes_the_reason_from_the_body_only(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job("a"))
    put(client, job("b"))
    reply = client.request("DELETE", f"{JOBS}/a", json={"reason": "manifest removed"})
    assert reply.status_code == 200 and reply.json()["EvaluationID"]
    state = get(client, "a").json()["Job"]["State"]
    assert state == {"StateType": "Stopped", "Message": "manifest removed"}
    again = client.request("DELETE", f"{JOBS}/a", json={"reason": "again"})
    assert again.json() == {"EvaluationID": ""}  # idempotent
    client.request("DELETE", f"{JOBS}/b", params={"reason": "lost"}, json={})
    assert get(client, "b").json()["Job"]["State"] == {"StateType": "Stopped"}
    [execution] = get(client, "b", include="executions").json()["Executions"]["Items"]
    assert (execution["DesiredState"]["StateType"], execution["ComputeState"]["StateType"]) == (
        2, 11)


def test_stop_namespace_from_query_or_body(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job(Namespace="ns"))
    error(client.delete(f"{JOBS}/hello"), 404, "NotFound", "job not found: hello")
    reply = client.request("DELETE", f"{JOBS}/hello", params={"namespace": "wrong"},
                           json={"Namespace": "ns"})
    assert reply.status_code == 200


def test_stop_terminal_jobs_by_state(orch: Factory) -> None:
    client = orch("1.9", job_duration=0.05)
    put(client, job("done"))
    put(client, job("broken", Meta={"devnet/fail": "true"}))
    time.sleep(0.1)
    assert get(client, "broken").json()["Job"]["State"]["StateType"] == "Failed"
    error(client.delete(f"{JOBS}/done"), 500, "", "cannot stop job in state Completed")
    error(client.delete(f"{JOBS}/broken"), 500, "ConflictJobState",
          "job j-")
    error(client.delete(f"{JOBS}/gone"), 404, "NotFound", "job not found: gone")


# --- job states ----------------------------------------------------------------------------


def test_batch_and_ops_complete_service_and_daemon_never_do(orch: Factory) -> None:
    client = orch("1.9", job_duration=0.05)
    for kind in ("batch", "ops", "service", "daemon"):
        put(client, job(kind, kind=kind))
    time.sleep(0.1)
    states = {kind: get(client, kind).json()["Job"]["State"]["StateType"]
              for kind in ("batch", "ops", "service", "daemon")}
    assert states == {"batch": "Completed", "ops": "Completed", "service": "Running",
                      "daemon": "Running"}
    [execution] = get(client, "batch", include="executions").json()["Executions"]["Items"]
    assert execution["ComputeState"]["StateType"] == 9
    history = client.get(f"{JOBS}/batch/history", params={"event_type": "job"}).json()
    assert [h["Event"]["Details"].get("NewState") for h in history["Items"]] == [
        "Pending", "Running", "Completed"]
    assert client.get(f"{JOBS}/batch/results").json()["Items"] == [
        {"Type": "noop", "Params": {}}]
    error(client.get(f"{JOBS}/service/results"), 500, "InternalError", "Internal server error")


def test_total_timeout_counts_from_create_time(orch: Factory) -> None:
    client = orch("1.9")
    put(client, job("t", kind="service", task={"Timeouts": {"TotalTimeout": 1}}))
    time.sleep(1.05)
    state = get(client, "t").json()["Job"]["State"]
    assert state["StateType"] == "Failed" and "timed out" in state["Message"]


# --- validation ----------------------------------------------------------------------------

BAD_JOBS: list[tuple[dict[str, Any], str, str]] = [
    (job(kind="cron"), "InternalError", "invalid job type"),
    (job(Count=-1), "InternalError", "job count must be >= 0"),
    (job(kind="daemon", Count=2), "InternalError", "job count must be 0 or 1"),
    ({**job(), "Tasks": []}, "InternalError", "missing job tasks"),
    (job(Constraints=[{"Key": "r", "Operator": "in"}]), "InternalError", "constraint r in"),
    (job(Constraints=[{"Key": "r", "Operator": "=", "Values": ["a", "b"]}]), "InternalError",
     "constraint r = needs exactly one value"),
    (job(task={"Name": " "}), "InternalError", "task name"),
    (job(task={"Env": {"lower": "x"}}), "InternalError", "invalid environment variable"),
    (job(task={"Env": {"BACALHAU_X": "x"}}), "InternalError", "environment variable BACALHAU_X"),
    (job(task={"Engine": {"Type": ""}}), "InternalError", "engine type"),
    (job(task={"Timeouts": {"ExecutionTimeout": -1}}), "InternalError", "ExecutionTimeout"),
    (job(task={"Resources": {"CPU": "lots"}}), "InternalError", "invalid CPU value"),
    (job(task={"Resources": {"Memory": "1 potato"}}), "InternalError", "invalid memory"),
    (job(task={"InputSources": [{"Source": {"Type": "ipfs"}}]}), "InternalError",
     "input source target"),
    (job(task={"ResultPaths": [{"Name": "o", "Path": "out"}]}), "InternalError",
     "result path 'out' must be absolute"),
    (job(task={"Network": {"Type": "None", "Domains": ["example.com"]}}), "InternalError",
     "domains are only allowed"),
    (job(task={"Network": {"Type": "Wormhole"}}), "InternalError", "invalid network type"),
    (job(Count="1"), "InternalError", "json: cannot unmarshal string"),
    (job(task={"Publisher": None, "ResultPaths": [{"Name": "o", "Path": "/o"}]}), "BadRequest",
     "task main: a publisher is required"),
    (job(task={"Timeouts": {"TotalTimeout": 5, "ExecutionTimeout": 6}}), "BadRequest",
     "task main: execution timeout plus queue timeout"),
]


@pytest.mark.parametrize("version", ["1.6", "1.9"])
def test_invalid_jobs_are_400_and_store_nothing(orch: Factory, version: str) -> None:
    client = orch(version)
    for body, code, message in BAD_JOBS:
        reply = put(client, body)
        envelope = error(reply, 400, code, message)
        assert envelope["Component"] == ("APIServer" if code == "InternalError" else "JobStore")
    error(client.put(JOBS, json={}), 400, "InternalError", "empty/nil job")
    if version == "1.9":  # before v1.8 Force is an unknown key, ignored whatever its type
        error(client.put(JOBS, json={"Job": job(), "Force": "yes"}), 400, "InternalError",
              "json")
    error(client.put(JOBS, content=b"{", headers={"content-type": "application/json"}), 400,
          "InternalError", "Syntax error")
    assert stored(client) == []


def test_network_names_differ_by_version(orch: Factory) -> None:
    old, new = orch("1.6"), orch("1.9")
    full = job(task={"Network": {"Type": " full "}})
    assert get(old, put(old, full).json()["JobID"]).json()["Job"]["Tasks"][0]["Network"] == {
        "Type": "Host"}
    assert put(new, full).status_code == 200
    error(put(old, job(task={"Network": {"Type": "Default"}})), 400, "InternalError",
          "invalid network type")


def test_wrong_content_type_is_415_and_wrong_method_405(orch: Factory) -> None:
    client = orch("1.9")
    reply = client.put(JOBS, content=json.dumps({"Job": job()}).encode(),
                       headers={"content-type": "text/plain"})
    error(reply, 415, "InternalError", "Unsupported Media Type")
    error(client.patch(JOBS), 405, "InternalError", "Method Not Allowed")
    error(client.get("/api/v1/nope"), 404, "NotFound", "")
    error(orch("1.6").get("/api/v1/nope"), 404, "InternalError", "Not Found")
    assert stored(client) == []


def test_chunked_bodies_fail_in_the_authoriser(orch: Factory) -> None:
    client = orch("1.9")

    def chunks() -> Iterator[bytes]:
        yield json.dumps({"Job": job()}).encode()

    reply = client.put(JOBS, content=chunks(), headers={"content-type": "application/json"})
    assert reply.request.headers.get("transfer-encoding") == "chunked"
    body = error(reply, 500, "InternalError", "unexpected authorization error")
    assert body["Component"] == "Authorizer"
    assert stored(client) == []


def test_oversized_body_is_413(orch: Factory) -> None:
    client = orch("1.9")
    reply = client.put(JOBS, content=b" " * (10 * 1024 * 1024 + 1),
                       headers={"content-type": "application/json"})
    error(reply, 413, "InternalError", "Request Entity Too Large")


def test_error_envelope_echoes_the_request_id(orch: Factory) -> None:
    client = orch("1.9")
    reply = get(client, "missing")
    assert reply.json()["RequestID"] == "" and reply.headers["x-request-id"]
    tagged = client.get(f"{JOBS}/missing", headers={"X-Request-ID": "req-7"})
    assert tagged.json() == {"Status": 404, "Message": "job not found: missing",
                             "RequestID": "req-7", "Code": "NotFound",
                             "Component": "JobStore"}
    assert tagged.headers["x-request-id"] == "req-7"


def test_old_client_version_header_is_refused(orch: Factory) -> None:
    client = orch("1.9")
    old = client.get(JOBS, headers={"X-Bacalhau-Git-Version": "v1.3.2"})
    assert old.status_code == 403 and old.json()["MinVersion"] == "v1.4.0"
    bad = client.get(JOBS, headers={"X-Bacalhau-Git-Version": "banana"})
    assert bad.status_code == 400 and bad.json() == {"Error": "Invalid client version banana"}
    assert client.get(JOBS, headers={"X-Bacalhau-Git-Version": "v1.9.3"}).status_code == 200


# --- auth ----------------------------------------------------------------------------------


def test_basic_auth(orch: Factory) -> None:
    client = orch("1.9", api_user="ops:s3cret")
    good = httpx.BasicAuth("OPS", "s3cret")
    assert client.put(JOBS, json={"Job": job()}, auth=good).status_code == 200
    reply = client.get(JOBS, auth=httpx.BasicAuth("ops", "wrong"))
    body = error(reply, 401, "Unauthorized", "Request Unauthorized")
    assert "s3cret" not in reply.text and "wrong" not in reply.text
    assert body["Details"]["reason"] == "invalid username or password"
    error(client.get(JOBS, headers={"Authorization": "Bearer " + KEY}), 401, "Unauthorized",
          "Request Unauthorized")


def test_api_key_auth(orch: Factory) -> None:
    client = orch("1.9", api_key=KEY, read_only_api_key="r" * 20)
    assert client.get("/api/v1/agent/version").status_code == 200  # always open
    for headers, reason in (({}, "missing"), ({"Authorization": "Bearer " + "x" * 24}, "invalid"),
                            ({"Authorization": "Digest dTpw"}, "unsupported")):
        reply = client.get(JOBS, headers=headers)
        body = error(reply, 401, "Unauthorized", "Request Unauthorized")
        assert body["Component"] == "Authorizer" and reason in body["Details"]["reason"]
        assert "x-bacalhau-git-version" not in reply.headers  # set after the authoriser
    assert KEY not in client.get(JOBS).text
    good = {"Authorization": f"Bearer {KEY}"}
    assert client.put(JOBS, json={"Job": job()}, headers=good).status_code == 200
    reader = {"Authorization": "Bearer " + "r" * 20}
    assert client.get(JOBS, headers=reader).status_code == 200
    error(client.put(JOBS, json={"Job": job("x")}, headers=reader), 403, "Forbidden",
          "Request Forbidden")


# --- faults and persistence ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.6", "1.9"])
def test_fail_after_store_answers_server_timeout(orch: Factory, version: str) -> None:
    client = orch(version, fail_after_store=1.0)
    reply = put(client, job())
    assert (reply.status_code, reply.text) == (503, "Server Timeout!\n")
    assert reply.headers["content-type"].startswith("text/plain")
    assert len(stored(client)) == 1
    assert client.get("/devnet/stats").json()["fail_after_store"] == 1


def test_drop_and_error_rate(orch: Factory) -> None:
    dropping = orch("1.9", drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        put(dropping, job())
    assert len(stored(dropping)) == 1
    failing = orch("1.9", error_rate=1.0, seed=3)
    statuses = {put(failing, job()).status_code for _ in range(12)}
    assert statuses == {429, 500, 503}
    assert stored(failing) == []
    assert failing.get("/api/v1/agent/version").status_code == 200  # detection stays reliable


def test_latency_and_submit_latency(orch: Factory) -> None:
    client = orch("1.9", latency=0.2, submit_latency=0.2)
    started = time.monotonic()
    assert put(client, job()).status_code == 200
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    client.get(JOBS)
    assert 0.2 <= time.monotonic() - started < 0.4


def test_command_line_flags_and_state_file_across_restarts(
    dev_factory: Callable[..., DevProcess], tmp_path: Path
) -> None:
    state = str(tmp_path / "orch.jsonl")
    auth = {"Authorization": f"Bearer {KEY}"}
    dev = dev_factory("--bacalhau-version", "1.9", "--api-key", KEY, "--state-file", state,
                      "--fail-after-store", "1")
    assert httpx.get(dev.url + JOBS).status_code == 401
    reply = httpx.put(dev.url + JOBS, json={"Job": job()}, headers=auth)
    assert (reply.status_code, reply.text) == (503, "Server Timeout!\n")
    [recorded] = dev.jobs()
    httpx.request("DELETE", dev.url + JOBS + "/hello", json={"reason": "bye"}, headers=auth)
    dev.stop()
    again = dev_factory("--bacalhau-version", "1.9", "--state-file", state)
    shown = httpx.get(again.url + JOBS + "/hello").json()["Job"]
    assert (shown["ID"], shown["State"]) == (recorded["ID"], {"StateType": "Stopped",
                                                              "Message": "bye"})
    # Same spec: still "no changes" (the job stays Stopped); Force runs it again.
    assert httpx.put(again.url + JOBS, json={"Job": job()}).status_code == 500
    forced = httpx.put(again.url + JOBS, json={"Job": job(), "Force": True})
    assert forced.json()["JobID"] == recorded["ID"]
    assert httpx.get(again.url + JOBS + "/hello").json()["Job"]["Version"] == 2


# --- the official Python SDK ---------------------------------------------------------------


def test_python_sdk_orchestrator_calls(
    orch: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sdk_jobs = pytest.importorskip("bacalhau_sdk.jobs")
    models = pytest.importorskip("bacalhau_apiclient.models")
    client = orch("1.9")
    host, port = str(client.base_url.host), client.base_url.port
    assert port is not None
    monkeypatch.setenv("BACALHAU_API_HOST", host)
    monkeypatch.setenv("BACALHAU_API_PORT", str(port))
    monkeypatch.setenv("BACALHAU_DIR", str(tmp_path))
    task = models.Task(
        name="main",
        engine=models.SpecConfig(type="docker", params={"Image": "ubuntu",
                                                         "Entrypoint": ["echo", "hello"]}),
        publisher=models.SpecConfig(type="noop"))
    spec = models.Job(name="sdk-probe docker echo", type="batch", count=1, tasks=[task])
    jobs = sdk_jobs.Jobs()
    put_reply = jobs.put(models.ApiPutJobRequest(job=spec))
    job_id = put_reply.job_id
    assert job_id.startswith("j-")
    listed = jobs.list(limit=5)
    assert [item.id for item in listed.items] == [job_id]
    assert jobs.get(job_id).job.name == "sdk-probe docker echo"
    assert jobs.executions(job_id).items[0].compute_state.state_type == 6
    assert jobs.history(job_id).items[0].type == "ExecutionLevel"
    assert jobs.results(job_id).items == []
    assert jobs.stop(job_id, reason="sdk-probe cancel") is not None
    # The SDK sends its reason as ?reason=, which the server never binds.
    assert get(client, job_id).json()["Job"]["State"] == {"StateType": "Stopped"}
    jobs.orchestrator_service.api_client.pool.close()



@pytest.mark.parametrize("version", ["1.0", "1.9"])
def test_replies_are_not_held_back_by_nagle(version: str) -> None:
    """uvicorn writes the head and the body separately; without TCP_NODELAY on the accepted
    sockets the body waited for the client's delayed ACK: ~40 ms per request on loopback."""
    with DevRequesterThread(DevConfig(bacalhau_version=version)) as dev, httpx.Client(
            base_url=dev.url) as client:
        client.get("/api/v1/agent/version")
        took = []
        for _ in range(21):
            started = time.perf_counter()
            client.get("/api/v1/agent/version")
            took.append(time.perf_counter() - started)
    assert sorted(took)[10] < 0.02, f"median {sorted(took)[10] * 1000:.1f} ms"
