"""The pure planner: properties over generated desired/recorded states, and a few rules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.domain.desired import Desired
from reconciler.domain.manifest import Manifest, Policy
from reconciler.domain.plan import Action, PlanPolicy, plan
from reconciler.domain.records import LIVE_PHASES, Phase, Record
from reconciler.domain.spec import parse_spec

SPEC = parse_spec({"Engine": "noop", "Publisher": "noop"})
NAMES = [f"n{i}" for i in range(8)]
HASHES = ["a" * 64, "b" * 64]


def manifest(name: str, spec_hash: str, path: str, **policy: Any) -> Manifest:
    return Manifest(name, b"{}", spec_hash, path, policy=Policy.model_validate(policy))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Desired, list[Record]]:
    manifests: dict[str, Manifest] = {}
    records: list[Record] = []
    held: dict[str, str] = {}
    broken: set[str] = set()
    for name in draw(st.lists(st.sampled_from(NAMES), unique=True)):
        path = draw(st.sampled_from([f"{name}.yaml", "shared.yaml", f"d/{name}.yaml"]))
        kind = draw(st.sampled_from(["valid", "gone", "broken-file", "claimed-twice"]))
        if kind == "valid":
            manifests[name] = manifest(name, draw(st.sampled_from(HASHES)), path,
                                       onChange=draw(st.sampled_from(["replace", "keep"])),
                                       onFailure=draw(st.sampled_from(["none", "resubmit"])))
        elif kind == "broken-file":
            broken.add(draw(st.sampled_from([path, "d/"])) if path.startswith("d/") else path)
        elif kind == "claimed-twice":
            held[name] = "claimed twice"
        if draw(st.booleans()):
            records.append(Record(
                name, draw(st.sampled_from(list(Phase))), draw(st.sampled_from(HASHES)), path,
                job_id=draw(st.sampled_from([None, f"job-{name}"])), uid="u",
                attempts=draw(st.integers(0, 5)),
                next_attempt_at=draw(st.sampled_from([0.0, 2000.0])),
                on_remove=draw(st.sampled_from(["cancel", "orphan"]))))
    desired = Desired(True, manifests=manifests, held=held, broken=frozenset(broken),
                      file_count=draw(st.integers(1, 3)))
    return desired, records


policies = st.builds(PlanPolicy, allow_empty=st.booleans(), mass_cancel_min=st.integers(0, 4),
                     mass_cancel_ratio=st.sampled_from([0.0, 0.5, 1.0]),
                     allow_mass_cancel=st.booleans())


def property_test(
    examples: int, *strategies: st.SearchStrategy[Any]
) -> Callable[[Callable[..., None]], Callable[[int], None]]:
    """A hypothesis property run with a fifth of ``examples`` in the default suite and all of
    them under ``-m slow``: the quick form finds the same rule breaks (each was checked by
    breaking the planner), the full one searches harder before a release."""
    def decorate(body: Callable[..., None]) -> Callable[[int], None]:
        @pytest.mark.parametrize("examples", [
            pytest.param(max(100, examples // 5), id="quick"),
            pytest.param(examples, id="full", marks=pytest.mark.slow)])
        def run(examples: int) -> None:
            settings(max_examples=examples)(given(*strategies)(body))()
        return run
    return decorate


@property_test(2000, worlds(), policies)
def test_invalid_manifests_never_lose_their_jobs(world: tuple[Desired, list[Record]],
                                                 policy: PlanPolicy) -> None:
    desired, records = world
    result = plan(desired, records, policy, now=1000.0)
    for decision in result.decisions:
        record = decision.record
        held = decision.name in desired.held or (
            record is not None and decision.name not in desired.manifests
            and desired.is_broken(record.path))
        if held:
            assert decision.action is Action.HOLD, decision


@property_test(2000, worlds(), policies)
def test_never_cancels_what_it_has_no_record_of(world: tuple[Desired, list[Record]],
                                                policy: PlanPolicy) -> None:
    desired, records = world
    recorded = {r.name: r for r in records}
    result = plan(desired, records, policy, now=1000.0)
    for decision in result.by_action(Action.CANCEL, Action.REPLACE):
        assert decision.name in recorded
        assert decision.record == recorded[decision.name]
        assert decision.job_id == recorded[decision.name].job_id
    assert len({d.name for d in result.decisions}) == len(result.decisions)


@property_test(1000, worlds(), policies)
def test_mass_cancel_guard_bounds_cancels(world: tuple[Desired, list[Record]],
                                          policy: PlanPolicy) -> None:
    desired, records = world
    result = plan(desired, records, policy, now=1000.0)
    cancels = len(result.by_action(Action.CANCEL))
    live = sum(1 for r in records if r.phase in LIVE_PHASES)
    if not policy.allow_mass_cancel:
        assert cancels <= policy.mass_cancel_min or cancels <= policy.mass_cancel_ratio * live
    assert result.blocked == bool(result.by_action(Action.BLOCKED))


@property_test(500, worlds(), policies, st.sampled_from(["missing", "empty"]))
def test_not_ready_source_changes_nothing(world: tuple[Desired, list[Record]],
                                          policy: PlanPolicy, why: str) -> None:
    _, records = world
    desired = Desired(False, "gone") if why == "missing" else Desired(True, file_count=0)
    result = plan(desired, records, policy, now=1000.0)
    if why == "empty" and policy.allow_empty:
        return
    assert result.changes == ()
    assert not result.ready
    assert [g.name for g in result.guards] == ["source.not_ready"]


def test_every_decision_has_a_reason() -> None:
    desired = Desired(True, manifests={"a": manifest("a", HASHES[0], "a.yaml")}, file_count=1)
    records = [Record("b", Phase.ACTIVE, HASHES[0], "b.yaml", job_id="j")]
    result = plan(desired, records, PlanPolicy(), now=0)
    assert [(d.name, d.action) for d in result.decisions] == [("a", Action.SUBMIT),
                                                              ("b", Action.CANCEL)]
    assert all(d.reason for d in result.decisions)


def test_keep_policy_waits_for_the_running_job() -> None:
    desired = Desired(True, manifests={"a": manifest("a", HASHES[1], "a.yaml",
                                                     onChange="keep")}, file_count=1)
    running = [Record("a", Phase.ACTIVE, HASHES[0], "a.yaml", job_id="j")]
    assert plan(desired, running, PlanPolicy(), 0).decisions[0].action is Action.WAIT
    done = [Record("a", Phase.COMPLETED, HASHES[0], "a.yaml", job_id="j")]
    assert plan(desired, done, PlanPolicy(), 0).decisions[0].action is Action.SUBMIT


def test_orphan_policy_forgets_without_cancelling() -> None:
    desired = Desired(True, file_count=1)
    records = [Record("a", Phase.ACTIVE, HASHES[0], "a.yaml", job_id="j", on_remove="orphan")]
    [decision] = plan(desired, records, PlanPolicy(), 0).decisions
    assert decision.action is Action.FORGET and "orphan" in decision.reason


def test_backoff_is_kept_per_spec_hash() -> None:
    failed = [Record("a", Phase.FAILED, HASHES[0], "a.yaml", job_id="j", attempts=1,
                     next_attempt_at=100.0)]
    same = Desired(True, manifests={"a": manifest("a", HASHES[0], "a.yaml",
                                                  onFailure="resubmit")}, file_count=1)
    changed = Desired(True, manifests={"a": manifest("a", HASHES[1], "a.yaml",
                                                     onFailure="resubmit")}, file_count=1)
    assert plan(same, failed, PlanPolicy(), 50).decisions[0].action is Action.WAIT
    assert plan(same, failed, PlanPolicy(), 150).decisions[0].action is Action.RESUBMIT
    assert plan(changed, failed, PlanPolicy(), 50).decisions[0].action is Action.SUBMIT


def test_settling_paths_defer_every_effect() -> None:
    records = [Record("a", Phase.ACTIVE, HASHES[0], "a.yaml", job_id="j"),
               Record("b", Phase.ACTIVE, HASHES[0], "sub/b.yaml", job_id="k")]
    desired = Desired(True, manifests={"c": manifest("c", HASHES[0], "c.yaml")}, file_count=1,
                      settling=frozenset({"a.yaml", "sub/"}))
    actions = {d.name: d.action for d in plan(desired, records, PlanPolicy(), 0).decisions}
    assert actions == {"a": Action.WAIT, "b": Action.WAIT, "c": Action.SUBMIT}
    everything = Desired(True, file_count=1, settling=frozenset({""}))
    assert plan(everything, records, PlanPolicy(), 0).changes == ()


def test_a_name_whose_old_file_is_broken_is_held_even_if_claimed_elsewhere() -> None:
    records = [Record("a", Phase.ACTIVE, HASHES[0], "a.yaml", job_id="j")]
    desired = Desired(True, manifests={"a": manifest("a", HASHES[1], "other.yaml")},
                      broken=frozenset({"a.yaml"}), file_count=2)
    [decision] = plan(desired, records, PlanPolicy(), 0).decisions
    assert decision.action is Action.HOLD and "may still define" in decision.reason


def test_a_submission_in_doubt_is_resolved_and_the_plan_says_what_follows() -> None:
    """Resubmitting or forgetting after a confirmed absence is the planner's decision, made
    from whether the manifest is still there, not the executor's."""
    records = [Record(n, Phase.SUBMITTING, "a" * 64, f"{n}.yaml", uid=f"u-{n}") for n in "ab"]
    desired = Desired(True, manifests={"a": manifest("a", "a" * 64, "a.yaml")}, file_count=1)
    decisions = {d.name: d for d in plan(desired, records, PlanPolicy(), 0.0).decisions}
    assert (decisions["a"].action, decisions["a"].if_absent) == (Action.RESOLVE, Action.RESUBMIT)
    assert (decisions["b"].action, decisions["b"].if_absent) == (Action.RESOLVE, Action.FORGET)
    assert "submit it again under a fresh uid" in decisions["a"].reason
    assert "forget it once it is confirmed absent" in decisions["b"].reason


