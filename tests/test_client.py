"""The API client against a real dev requester process on a loopback port.

Covers the status and error rows of docs/wire-legacy.md (Submit, Cancel, List), and asserts on
what the requester recorded (its own list route), not only on what the client returned.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from reconciler.backends.legacy import (
    AlreadyTerminal,
    ApiClient,
    InvalidRequest,
    NoExecutions,
    NotAuthorized,
    NotFound,
    OutcomeUnknown,
    RetryPolicy,
    TransientError,
    Unreachable,
)
from reconciler.backends.signing import Signer, load_signer, signed_body
from reconciler.domain.spec import parse_spec, to_wire
from tests.conftest import DevProcess

T = TypeVar("T")
FAST_RETRY = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05)


def noop_spec(*annotations: str) -> dict[str, Any]:
    return to_wire(parse_spec({"Engine": "noop", "Publisher": "noop",
                               "Annotations": list(annotations)}))


def run(factory: Callable[[ApiClient], Awaitable[T]], url: str, signer: Signer) -> T:
    async def main() -> T:
        async with ApiClient(url, signer, retry=FAST_RETRY, timeout=5) as client:
            return await factory(client)

    return asyncio.run(main())


def test_submit_is_recorded_by_the_requester(dev: DevProcess, signer: Signer) -> None:
    job_id = run(lambda c: c.submit(noop_spec("reconciler-uid:a1")), dev.url, signer)
    [recorded] = dev.jobs()
    assert recorded["Job"]["Metadata"]["ID"] == job_id
    assert recorded["Job"]["Metadata"]["ClientID"] == signer.client_id
    assert recorded["Job"]["Spec"]["Annotations"] == ["reconciler-uid:a1"]
    assert recorded["Job"]["Spec"]["PublisherSpec"]["Type"] == "Noop"
    assert recorded["State"]["State"] == "New"


def test_ed25519_client_is_accepted(dev: DevProcess, ed_key: Path) -> None:
    ed = load_signer(ed_key)
    job_id = run(lambda c: c.submit(noop_spec()), dev.url, ed)
    assert [j["Job"]["Metadata"]["ClientID"] for j in dev.jobs(id=job_id)] == [ed.client_id]


def test_replies_are_text_plain_json_at_both_prefixes(dev: DevProcess, signer: Signer) -> None:
    for prefix in ("", "/api/v1"):
        reply = httpx.post(f"{dev.url}{prefix}/requester/list", json={})
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/plain; charset=utf-8"
        assert reply.json() == {"jobs": []}
    assert httpx.post(dev.url + "/api/v1/requester/list/").status_code == 404


def test_bad_signature_is_400(dev: DevProcess, signer: Signer) -> None:
    body = signed_body(signer, {"APIVersion": "V1beta1", "ClientID": signer.client_id,
                                "Spec": noop_spec()})
    tampered = body.replace(b'"Noop"', b'"Noop" ', 1)
    reply = httpx.post(dev.url + "/api/v1/requester/submit", content=tampered)
    assert reply.status_code == 400
    assert "signature is invalid" in reply.json()["Message"]
    assert dev.jobs() == []


def test_mismatched_client_id_is_400(dev: DevProcess, signer: Signer, other_rsa_key: Path) -> None:
    other = load_signer(other_rsa_key)
    body = signed_body(signer, {"APIVersion": "V1beta1", "ClientID": other.client_id,
                                "Spec": noop_spec()})
    reply = httpx.post(dev.url + "/api/v1/requester/submit", content=body)
    assert reply.status_code == 400
    assert reply.json()["Message"].endswith("client's public key does not match client ID")


def test_invalid_spec_maps_to_invalid_request(dev: DevProcess, signer: Signer) -> None:
    bad = {"Engine": "Noop", "PublisherSpec": {"Type": "Noop"}, "Deal": {"Concurrency": 0}}
    with pytest.raises(InvalidRequest, match="concurrency must be >= 1"):
        run(lambda c: c.submit(bad), dev.url, signer)
    numeric = {"Engine": 2, "PublisherSpec": {"Type": "Noop"}, "Deal": {"Concurrency": 1}}
    with pytest.raises(InvalidRequest, match="cannot unmarshal"):
        run(lambda c: c.submit(numeric), dev.url, signer)
    assert dev.jobs() == []


def test_client_job_id_header_is_refused(dev: DevProcess, signer: Signer) -> None:
    body = signed_body(signer, {"APIVersion": "V1beta1", "ClientID": signer.client_id,
                                "Spec": noop_spec()})
    reply = httpx.post(dev.url + "/api/v1/requester/submit", content=body,
                       headers={"X-Bacalhau-Job-ID": "mine"})
    assert reply.status_code == 400


def test_missing_spec_drops_the_connection(dev: DevProcess, signer: Signer) -> None:
    body = signed_body(signer, {"APIVersion": "V1beta1", "ClientID": signer.client_id})
    with pytest.raises(httpx.TransportError):
        httpx.post(dev.url + "/api/v1/requester/submit", content=body)


def test_cancel_by_a_non_owner_is_401(dev: DevProcess, signer: Signer, other_rsa_key: Path) -> None:
    job_id = run(lambda c: c.submit(noop_spec()), dev.url, signer)
    with pytest.raises(NotAuthorized, match="mismatched ClientIDs"):
        run(lambda c: c.cancel(job_id, "not mine"), dev.url, load_signer(other_rsa_key))
    assert dev.jobs(id=job_id)[0]["State"]["State"] == "New"


def test_cancel_of_unknown_job_is_404(dev: DevProcess, signer: Signer) -> None:
    with pytest.raises(NotFound) as info:
        run(lambda c: c.cancel("00000000-0000-4000-8000-000000000000", "x"), dev.url, signer)
    assert info.value.status == 404


def test_cancel_is_idempotent(dev: DevProcess, signer: Signer) -> None:
    async def twice(c: ApiClient) -> tuple[str, str]:
        job_id = await c.submit(noop_spec())
        return await c.cancel(job_id, "removed"), await c.cancel(job_id, "again")

    assert run(twice, dev.url, signer) == ("Cancelled", "Cancelled")
    assert dev.jobs()[0]["State"]["State"] == "Cancelled"


def test_cancel_after_completion_is_already_terminal(
    dev_factory: Callable[..., DevProcess], signer: Signer
) -> None:
    dev = dev_factory("--job-duration", "0.2")
    done = run(lambda c: c.submit(noop_spec()), dev.url, signer)
    failed = run(lambda c: c.submit(noop_spec("devnet:fail")), dev.url, signer)
    time.sleep(0.4)
    with pytest.raises(AlreadyTerminal, match="cannot cancel job in state Completed"):
        run(lambda c: c.cancel(done, "late"), dev.url, signer)
    with pytest.raises(AlreadyTerminal, match="is in terminal state Error"):
        run(lambda c: c.cancel(failed, "late"), dev.url, signer)
    states = {j["Job"]["Metadata"]["ID"]: j["State"]["State"] for j in dev.jobs()}
    assert states == {done: "Completed", failed: "Error"}


def test_list_filters(dev: DevProcess, signer: Signer, other_rsa_key: Path) -> None:
    mine_a = run(lambda c: c.submit(noop_spec("team-a", "x")), dev.url, signer)
    mine_b = run(lambda c: c.submit(noop_spec("team-b")), dev.url, signer)
    theirs = run(lambda c: c.submit(noop_spec("team-a")), dev.url, load_signer(other_rsa_key))
    ours = run(lambda c: c.list_jobs(), dev.url, signer)
    assert {j.job_id for j in ours} == {mine_a, mine_b}
    tagged = run(lambda c: c.list_jobs(include_tags=["team-a"]), dev.url, signer)
    assert [j.job_id for j in tagged] == [mine_a]
    assert {j["Job"]["Metadata"]["ID"] for j in dev.jobs(exclude_tags=["x"])} == {mine_b, theirs}
    assert len(dev.jobs(max_jobs=1)) == 1
    by_id = run(lambda c: c.list_jobs(job_id=mine_b), dev.url, signer)
    assert [j.job_id for j in by_id] == [mine_b]
    short = dev.jobs(id=mine_b[:8])
    assert short[0]["Job"]["Metadata"]["ID"] == mine_b
    with pytest.raises(NotFound, match="Job not found"):
        run(lambda c: c.list_jobs(job_id="00000000-0000-4000-8000-000000000000"), dev.url, signer)


def test_states_of_unknown_job(dev: DevProcess, signer: Signer) -> None:
    with pytest.raises(NotFound):
        run(lambda c: c.state("nope"), dev.url, signer)
    reply = httpx.post(dev.url + "/api/v1/requester/states", json={"job_id": "nope"})
    assert reply.status_code == 500
    assert reply.text == "Job not found. ID: nope\n"


def test_429_and_503_are_retried(dev_factory: Callable[..., DevProcess], signer: Signer) -> None:
    dev = dev_factory("--error-rate", "0.4", "--seed", "1", "--job-duration", "30")

    async def sequential(client: ApiClient) -> list[object]:
        # One request at a time, so the seeded fault sequence (and this test) is deterministic;
        # seed 1 never faults more than 3 times in a row over these draws.
        return [await client.list_jobs() for _ in range(20)]

    assert len(run(sequential, dev.url, signer)) == 20
    stats = dev.stats()
    assert stats["faults"] >= 5
    assert stats["/requester/list"] == 20 + stats["faults"]  # every fault was retried


def test_retries_are_bounded(dev_factory: Callable[..., DevProcess], signer: Signer) -> None:
    dev = dev_factory("--error-rate", "1.0", "--seed", "1")
    with pytest.raises(TransientError):
        run(lambda c: c.list_jobs(), dev.url, signer)
    assert dev.stats()["/requester/list"] == FAST_RETRY.attempts


def test_submit_then_500_is_outcome_unknown_and_resolved_by_uid(
    dev_factory: Callable[..., DevProcess], signer: Signer
) -> None:
    dev = dev_factory("--fail-after-store", "1.0", "--job-duration", "30")
    with pytest.raises(OutcomeUnknown) as info:
        run(lambda c: c.submit(noop_spec("reconciler-uid:f00d")), dev.url, signer)
    assert info.value.job_id  # X-Bacalhau-Job-ID of the failed reply
    found = run(lambda c: c.list_jobs(include_tags=["reconciler-uid:f00d"]), dev.url, signer)
    assert [j.job_id for j in found] == [info.value.job_id]
    assert len(dev.jobs()) == 1  # stored once, never resubmitted by the client


def test_dropped_reply_is_outcome_unknown_and_never_resent(
    dev_factory: Callable[..., DevProcess], signer: Signer
) -> None:
    dev = dev_factory("--drop-rate", "1.0", "--job-duration", "30")
    with pytest.raises(OutcomeUnknown):
        run(lambda c: c.submit(noop_spec("reconciler-uid:d00d")), dev.url, signer)
    found = run(lambda c: c.list_jobs(include_tags=["reconciler-uid:d00d"]), dev.url, signer)
    assert len(found) == 1
    assert dev.stats()["/requester/submit"] == 1


def test_timeout_after_send_is_outcome_unknown(
    dev_factory: Callable[..., DevProcess], signer: Signer
) -> None:
    dev = dev_factory("--latency", "1.0")

    async def impatient() -> str:
        async with ApiClient(dev.url, signer, retry=FAST_RETRY, timeout=0.3) as client:
            return await client.submit(noop_spec())

    with pytest.raises(OutcomeUnknown):
        asyncio.run(impatient())
    time.sleep(1.0)
    assert len(dev.jobs()) == 1
    assert dev.stats()["/requester/submit"] == 1


def test_unreachable_requester(tmp_path: Path, signer: Signer) -> None:
    with pytest.raises(Unreachable) as failure:
        run(lambda c: c.submit(noop_spec()), "http://ops:pw-123@127.0.0.1:9", signer)
    message = str(failure.value)  # names the endpoint, never its credentials
    assert "cannot connect to http://" in message and "127.0.0.1:9" in message
    assert "pw-123" not in message


def test_approve_on_the_compute_side(
    dev_factory: Callable[..., DevProcess], signer: Signer, other_rsa_key: Path
) -> None:
    dev = dev_factory("--approver", signer.client_id, "--job-duration", "0.2")
    approved = run(lambda c: c.submit(noop_spec()), dev.url, signer)
    refused = run(lambda c: c.submit(noop_spec()), dev.url, signer)
    time.sleep(0.3)
    waiting = dev.jobs(id=approved)[0]["State"]
    assert waiting["State"] == "New"
    assert waiting["Executions"][0]["State"] == "AskForBid"
    with pytest.raises(NotAuthorized, match="unknown client"):
        run(lambda c: c.approve(dev.url, approved), dev.url, load_signer(other_rsa_key))
    run(lambda c: c.approve(dev.url, approved, reason="ok"), dev.url, signer)
    run(lambda c: c.approve(dev.url, refused, should_bid=False, reason="policy"), dev.url, signer)
    with pytest.raises(NoExecutions, match="no executions found for job"):
        run(lambda c: c.approve(dev.url, approved), dev.url, signer)
    time.sleep(0.4)
    states = {j["Job"]["Metadata"]["ID"]: j["State"]["State"] for j in dev.jobs()}
    assert states == {approved: "Completed", refused: "Error"}


def test_state_file_survives_a_restart(
    dev_factory: Callable[..., DevProcess], signer: Signer, tmp_path: Path
) -> None:
    journal = tmp_path / "jobs.jsonl"
    first = dev_factory("--state-file", str(journal), "--job-duration", "30")
    job_id = run(lambda c: c.submit(noop_spec()), first.url, signer)
    first.stop()
    second = dev_factory("--state-file", str(journal), "--job-duration", "30")
    assert [j["Job"]["Metadata"]["ID"] for j in second.jobs()] == [job_id]
    memory_only = dev_factory()
    assert memory_only.jobs() == []


def test_every_request_is_a_structured_event(dev: DevProcess, signer: Signer) -> None:
    job_id = run(lambda c: c.submit(noop_spec()), dev.url, signer)
    dev.stop()
    events = [json.loads(line) for line in dev.log.read_text().splitlines()
              if line.startswith("{")]
    submits = [e for e in events if e.get("event") == "devnet.request"
               and e["path"].endswith("/submit")]
    assert submits and submits[0]["job_id"] == job_id and submits[0]["status"] == 200
