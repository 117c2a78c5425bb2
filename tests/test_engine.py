"""The plan rules and the no-duplicate invariant, in-process: real files, the real engine,
in-memory fakes of the store and the requester (``tests/fakes.py``).

These cases need only the engine's logic, so they run without a CLI process or a requester on a
port; ``test_reconcile_e2e.py`` and ``test_intents.py`` keep real end-to-end runs of the same
rules (the CLI, SQLite, httpx, the dev requester). Every case asserts on what the fake requester
recorded, not only on the store.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from structlog.testing import capture_logs

from reconciler.app.cli import main
from reconciler.backends.errors import InvalidRequest, ServerError
from reconciler.backends.legacy_jobs import job_annotations
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import Action, PlanPolicy
from reconciler.domain.records import Phase, Record
from reconciler.engine.executor import Executor
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import PassResult, Reconciler
from reconciler.sources.folder import FolderSource
from tests.fakes import FakeRequester, FakeStore, SubmitFault
from tests.harness import envelope

FIXTURES = Path(__file__).parent / "fixtures/examples"
UID = "0123456789abcdef0123456789abcdef"


@dataclass
class Applied:
    """One ``apply``: passes until nothing is left to do, as the CLI's apply runs them."""

    first: PassResult
    last: PassResult
    events: list[dict[str, Any]]

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "manifests"
        self.root.mkdir()
        self.store = FakeStore()
        self.requester = FakeRequester()

    def write(self, relative: str, text: str) -> Path:
        """Write as operators are told to: a temp file renamed into place."""
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def records(self) -> dict[str, Record]:
        return dict(self.store.rows)

    def states(self, name: str) -> list[str]:
        return self.requester.states(name)

    def plan_actions(self, **policy: Any) -> dict[str, Action]:
        _, plan = Reconciler(FolderSource(self.root), self.store.as_store(),
                             PlanPolicy(**policy)).plan()
        return {d.name: d.action for d in plan.decisions}

    def apply(self, **policy: Any) -> Applied:
        with capture_logs() as events:
            first, last = asyncio.run(self._apply(PlanPolicy(**policy)))
        return Applied(first, last, [dict(e) for e in events])

    async def _apply(self, policy: PlanPolicy) -> tuple[PassResult, PassResult]:
        store = self.store.as_store()
        executor = Executor(store, self.requester.backend(), policy, confirmations=3,
                            resolve_delay=0)
        await observe(store, self.requester.backend(), policy)
        reconciler = Reconciler(FolderSource(self.root), store, policy)
        first = result = await reconciler.run_pass(executor)
        for _ in range(4):
            if not result.plan.changes or result.report.failed:
                break
            result = await reconciler.run_pass(executor)
        return first, result


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def uids(rig: Rig) -> Counter[str]:
    return Counter(a for job in rig.requester.jobs.values() for a in job.annotations
                   if a.startswith("reconciler-uid:"))


# --- plan rules ---------------------------------------------------------------------------


def test_add_then_nothing_then_change_then_remove(rig: Rig) -> None:
    rig.write("a.yaml", envelope("a"))
    rig.apply()
    [job] = rig.requester.named("a")
    assert job.state == "New"
    assert rig.records()["a"].job_id == job.job_id
    rig.apply()
    assert len(rig.requester.named("a")) == 1
    rig.write("a.yaml", envelope("a", image="ubuntu:24.04"))
    rig.apply()
    assert rig.states("a") == ["Cancelled", "New"]
    live = rig.requester.named("a")[-1]
    assert live.state == "New" and live.spec["Docker"]["Image"] == "ubuntu:24.04"
    assert rig.records()["a"].job_id == live.job_id
    rig.write("b.yaml", envelope("b"))  # keep the folder non-empty
    (rig.root / "a.yaml").unlink()
    rig.apply()
    assert rig.states("a") == ["Cancelled", "Cancelled"]
    assert "a" not in rig.records()


