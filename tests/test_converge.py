"""Planning again after applying a plan yields no changes; the requester agrees with the plan.

Generated sequences of folder states run through the real executor, a real SQLite store and a
dev requester on a loopback port (in-process, so hypothesis can afford many examples).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.backends.legacy import ApiClient, RetryPolicy
from reconciler.backends.legacy_jobs import LegacyBackend
from reconciler.backends.signing import Signer
from reconciler.devnet import DevConfig, DevRequesterThread
from reconciler.domain.plan import Action, PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.sources.folder import FolderSource
from reconciler.store.sqlite import Store
from tests.harness import envelope

NAMES = ["a", "b", "c", "d", "e"]
# name -> image (a valid manifest), "broken", or absent
folder_states = st.dictionaries(st.sampled_from(NAMES),
                                st.sampled_from(["alpine", "ubuntu", "broken"]), min_size=1)


def write_folder(root: Path, state: dict[str, str]) -> None:
    for path in root.glob("*.yaml"):
        if path.stem not in state:
            path.unlink()
    for name, image in state.items():
        text = envelope(name, image)
        if image == "broken":
            text = text.replace("engine: docker", "engine: 7")
        (root / f"{name}.yaml").write_text(text)


async def one_pass(root: Path, store: Store, url: str, signer: Signer) -> None:
    policy = PlanPolicy(mass_cancel_min=100)
    async with ApiClient(url, signer, retry=RetryPolicy(3, 0.01, 0.01)) as client:
        executor = Executor(store, LegacyBackend(client), policy, confirmations=1,
                            resolve_delay=0)
        result = await Reconciler(FolderSource(root), store, policy).run_pass(executor)
        assert not result.report.failed, result.report.errors


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(folder_states, min_size=1, max_size=4))
def test_replanning_after_apply_yields_no_changes(signer: Signer,
                                                  steps: list[dict[str, str]]) -> None:
    tmp = Path(tempfile.mkdtemp())
    root = tmp / "m"
    root.mkdir()
    valid_ever: dict[str, str] = {}
    try:
        with DevRequesterThread(DevConfig(job_duration=600)) as dev, Store(tmp / "s.db") as store:
            for state in steps:
                write_folder(root, state)
                asyncio.run(one_pass(root, store, dev.url, signer))
                _, again = Reconciler(FolderSource(root), store, PlanPolicy()).plan()
                assert again.changes == (), again.changes
                for name, image in state.items():
                    if image != "broken":
                        valid_ever[name] = image
                live = Counter(
                    tag.split(":", 1)[1] for job in dev.app.jobs.all() if job.state == "New"
                    for tag in job.annotations if tag.startswith("reconciler-manifest:"))
                held = {n for n, image in state.items() if image == "broken"}
                for name in NAMES:
                    if name in state and name not in held:
                        assert live[name] == 1, (name, live)
                    elif name in held:
                        assert live[name] == (1 if name in {r.name for r in store.records()}
                                              else 0)
                    else:
                        assert live[name] == 0, (name, live)
                assert all(d.action in (Action.NOOP, Action.HOLD) for d in again.decisions)
    finally:
        shutil.rmtree(tmp)
