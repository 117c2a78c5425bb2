"""Long-running jobs (issue 14): a service or daemon job is kept running, so any end of it is
drift (docs/design.md, "Long-running jobs").

The planner's rules and observe's event in-process (tests/fakes.py); then end to end: the real
CLI's ``apply`` against a real ``dev-requester --bacalhau-version 1.9`` process, where someone
stops the jobs with a plain HTTP DELETE and the reconciler brings back those whose policy says so.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from structlog.testing import capture_logs

from reconciler.app.cli import main
from reconciler.backends.orchestrator import job_info
from reconciler.domain.desired import Desired
from reconciler.domain.manifest import ORCHESTRATOR, Manifest, Policy
from reconciler.domain.plan import Action, Decision, PlanPolicy, plan
from reconciler.domain.records import Phase, Record
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import PassResult
from reconciler.ports import JobInfo, JobPhase
from tests.conftest import DevProcess
from tests.fakes import FakeStore
from tests.harness import Harness

HASH = "a" * 64
ENDED = [Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED, Phase.LOST]


# --- the planner ---------------------------------------------------------------------------


def decide(job_type: str, phase: Phase, *, attempts: int = 1, next_attempt_at: float = 0.0,
           spec_hash: str = HASH, policy: PlanPolicy | None = None, **manifest_policy: Any
           ) -> Decision:
    manifest = Manifest("svc", b"{}", HASH, "svc.yaml",
                        policy=Policy.model_validate(manifest_policy), form=ORCHESTRATOR,
                        job_type=job_type)
    record = Record("svc", phase, spec_hash, "svc.yaml", job_id="j-1", uid="u",
                    attempts=attempts, next_attempt_at=next_attempt_at)
    desired = Desired(True, manifests={"svc": manifest}, file_count=1)
    [decision] = plan(desired, [record], policy or PlanPolicy(), now=1000.0).decisions
    return decision


@pytest.mark.parametrize("phase", ENDED)
@pytest.mark.parametrize("job_type", ["service", "daemon"])
def test_an_ended_long_running_job_is_drift_brought_back_by_resubmit(
    job_type: str, phase: Phase
) -> None:
    decision = decide(job_type, phase, onFailure="resubmit")
    assert decision.action is Action.RESUBMIT
    assert "drift" in decision.reason and job_type in decision.reason
    assert str(phase) in decision.reason
    assert decision.reason.endswith("attempt 2")


@pytest.mark.parametrize("phase", ENDED)
def test_an_ended_service_with_on_failure_none_stays_and_says_so(phase: Phase) -> None:
    decision = decide("service", phase, onFailure="none")
    assert decision.action is Action.NOOP
    assert "drift" in decision.reason and str(phase) in decision.reason
    assert "the service is not running" in decision.reason
    assert "onFailure: resubmit would bring it back" in decision.reason


def test_a_drifted_service_keeps_the_backoff_and_the_cap() -> None:
    waiting = decide("service", Phase.CANCELLED, next_attempt_at=1010.0, onFailure="resubmit")
    assert (waiting.action, waiting.retry_at) == (Action.WAIT, 1010.0)
    assert "drift" in waiting.reason and "backing off 10s more" in waiting.reason
    now = decide("service", Phase.CANCELLED, next_attempt_at=1010.0, onFailure="resubmit",
                 policy=PlanPolicy(honour_backoff=False))  # a one-shot apply tries at once
    assert now.action is Action.RESUBMIT
    last = decide("service", Phase.FAILED, attempts=3, onFailure="resubmit", maxRetries=3)
    assert last.action is Action.RESUBMIT
    capped = decide("service", Phase.FAILED, attempts=4, onFailure="resubmit", maxRetries=3)
    assert capped.action is Action.NOOP
    assert "maxRetries=3 is used up: the service is not running" in capped.reason


def test_batch_and_ops_rules_are_unchanged() -> None:
    for job_type in ("batch", "ops"):
        stopped = decide(job_type, Phase.CANCELLED, onFailure="resubmit")
        assert stopped.action is Action.NOOP  # cancelled by someone else stays cancelled
        assert "change the manifest to run it again" in stopped.reason
        done = decide(job_type, Phase.COMPLETED, onFailure="resubmit")
        assert (done.action, done.reason) == (Action.NOOP, "unchanged; job completed")
        failed = decide(job_type, Phase.FAILED, onFailure="resubmit")
        assert failed.action is Action.RESUBMIT and "drift" not in failed.reason


def test_a_service_keeps_the_other_rules() -> None:
    refused = decide("service", Phase.ERROR, onFailure="none")
    assert (refused.action, refused.reason) == (Action.SUBMIT,
                                                 "earlier submit failed; attempt 2")
    changed = decide("service", Phase.CANCELLED, spec_hash="b" * 64, onFailure="none")
    assert changed.action is Action.SUBMIT  # a changed spec runs, whatever ended the old job
    assert decide("service", Phase.ACTIVE, onFailure="none").action is Action.NOOP


# --- observe -------------------------------------------------------------------------------


class Jobs:
    """A backend that reports given jobs; observe only reads (``find``, ``status``)."""

    identity = "test"

    def __init__(self, *jobs: JobInfo) -> None:
        self.jobs = {job.job_id: job for job in jobs}

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        raise AssertionError("observe never submits")

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        raise AssertionError("observe looks jobs up by uid")

    async def stop(self, job_id: str, reason: str) -> str:
        raise AssertionError("observe never stops a job")

    async def owner_of(self, job_id: str) -> str | None:
        return None

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        return {j.uid: [j] for j in self.jobs.values() if j.uid in uids}

    async def status(self, job_id: str) -> JobInfo | None:
        return self.jobs.get(job_id)


def observed(records: Sequence[Record], *jobs: JobInfo, policy: PlanPolicy | None = None
             ) -> tuple[dict[str, Record], list[dict[str, Any]]]:
    store = FakeStore(records)
    with capture_logs() as events:
        asyncio.run(observe(store.as_store(), Jobs(*jobs), policy or PlanPolicy(),
                            clock=lambda: 5000.0))
    return dict(store.rows), [dict(e) for e in events]


def active(name: str, **fields: Any) -> Record:
    return Record(name, Phase.ACTIVE, HASH, f"{name}.yaml", job_id=f"j-{name}", uid=f"u-{name}",
                  job_state="Running", **fields)


def job(name: str, phase: JobPhase, state: str, job_type: str) -> JobInfo:
    return JobInfo(f"j-{name}", phase, state, uid=f"u-{name}", job_type=job_type)


def test_observe_reports_any_end_of_a_service_as_drift() -> None:
    records = [active("stopped", attempts=1), active("failed", attempts=2), active("done"),
               active("batch"), active("up")]
    rows, events = observed(
        records, job("stopped", JobPhase.CANCELLED, "Stopped", "service"),
        job("failed", JobPhase.FAILED, "Failed", "daemon"),
        job("done", JobPhase.COMPLETED, "Completed", "service"),
        job("batch", JobPhase.FAILED, "Failed", "batch"),
        job("up", JobPhase.RUNNING, "Running", "service"))
    by_name = {e["name"]: e for e in events}
    assert set(by_name) == {"stopped", "failed", "done", "batch"}
    for name, state, job_type in [("stopped", "Stopped", "service"),
                                  ("failed", "Failed", "daemon"),
                                  ("done", "Completed", "service")]:
        event = by_name[name]
        assert (event["event"], event["log_level"]) == ("job.drift", "warning")
        assert (event["job_id"], event["job_state"], event["job_type"]) == (f"j-{name}", state,
                                                                           job_type)
        assert "drift" in event["reason"] and "onFailure" in event["reason"]
    assert by_name["batch"]["event"] == "job.failed"  # batch: as before
    assert "job_type" not in by_name["batch"]
    assert [rows[n].phase for n in ("stopped", "failed", "done", "up")] == [
        Phase.CANCELLED, Phase.FAILED, Phase.COMPLETED, Phase.ACTIVE]
    # Each drift waits out its backoff before the planner may bring it back.
    assert rows["stopped"].next_attempt_at == 5000.0 + PlanPolicy().backoff(1)
    assert rows["failed"].next_attempt_at == 5000.0 + PlanPolicy().backoff(2)
    assert rows["done"].next_attempt_at > 5000.0


def test_a_service_that_ran_a_good_while_starts_its_retries_afresh() -> None:
    """A service failing once a week must not be out of retries after maxRetries weeks; one
    failing at once still runs out (Kubernetes resets a crash loop after 10 min running)."""
    policy = PlanPolicy(stable_after=600.0)
    records = [active("weekly", attempts=4, updated_at=5000.0 - 7 * 86400),
               active("crashing", attempts=4, updated_at=5000.0 - 30),
               active("unknown", attempts=4)]  # no time recorded: nothing is assumed
    rows, events = observed(records, *(job(n, JobPhase.FAILED, "Failed", "service")
                                       for n in ("weekly", "crashing", "unknown")),
                            policy=policy)
    assert {n: rows[n].attempts for n in rows} == {"weekly": 1, "crashing": 4, "unknown": 4}
    reasons = {e["name"]: e["reason"] for e in events}
    assert "start afresh" in reasons["weekly"] and "afresh" not in reasons["crashing"]
    manifests = {n: Manifest(n, b"{}", HASH, f"{n}.yaml", job_type="service",
                             policy=Policy.model_validate({"onFailure": "resubmit"}))
                 for n in rows}
    decisions = plan(Desired(True, manifests=manifests, file_count=1), rows.values(),
                     PlanPolicy(honour_backoff=False), now=5000.0).decisions
    assert {d.name: d.action for d in decisions} == {
        "weekly": Action.RESUBMIT, "crashing": Action.NOOP, "unknown": Action.NOOP}


def test_the_orchestrator_reports_the_job_type() -> None:
    info = job_info({"ID": "j-1", "Type": "service", "State": {"StateType": "Stopped"}})
    assert (info.phase, info.job_type, info.long_running) == (JobPhase.CANCELLED, "service", True)
    assert not job_info({"ID": "j-2", "Type": "batch"}).long_running
    assert not JobInfo("legacy", JobPhase.FAILED).long_running  # the legacy API: never


# --- end to end: a real dev requester (1.9, name mode) and the real CLI -----------------------


def service(name: str, policy: str, meta: str = "") -> str:
    return (f"apiVersion: reconciler/v1\nkind: Job\nmetadata:\n  name: {name}\njob:\n"
            f"  Type: service\n{meta}  Tasks:\n    - Name: main\n      Engine:\n"
            "        Type: docker\n        Params:\n          Image: nginx:1.27\n"
            f"policy:\n{policy}")


def in_process(h: Harness, command: str, *args: str, expect: int = 0) -> Result:
    """The real CLI in process, on the harness's folder and state (a CLI process costs about a
    second on this machine)."""
    result = CliRunner().invoke(main, [
        "--log-format", "json", command, "--manifests", str(h.root), "--state", str(h.state),
        "--endpoint", h.dev.url, *args])
    assert result.exit_code == expect, result.output
    return result


def stop_by_hand(dev: DevProcess, job_id: str) -> None:
    """Someone else stops a job, as ``bacalhau job stop`` would: a plain DELETE."""
    reply = httpx.request("DELETE", f"{dev.url}/api/v1/orchestrator/jobs/{job_id}",
                          params={"namespace": "default"}, json={"reason": "by hand"},
                          timeout=10)
    assert reply.status_code == 200, reply.text


def test_a_service_stopped_by_someone_else_comes_back_in_place(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    dev = dev_factory("--bacalhau-version", "1.9", "--job-duration", "600")
    h = Harness(tmp_path, dev, rsa_key)
    cli = functools.partial(in_process, h)

    def apply() -> list[dict[str, Any]]:
        return [json.loads(line) for line in cli("apply").stderr.splitlines()
                if line.startswith("{")]

    h.write("kept.yaml", service("kept", "  onFailure: resubmit\n"))
    h.write("left.yaml", service("left", "  onFailure: none\n"))
    h.write("crashes.yaml", service(  # fails at once, every version: the cap stops it
        "crashes", "  onFailure: resubmit\n  maxRetries: 1\n",
        meta='  Meta:\n    devnet/fail: "yes"\n    devnet/duration: "0"\n'))
    apply()
    first = {j["Name"]: j for j in dev.jobs()}
    assert sorted(first) == ["crashes", "kept", "left"]
    for name in ("kept", "left"):
        stop_by_hand(dev, first[name]["ID"])

    events = apply()
    drift = {e["name"]: e for e in events if e["event"] == "job.drift"}
    assert {n: (e["job_state"], e["job_type"]) for n, e in drift.items()} == {
        "kept": ("Stopped", "service"), "left": ("Stopped", "service"),
        "crashes": ("Failed", "service")}
    submitted = {e["name"]: e["reason"] for e in events if e["event"] == "job.submitted"}
    assert sorted(submitted) == ["crashes", "kept"]
    assert "drift: service job" in submitted["kept"] and "cancelled" in submitted["kept"]
    jobs = {j["Name"]: j for j in dev.jobs()}
    kept, left = jobs["kept"], jobs["left"]
    # Name mode: the same name PUT again revives the same job at the next version.
    assert (kept["ID"], kept["Version"], kept["State"]["StateType"]) == (first["kept"]["ID"], 2,
                                                                        "Running")
    assert h.records()["kept"].job_id == first["kept"]["ID"]
    assert (left["ID"], left["Version"], left["State"]["StateType"]) == (first["left"]["ID"], 1,
                                                                        "Stopped")
    assert h.records()["left"].phase is Phase.CANCELLED
    assert len(dev.jobs()) == 3  # no second job of any name

    apply()  # "crashes" failed again at once: maxRetries=1 is used up
    crashes = {j["Name"]: j for j in dev.jobs()}["crashes"]
    assert (crashes["Version"], crashes["State"]["StateType"]) == (2, "Failed")
    assert h.records()["crashes"].attempts == 2
    shown = cli("plan", "--json", "--all").stdout
    assert "maxRetries=1 is used up: the service is not running" in shown
    assert "onFailure: resubmit would bring it back" in shown


def test_label_mode_brings_a_stopped_service_back_as_a_new_job(
    tmp_path: Path, dev_factory: Callable[..., DevProcess], rsa_key: Path
) -> None:
    """v1.5 - v1.7 have no name index: the resubmit is a new job, recorded in place of the old."""
    dev = dev_factory("--bacalhau-version", "1.6", "--job-duration", "600")
    h = Harness(tmp_path, dev, rsa_key)
    h.write("kept.yaml", service("kept", "  onFailure: resubmit\n"))
    in_process(h, "apply")
    [old] = dev.jobs()
    stop_by_hand(dev, old["ID"])
    in_process(h, "apply")
    jobs = {j["ID"]: j["State"]["StateType"] for j in dev.jobs()}
    [new] = set(jobs) - {old["ID"]}
    assert (jobs[old["ID"]], jobs[new]) == ("Stopped", "Running")
    assert h.records()["kept"].job_id == new


def test_a_service_that_is_down_makes_the_pass_degraded() -> None:
    """A service left ended (onFailure none, or backing off) is not what the folder says:
    the pass and `status` say degraded, where an ended batch job leaves them ready."""
    def result(job_type: str, phase: Phase, **manifest_policy: Any) -> PassResult:
        manifest = Manifest("svc", b"{}", HASH, "svc.yaml",
                            policy=Policy.model_validate(manifest_policy), form=ORCHESTRATOR,
                            job_type=job_type)
        record = Record("svc", phase, HASH, "svc.yaml", job_id="j-1", uid="u", attempts=1,
                        next_attempt_at=2000.0)
        desired = Desired(True, manifests={"svc": manifest}, file_count=1)
        return PassResult(desired, plan(desired, [record], PlanPolicy(), now=1000.0))

    down = result("service", Phase.CANCELLED, onFailure="none")
    assert (down.down, down.overall) == (1, "degraded")
    assert "1 services down" in down.summary()
    backing_off = result("daemon", Phase.FAILED, onFailure="resubmit")
    assert (backing_off.down, backing_off.overall) == (1, "degraded")
    assert result("service", Phase.ACTIVE).overall == "ready"
    assert result("batch", Phase.FAILED).overall == "ready"
    assert result("batch", Phase.CANCELLED).overall == "ready"
    between_runs = result("service", Phase.COMPLETED, schedule="0 3 * * *")
    assert (between_runs.down, between_runs.overall) == (0, "ready")