def test_rename_and_reformat_change_nothing(rig: Rig) -> None:
    rig.write("a.yaml", envelope("a"))
    rig.apply()
    [job] = rig.requester.named("a")
    os.rename(rig.root / "a.yaml", rig.root / "renamed.yml")
    rig.apply()
    assert [j.job_id for j in rig.requester.named("a")] == [job.job_id]
    text = envelope("a").replace("engine: docker", "Engine: DOCKER").replace("  docker:",
                                                                             "  Docker:")
    rig.write("sub/moved.yaml", "# reformatted\n" + text)
    (rig.root / "renamed.yml").unlink()
    rig.apply()
    assert [j.job_id for j in rig.requester.named("a")] == [job.job_id]
    assert rig.states("a") == ["New"]
    assert rig.records()["a"].path == "sub/moved.yaml"


def test_native_bacalhau_file_is_a_manifest(rig: Rig) -> None:
    (rig.root / "job-s3.yaml").write_bytes((FIXTURES / "job-s3.yaml").read_bytes())
    rig.apply()
    [job] = rig.requester.named("job-s3")
    assert job.spec["PublisherSpec"]["Type"] == "S3"


def test_broken_manifest_is_held_and_nothing_cancelled(rig: Rig) -> None:
    rig.write("a.yaml", envelope("a"))
    rig.write("b.yaml", envelope("b"))
    rig.apply()
    rig.write("a.yaml", envelope("a").replace("image: ubuntu:22.04", "image: [oops"))
    rig.write("b.yaml", envelope("b", image="ubuntu:24.04"))  # others keep reconciling
    rig.write("c.yaml", envelope("c"))
    applied = rig.apply()
    assert rig.states("a") == ["New"]
    assert rig.states("b") == ["Cancelled", "New"]
    assert rig.states("c") == ["New"]
    invalid = applied.named("manifest.invalid")
    assert [(e["path"], e["line"]) for e in invalid] == [("a.yaml", 10)]
    assert "flow sequence started at line 9" in invalid[0]["reason"]
    assert applied.first.summary().startswith("degraded")
    assert any(e["name"] == "a" for e in applied.named("manifest.hold"))
    validate = CliRunner().invoke(main, ["validate", str(rig.root)])
    assert validate.exit_code == 1
    assert validate.stdout.startswith("a.yaml:10: file: invalid YAML")


def test_broken_document_of_a_multi_document_file_holds_all_its_jobs(rig: Rig) -> None:
    rig.write("pair.yaml", envelope("x") + "---\n" + envelope("y"))
    rig.write("other.yaml", envelope("z"))
    rig.apply()
    rig.write("pair.yaml", envelope("x") + "---\n" + envelope("y").replace("engine: docker",
                                                                           "engine: spark"))
    rig.apply()
    assert rig.states("x") == ["New"] and rig.states("y") == ["New"]
    rig.write("pair.yaml", "{{{ not yaml")  # a file that no longer parses at all
    rig.apply()
    assert rig.states("x") == ["New"] and rig.states("y") == ["New"]
    assert {"x", "y", "z"} <= set(rig.records())


def test_duplicate_names_are_both_invalid(rig: Rig) -> None:
    rig.write("one.yaml", envelope("dup"))
    rig.apply()
    rig.write("two.yaml", envelope("dup", image="alpine"))
    applied = rig.apply()
    assert rig.states("dup") == ["New"]  # the existing job is held, not replaced
    assert sorted(e["path"] for e in applied.named("manifest.invalid")) == ["one.yaml",
                                                                            "two.yaml"]
    (rig.root / "one.yaml").unlink()
    rig.apply()
    assert rig.states("dup") == ["Cancelled", "New"]  # now unique again: replaced


@pytest.mark.parametrize("make", ["empty", "missing", "file-instead"])
def test_unusable_folder_is_not_ready_and_cancels_nothing(rig: Rig, make: str) -> None:
    rig.write("a.yaml", envelope("a"))
    rig.apply()
    (rig.root / "a.yaml").unlink()
    if make == "missing":
        rig.root.rmdir()
    elif make == "file-instead":
        rig.root.rmdir()
        rig.root.write_text("not a folder")
    applied = rig.apply()
    assert rig.states("a") == ["New"]
    assert not applied.first.plan.ready and applied.first.overall == "not ready"
    assert applied.named("source.not_ready")


