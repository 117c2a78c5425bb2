"""Cold sync on the orchestrator backend (issue 14): N new manifests against Bacalhau 1.9.

Usage: python -m bench.cold_sync_orchestrator [--counts 1000,5000] [--versions 1.9,1.6]
                                              [--rounds 5]

Each against a fresh dev requester (``--bacalhau-version``):
  reconciler  one pass of the real code: read + parse N files, plan, durable intents, in name
              mode a name lookup then a PUT per manifest at concurrency 8 (label mode: the
              PUT alone), outcomes saved, events rendered (to /dev/null);
  baseline    the same jobs (translated, labelled, prepared beforehand) encoded and PUT with
              plain httpx at concurrency 8.
Target: reconciler / baseline <= 1.3, taken as the median of paired rounds (each side once
per round, the order alternating: bench.common.paired). Also each side's CPU per job (this
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

from bench.cold_sync import CONCURRENCY, write_manifests
from bench.common import Stopwatch, Timed, paired, requester, scratch, table, warm_up
from reconciler import events
from reconciler.app.wiring import open_store
from reconciler.backends.orchestrator import (
    JOBS,
    Mode,
    OrchestratorBackend,
    OrchestratorClient,
)
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
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
    return out


async def put_all(url: str, payloads: list[dict[str, Any]]) -> Timed:
    semaphore = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30,
                                 headers=headers) as http:
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


def measure(directory: Path, count: int, version: str, rounds: int) -> list[Any]:
    """``rounds`` paired rounds, each side against a fresh dev requester (bench.common.paired)."""
    root = directory / f"m-{count}"
    if not root.exists():
        write_manifests(root, count)

    def ours(index: int) -> Timed:
        with requester(directory, "--bacalhau-version", version) as url:
            state = directory / f"state-{version}-{count}-{index}.db"
            return asyncio.run(reconciler_run(root, state, url, version))

    def theirs(index: int) -> Timed:
        with requester(directory, "--bacalhau-version", version) as url:
            return asyncio.run(put_all(url, bodies(root, count, url, version)))

    result = paired(rounds, ours, theirs)
    reconciler, baseline = result.best()
    return [version, count, f"{reconciler.wall:.2f}", f"{baseline.wall:.2f}",
            f"{count / reconciler.wall:.0f}", f"{result.median_ratio('wall'):.2f}",
            f"{reconciler.cpu / count * 1000:.2f}", f"{baseline.cpu / count * 1000:.2f}",
            f"{result.median_ratio('cpu'):.2f}", result.ratios("cpu")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1000,5000")
    parser.add_argument("--versions", default="1.9,1.6")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open(os.devnull, "w") as null:
        events.configure("json", "info", null)
        directory = scratch()
        warm_up(directory)
        rows = [measure(directory, int(n), v, args.rounds) for v in args.versions.split(",")
                for n in args.counts.split(",")]
    print(f"Cold sync, orchestrator API ({args.rounds} paired rounds; concurrency "
          f"{CONCURRENCY}); target reconciler/baseline <= 1.3 (the median of the rounds)")
    print("seconds and CPU ms/job: the best round of each side; ratios: the median of the "
          "rounds' own ratios")
    print(table(["bacalhau", "N", "reconciler", "baseline", "jobs/s", "ratio", "CPU ms/job",
                 "baseline CPU", "CPU ratio", "rounds' CPU ratios"], rows))


if __name__ == "__main__":
    main()