@property_test(500, worlds(), policies)
def test_every_resolve_says_what_follows_an_absence(world: tuple[Desired, list[Record]],
                                                     policy: PlanPolicy) -> None:
    desired, records = world
    for decision in plan(desired, records, policy, 1000.0).by_action(Action.RESOLVE):
        expected = Action.RESUBMIT if decision.name in desired.manifests else Action.FORGET
        assert decision.if_absent is expected


def test_mass_cancel_guard_at_its_bounds() -> None:
    """The guard's edges, exactly: the property above samples them only now and then."""
    def cancels(removed: int, live: int, policy: PlanPolicy) -> tuple[int, int]:
        keep = {f"k{i}": manifest(f"k{i}", HASHES[0], f"k{i}.yaml") for i in range(live - removed)}
        records = [Record(f"k{i}", Phase.ACTIVE, HASHES[0], f"k{i}.yaml", job_id=f"j{i}")
                   for i in range(live)]
        result = plan(Desired(True, manifests=keep, file_count=1), records, policy, now=0)
        return len(result.by_action(Action.CANCEL)), len(result.by_action(Action.BLOCKED))

    default = PlanPolicy(mass_cancel_min=3, mass_cancel_ratio=0.5)
    assert cancels(3, 4, default) == (3, 0)  # not more than mass_cancel_min
    assert cancels(4, 8, default) == (4, 0)  # more than the minimum, not more than the ratio
    assert cancels(4, 7, default) == (0, 4)  # more than both: blocked
    assert cancels(4, 7, PlanPolicy(allow_mass_cancel=True)) == (4, 0)