def test_allow_empty_cancels_on_purpose(rig: Rig) -> None:
    rig.write("a.yaml", envelope("a"))
    rig.apply()
    (rig.root / "a.yaml").unlink()
    rig.apply(allow_empty=True)
    assert rig.states("a") == ["Cancelled"]


def test_unreadable_files_hold_their_jobs(rig: Rig) -> None:
    for name in "abc":
        rig.write(f"{name}.yaml", envelope(name))
    rig.apply()
    (rig.root / "a.yaml").unlink()
    os.symlink("a.yaml", rig.root / "a.yaml")  # a loop: ELOOP on open
    (rig.root / "b.yaml").unlink()
    os.symlink("nowhere.yaml", rig.root / "b.yaml")
    applied = rig.apply()
    assert rig.states("a") == ["New"] and rig.states("b") == ["New"]
    reasons = {e["path"]: e["reason"] for e in applied.named("manifest.invalid")}
    assert "Too many levels of symbolic links" in reasons["a.yaml"]
    assert reasons["b.yaml"] == "symbolic link to nothing"


def test_mass_removal_is_blocked_then_allowed_once(rig: Rig) -> None:
    for name in "abcdef":
        rig.write(f"{name}.yaml", envelope(name))
    rig.apply()
    for name in "abcde":
        (rig.root / f"{name}.yaml").unlink()
    applied = rig.apply()
    assert applied.named("prune.blocked")
    assert all(rig.states(n) == ["New"] for n in "abcde")
    assert set(rig.plan_actions().values()) == {Action.BLOCKED, Action.NOOP}
    rig.apply(allow_mass_cancel=True)
    assert all(rig.states(n) == ["Cancelled"] for n in "abcde")
    assert rig.states("f") == ["New"]
    rig.apply()  # allowed once: nothing left to block
    assert set(rig.records()) == {"f"}


def test_completed_and_failed_jobs(rig: Rig) -> None:
    """Jobs end on the network; observe records it and each manifest's onFailure decides."""
    policy = {"backoff_base": 0.0}  # every retry is due at once
    rig.write("done.yaml", envelope("done"))
    rig.write("fails.yaml", envelope("fails"))
    rig.write("retries.yaml", envelope("retries", policy="onFailure: resubmit;maxRetries: 2"))
    rig.apply(**policy)
    for _ in range(6):
        for job in rig.requester.jobs.values():
            if job.state == "New":
                name = next(a for a in job.annotations if a.startswith("reconciler-manifest:"))
                rig.requester.finish(job.job_id,
                                     "Completed" if name.endswith(":done") else "Error")
        rig.apply(**policy)
    assert rig.states("done") == ["Completed"]  # never resubmitted
    assert rig.states("fails") == ["Error"]  # onFailure=none
    assert rig.states("retries") == ["Error"] * 3  # one submit and two retries, then it stops
    records = rig.records()
    assert records["done"].phase is Phase.COMPLETED
    assert records["fails"].phase is Phase.FAILED
    assert records["retries"].phase is Phase.FAILED and records["retries"].attempts == 3
    rig.write("retries.yaml", envelope("retries", image="alpine",
                                       policy="onFailure: resubmit;maxRetries: 2"))
    rig.apply()  # a changed spec is tried at once: backoff is per (name, spec hash)
    assert len(rig.requester.named("retries")) == 4


def test_failed_resubmits_wait_for_their_backoff(rig: Rig) -> None:
    rig.write("r.yaml", envelope("r", policy="onFailure: resubmit;maxRetries: 5"))
    rig.apply(backoff_base=3600.0)
    [job] = rig.requester.named("r")
    rig.requester.finish(job.job_id, "Error")
    rig.apply(backoff_base=3600.0)
    assert rig.states("r") == ["Error"]  # the backoff is not over
    assert rig.plan_actions(backoff_base=3600.0)["r"] is Action.WAIT
    # the wait says when it ends, so the daemon looks again then and not at the next resync
    _, the_plan = Reconciler(FolderSource(rig.root), rig.store.as_store(),
                             PlanPolicy(backoff_base=3600.0)).plan()
    assert the_plan.next_retry() == rig.records()["r"].next_attempt_at > time.time()


