"""Cold sync on the orchestrator backend (issue 14): N new manifests against Bacalhau 1.9.

Usage: python -m bench.cold_sync_orchestrator [--counts 1000,5000] [--versions 1.9,1.6]
                                              [--rounds 5] [--forms v1beta1,job]

``--forms``: the manifests as V1beta1 envelopes (the default; the reconciler translates them)
or as orchestrator job files carrying the same jobs (``job``: nothing to translate).

Three sides, each against a fresh dev requester (``--bacalhau-version``), in rounds:
  reconciler  one pass of the real code: read + parse N files, plan, durable intents, in name
              mode one listing of the namespace then a PUT per manifest (a name the listing
              found free needs no lookup of its own; label mode: the PUT alone) at
              concurrency 8, outcomes saved, events rendered (to /dev/null);
  baseline    the same jobs (translated, labelled, prepared beforehand) encoded and PUT with
              plain httpx at concurrency 8;
  same transport  that baseline on the reconciler's own HTTP transport
              (reconciler/backends/transport.py): what is left is the reconciler's own work.
Target: reconciler / baseline <= 1.3, taken as the median of the rounds (each side once per
round, the order rotating: bench.common.rounds). Also each side's CPU per job (this
process only: the requester runs in another) and their ratio, steadier than the wall clock
on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.cold_sync import CONCURRENCY, write_manifests
from bench.common import Stopwatch, Timed, requester, rounds, scratch, table, warm_up
from reconciler import events
from reconciler.app.wiring import open_store
from reconciler.backends.orchestrator import (
    JOBS,
    Mode,
    OrchestratorBackend,
    OrchestratorClient,
)
from reconciler.backends.transport import cheap_idle_check, cheapen
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.domain.translate import to_orchestrator
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.sources.folder import FolderSource


def backend(url: str, version: str) -> OrchestratorBackend:
    mode: Mode = "name" if version == "1.9" else "label"
    return OrchestratorBackend(OrchestratorClient(url), mode=mode,
                               version="v1.9.3" if mode == "name" else "v1.6.0")


async def reconciler_run(root: Path, state: Path, url: str, version: str) -> Timed:
    store = open_store(state)
    policy = PlanPolicy()
    jobs = backend(url, version)
    try:
        executor = Executor(store, jobs, policy, concurrency=CONCURRENCY)
        clock = Stopwatch()
        result = await Reconciler(FolderSource(root), store, policy).run_pass(executor)
        elapsed = clock.read()
    finally:
        await jobs.client.aclose()
        store.close()
    assert result.report.counts["submit.ok"] == len(result.desired.manifests), result.report
    return elapsed


def bodies(root: Path, count: int, url: str, version: str) -> list[dict[str, Any]]:
    """What the baseline sends: the same jobs, labels and meta (prepared beforehand)."""
    jobs = backend(url, version)
    out = []
    for index in range(count):
        path = root / f"c-{index:05d}.yaml"
        [item] = load_file(path.name, path.read_bytes()).manifests
        out.append({"Job": jobs.job_of(item, os.urandom(16).hex()), "Force": False})
    asyncio.run(jobs.client.aclose())  # used for job_of only: it sent nothing
    return out


async def put_all(url: str, payloads: list[dict[str, Any]], *,
                  ours: bool = False) -> Timed:
    """The baseline: plain httpx (``ours``: on the reconciler's own transport, so that the
    two sides differ only by the reconciler's own work)."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    headers = {"Content-Type": "application/json"}
    http = httpx.AsyncClient(base_url=url, limits=limits, timeout=30, headers=headers)
    if ours:  # built as the reconciler's client builds its own (proxies from the environment)
        cheapen(http)
        assert cheap_idle_check(http._transport)  # else 'same transport' is not
    async with http:
        # Parsed once, as the reconciler's client does (its every PUT would otherwise pay
        # for httpx joining a path to the base URL): the two sides send alike.
        target = http.build_request("PUT", JOBS).url

        async def one(body: dict[str, Any]) -> None:
            async with semaphore:
                # Encoded here, as the legacy baseline encodes and signs in its clock: any
                # client, the reconciler too, turns a job into bytes per request.
                reply = await http.put(target, content=json.dumps(body).encode())
                assert reply.status_code == 200, reply.text
                json.loads(reply.content)

        clock = Stopwatch()
        await asyncio.gather(*(one(body) for body in payloads))
        return clock.read()


def write_job_files(root: Path, count: int) -> None:
    """The same jobs as ``write_manifests``, as orchestrator job files (``bacalhau job run``'s
    form): what the V1beta1 manifests translate to, with their names. No translation is left
    for the reconciler to do."""
    envelopes = root.with_name(root.name + "-v1beta1")
    if not envelopes.exists():
        write_manifests(envelopes, count)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = envelopes / f"c-{index:05d}.yaml"
        [item] = load_file(path.name, path.read_bytes()).manifests
        job = to_orchestrator(item)
        assert isinstance(job, dict), job
        (root / path.name).write_text(yaml.safe_dump({"Name": item.name, **job}))


def measure(directory: Path, count: int, version: str, count_rounds: int,
            form: str = "v1beta1") -> list[Any]:
    """Rounds of three sides, each against a fresh dev requester (bench.common.rounds)."""
    root = directory / f"m-{count}-{form}"
    if not root.exists():
        (write_manifests if form == "v1beta1" else write_job_files)(root, count)

    def reconciler(index: int) -> Timed:
        with requester(directory, "--bacalhau-version", version) as url:
            state = directory / f"state-{version}-{count}-{index}.db"
            return asyncio.run(reconciler_run(root, state, url, version))

    def baseline(index: int, ours: bool = False) -> Timed:
        with requester(directory, "--bacalhau-version", version) as url:
            return asyncio.run(put_all(url, bodies(root, count, url, version), ours=ours))

    result = rounds(count_rounds, {"reconciler": reconciler, "httpx": baseline,
                                   "same transport": lambda i: baseline(i, ours=True)})
    ours, theirs = result.best("reconciler"), result.best("httpx")
    return [version, form, count, f"{ours.wall:.2f}", f"{theirs.wall:.2f}",
            f"{count / ours.wall:.0f}", f"{result.median_ratio('reconciler', 'httpx', 'wall'):.2f}",
            f"{ours.cpu / count * 1000:.2f}", f"{theirs.cpu / count * 1000:.2f}",
            f"{result.median_ratio('reconciler', 'httpx', 'cpu'):.2f}",
            f"{result.median_ratio('reconciler', 'same transport', 'cpu'):.2f}",
            result.ratios("reconciler", "httpx", "cpu")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1000,5000")
    parser.add_argument("--versions", default="1.9,1.6")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--forms", default="v1beta1",
                        help="v1beta1 (envelopes, translated), job (orchestrator job files)")
    args = parser.parse_args()
    with open(os.devnull, "w") as null:
        events.configure("json", "info", null)
        directory = scratch()
        warm_up(directory)
        rows = [measure(directory, int(n), v, args.rounds, form)
                for form in args.forms.split(",") for v in args.versions.split(",")
                for n in args.counts.split(",")]
    print(f"Cold sync, orchestrator API ({args.rounds} rounds; concurrency {CONCURRENCY}); "
          "target reconciler/baseline <= 1.3 (the median of the rounds)")
    print("seconds, jobs/s, CPU ms/job, baseline CPU: each side's lowest over the rounds "
          "(wall and CPU each); ratio, CPU ratio: the median of the rounds' own ratios to "
          "plain httpx; 'same transport': the median CPU ratio to plain httpx on the "
          "reconciler's transport (the reconciler's own work alone); then every round's CPU "
          "ratio to plain httpx")
    print(table(["bacalhau", "form", "N", "reconciler", "baseline", "jobs/s", "ratio", "CPU ms/job",
                 "baseline CPU", "CPU ratio", "same transport", "rounds' CPU ratios"], rows))


if __name__ == "__main__":
    main()