def test_a_refused_submit_says_when_it_is_retried_in_iso_8601(rig: Rig) -> None:
    """``retry_at`` is a time people read in logs: ISO 8601 UTC like ``timestamp``, not an
    epoch float (issue 12)."""
    rig.write("r.yaml", envelope("r"))
    rig.requester.fail_next("submit", InvalidRequest("submit: refused"))
    applied = rig.apply(backoff_base=60.0)
    [failed] = applied.named("action.failed")
    assert failed["action"] == "submit"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", failed["retry_at"])
    assert rig.records()["r"].phase is Phase.ERROR


def test_a_failed_cancel_backs_off_instead_of_being_sent_every_pass(rig: Rig) -> None:
    """A cancel that fails (the requester answers 503) leaves its record cancelling; the next
    passes wait out a backoff that doubles, rather than sending a DELETE a second (the daemon
    follows a pass with changes by another one second later), and the pass says degraded."""
    rig.write("a.yaml", envelope("a"))
    rig.write("b.yaml", envelope("b"))
    rig.apply()
    (rig.root / "a.yaml").unlink()
    rig.requester.fail_next("cancel", ServerError("cancel: HTTP 503: busy"), times=10**6)
    applied = rig.apply(backoff_base=60.0)
    [failed] = applied.named("action.failed")
    record = rig.records()["a"]
    assert (failed["action"], record.phase) == ("cancel", Phase.CANCELLING)
    assert record.next_attempt_at > time.time() + 50
    assert applied.last.overall == "degraded"
    assert rig.states("a") == ["New"]
    # The daemon's next passes: nothing is sent while the backoff runs.
    calls = len(rig.requester.calls)
    assert rig.plan_actions(backoff_base=60.0)["a"] is Action.WAIT
    waiting = rig.apply(backoff_base=60.0)
    assert len(rig.requester.calls) == calls and waiting.last.overall == "degraded"
    # Its time comes: the cancel is sent again, fails again, and waits twice as long.
    rig.store.rows["a"] = replace(rig.store.rows["a"], next_attempt_at=time.time() - 1,
                                  updated_at=time.time() - 61)
    again = rig.apply(backoff_base=60.0)
    assert len(again.named("action.failed")) == 1
    assert rig.records()["a"].next_attempt_at > time.time() + 110
    # A one-shot apply tries at once, and succeeds once the requester does.
    rig.requester.faults.clear()
    rig.apply(honour_backoff=False)
    assert rig.states("a") == ["Cancelled"] and "a" not in rig.records()


# --- invariant 1: no duplicate jobs -------------------------------------------------------


def leave_intent(rig: Rig, name: str, *, submit_too: bool) -> None:
    """What a crash between 'intent committed' and 'job id saved' leaves behind."""
    text = envelope(name)
    rig.write(f"{name}.yaml", text)
    [manifest] = load_file(f"{name}.yaml", text.encode()).manifests
    rig.store.commit_intents([Record(name, Phase.SUBMITTING, manifest.spec_hash,
                                     f"{name}.yaml", uid=UID, attempts=1)])
    if submit_too:
        spec = manifest.wire() | {"Annotations": job_annotations(manifest, UID)}
        asyncio.run(rig.requester.submit(spec))
        rig.requester.calls.clear()


def test_intent_whose_job_exists_is_adopted(rig: Rig) -> None:
    leave_intent(rig, "a", submit_too=True)
    assert rig.plan_actions()["a"] is Action.RESOLVE
    applied = rig.apply()
    [job] = rig.requester.named("a")
    record = rig.records()["a"]
    assert (record.phase, record.job_id) == (Phase.ACTIVE, job.job_id)
    assert [e["event"] for e in applied.events if e["event"].startswith("job.")] == [
        "job.adopted"]
    assert rig.requester.calls["submit"] == 0


def test_intent_whose_job_never_arrived_is_submitted_once(rig: Rig) -> None:
    leave_intent(rig, "a", submit_too=False)
    rig.apply()
    # absence confirmed three times first; the next pass sweeps the name for a late arrival
    assert rig.requester.calls["list"] == 3 + 1
    sent = uids(rig)  # once, under a fresh uid: a late arrival of UID would be a duplicate
    assert f"reconciler-uid:{UID}" not in sent and list(sent.values()) == [1]
    assert rig.records()["a"].uid == next(iter(sent)).removeprefix("reconciler-uid:")
    rig.apply()
    assert len(rig.requester.named("a")) == 1


def test_an_empty_list_is_not_proof_of_absence(rig: Rig) -> None:
    """A requester that swallows a store error lists nothing: the job exists all the same."""
    leave_intent(rig, "a", submit_too=True)
    rig.requester.empty_lists = 2
    rig.apply()
    assert len(rig.requester.named("a")) == 1 and rig.requester.calls["submit"] == 0
    assert rig.records()["a"].phase is Phase.ACTIVE


def test_removed_manifest_with_intent_is_resolved_then_cancelled(rig: Rig) -> None:
    leave_intent(rig, "a", submit_too=True)
    rig.write("keep.yaml", envelope("keep"))
    (rig.root / "a.yaml").unlink()
    rig.apply()
    assert rig.states("a") == ["Cancelled"]
    assert "a" not in rig.records()


@pytest.mark.parametrize("how", ["after-store", "before-store"])
def test_lost_replies_never_duplicate(rig: Rig, how: SubmitFault) -> None:
    for index in range(30):
        rig.write(f"job-{index}.yaml", envelope(f"job-{index}"))
    rig.requester.fail_submits(12, how)
    first = rig.apply()
    rig.apply()
    assert len(first.named("job.submit_unknown")) == 12  # the faults did happen
    assert rig.requester.calls["submit"] == 30 + (12 if how == "before-store" else 0)
    per_name = Counter(a for job in rig.requester.jobs.values() for a in job.annotations
                       if a.startswith("reconciler-manifest:"))
    assert per_name == Counter({f"reconciler-manifest:job-{i}": 1 for i in range(30)})
    assert all(count == 1 for count in uids(rig).values())
    assert all(r.phase is Phase.ACTIVE for r in rig.records().values())
    assert rig.store.intent_commits <= 3 + 12  # batched: not one durable commit per job


# --- events ---------------------------------------------------------------------------------


def test_a_problem_is_reported_once_even_if_its_file_settles_again(rig: Rig) -> None:
    """A broken file whose events arrive late (a close after its create, on a busy machine) is
    settling again for a pass: that pass must not forget it was reported, or the next one
    reports it a second time (seen in the bad-input folder scenario under load)."""
    rig.write("good.yaml", envelope("good"))
    rig.write("bad.yaml", "apiVersion: reconciler/v1\nkind: Job\n")
    reconciler = Reconciler(FolderSource(rig.root), rig.store.as_store(), PlanPolicy())
    reported = []
    for settling in (frozenset(), frozenset({"bad.yaml"}), frozenset()):
        with capture_logs() as events:
            asyncio.run(reconciler.run_pass(None, settling=settling))
        reported.append({e["path"] for e in events if e["event"] == "manifest.invalid"})
    # every problem of the file (validate lists them all) at the first pass, then nothing
    assert reported == [{"bad.yaml"}, set(), set()]


def test_a_removal_deferred_by_a_slow_pass_is_still_scheduled(rig: Rig) -> None:
    """The daemon schedules the pass that cancels a removed file's job when its grace period
    ends. A pass slower than the grace (a busy machine) used to find that moment already past
    and schedule nothing, so the cancel waited for the next resync (a minute by default)."""
    rig.write("keep.yaml", envelope("keep"))
    rig.write("gone.yaml", envelope("gone"))
    rig.apply()
    (rig.root / "gone.yaml").unlink()
    reconciler = Reconciler(FolderSource(rig.root), rig.store.as_store(), PlanPolicy())
    reconciler.removal_grace = 0.05
    _, deferred = reconciler.plan()
    assert {d.name: d.action for d in deferred.decisions}["gone"] is Action.WAIT
    time.sleep(0.1)  # the rest of the pass outlasts the grace period
    check = reconciler.next_removal_check()
    assert check is not None and check <= time.monotonic()  # due now: run it at once
    _, later = reconciler.plan()
    assert {d.name: d.action for d in later.decisions}["gone"] is Action.CANCEL
    assert reconciler.next_removal_check() is None  # acted on: nothing more to schedule
