"""Cold sync throughput: N new manifests submitted, against the work that cannot be avoided.

Usage: python -m bench.cold_sync [--counts 1000,5000,10000] [--keys rsa,ed25519]
                                [--state postgresql[://user@host/db]] [--rounds 3]

``--state postgresql://…``: the reconciler's store is PostgreSQL (a fresh database on that
server per run, writes fenced by a held lease); ``--state postgresql`` alone starts a
throwaway local server (tests/pgserver.py).

For each key type and N, in rounds (the order rotating: bench.common.rounds), each side
against a fresh dev requester:
  reconciler  one pass of the real code: read + parse N files, plan, durable intents, signed
              submits at concurrency 8, outcomes saved, events rendered (to /dev/null);
  baseline    build each payload, sign it, send it with plain httpx at concurrency 8
              (and once more on the reconciler's own HTTP transport: "same transport");
  transport   the same N requests signed beforehand (the HTTP and server cost alone).
Target (issue 8): reconciler / baseline <= 1.3, the median of the rounds. Also prints the
dev requester's ceiling, and each side's CPU per job (this process only: the requester runs
in another) with their ratio, which a shared machine disturbs far less than the wall clock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import httpx

from bench.common import Stopwatch, Timed, key, requester, rounds, scratch, table, warm_up
from bench.pgstate import fresh_store, start_server
from reconciler import events
from reconciler.app.wiring import open_store
from reconciler.backends.legacy import ApiClient
from reconciler.backends.legacy_jobs import LegacyBackend, job_annotations
from reconciler.backends.signing import Signer, load_signer, signed_body
from reconciler.backends.transport import cheap_idle_check, cheapen
from reconciler.domain.manifest import load_file
from reconciler.domain.plan import PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.ports import StateStore
from reconciler.sources.folder import FolderSource
from tests.reliability.common import manifest

CONCURRENCY = 8


def write_manifests(root: Path, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (root / f"c-{index:05d}.yaml").write_text(manifest(f"c-{index:05d}", f"img:{index}"))


async def reconciler_run(root: Path, state: Path, url: str, signer: Signer,
                         pg_url: str | None = None) -> Timed:
    store: StateStore = open_store(state) if pg_url is None else fresh_store(pg_url)
    policy = PlanPolicy()
    async with ApiClient(url, signer) as client:
        executor = Executor(store, LegacyBackend(client), policy, concurrency=CONCURRENCY)
        clock = Stopwatch()
        result = await Reconciler(FolderSource(root), store, policy).run_pass(executor)
        elapsed = clock.read()
    store.close()
    assert result.report.counts["submit.ok"] == len(result.desired.manifests), result.report
    return elapsed


def payloads(root: Path, signer: Signer, count: int) -> list[dict[str, Any]]:
    """What the baseline sends: the same specs and annotations (prepared beforehand)."""
    out = []
    for index in range(count):
        path = root / f"c-{index:05d}.yaml"
        [item] = load_file(path.name, path.read_bytes()).manifests
        spec = item.wire()
        spec["Annotations"] = job_annotations(item, os.urandom(16).hex())
        out.append({"APIVersion": "V1beta1", "ClientID": signer.client_id, "Spec": spec})
    return out


async def send_all(url: str, bodies: list[Any], sign: Signer | None,
                   concurrency: int = CONCURRENCY, *, ours: bool = False) -> Timed:
    """Plain httpx (``ours``: on the reconciler's own transport, reconciler/backends/
    transport.py, so that the two sides differ only by the reconciler's own work)."""
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    http = httpx.AsyncClient(base_url=url, limits=limits, timeout=30)
    if ours:  # built as the reconciler's clients build theirs (proxies from the environment)
        cheapen(http)
        assert cheap_idle_check(http._transport)  # else 'same transport' is not
    async with http:
        async def one(body: Any) -> None:
            async with semaphore:
                data = signed_body(sign, body) if sign is not None else body
                reply = await http.post("/api/v1/requester/submit", content=data)
                assert reply.status_code == 200, reply.text
                json.loads(reply.content)

        clock = Stopwatch()
        await asyncio.gather(*(one(body) for body in bodies))
        return clock.read()


def measure(directory: Path, key_type: str, count: int, count_rounds: int,
            pg_url: str | None = None) -> list[object]:
    """Rounds of four sides, each against a fresh dev requester (bench.common.rounds)."""
    signer = load_signer(directory / key_type / f"{key_type}.pem")
    root = directory / f"m-{count}"
    if not root.exists():
        write_manifests(root, count)
    bodies = payloads(root, signer, count)
    signed = [signed_body(signer, body) for body in bodies]

    def reconciler(index: int) -> Timed:
        with requester(directory) as url:
            state = directory / f"state-{key_type}-{count}-{index}.db"
            return asyncio.run(reconciler_run(root, state, url, signer, pg_url))

    def baseline(index: int, ours: bool = False) -> Timed:
        with requester(directory) as url:
            return asyncio.run(send_all(url, bodies, signer, ours=ours))

    def transport(index: int) -> Timed:
        with requester(directory) as url:
            return asyncio.run(send_all(url, signed, None))

    result = rounds(count_rounds, {"reconciler": reconciler, "httpx": baseline,
                                   "same transport": lambda i: baseline(i, ours=True),
                                   "transport": transport})
    ours, theirs = result.best("reconciler"), result.best("httpx")
    return [key_type, count, f"{ours.wall:.2f}", f"{theirs.wall:.2f}",
            f"{result.best('transport').wall:.2f}", f"{count / ours.wall:.0f}",
            f"{result.median_ratio('reconciler', 'httpx', 'wall'):.2f}",
            f"{ours.cpu / count * 1000:.2f}", f"{theirs.cpu / count * 1000:.2f}",
            f"{result.median_ratio('reconciler', 'httpx', 'cpu'):.2f}",
            f"{result.median_ratio('reconciler', 'same transport', 'cpu'):.2f}"]


def ceiling(directory: Path) -> str:
    """The dev requester's own limit: pre-signed submits at concurrency 64."""
    signer = load_signer(directory / "rsa" / "rsa.pem")
    bodies = [signed_body(signer, b) for b in payloads(directory / "m-1000", signer, 1000)] * 3
    with requester(directory) as url:
        elapsed = asyncio.run(send_all(url, bodies, None, concurrency=64))
    return f"{len(bodies) / elapsed.wall:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1000,5000,10000")
    parser.add_argument("--keys", default="rsa,ed25519")
    parser.add_argument("--state", default=None, help="postgresql[://user@host/db]")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        pg_url = args.state
        if pg_url == "postgresql":
            pg_url = stack.enter_context(start_server()).url
        run(args, pg_url)


def run(args: argparse.Namespace, pg_url: str | None) -> None:
    with open(os.devnull, "w") as null:
        events.configure("json", "info", null)  # events rendered, as in the daemon
        directory = scratch()
        for key_type in args.keys.split(","):
            (directory / key_type).mkdir()
            key(directory / key_type, key_type)
        keys, counts = args.keys.split(","), args.counts.split(",")
        warm_up(directory)
        rows = [measure(directory, k, int(n), args.rounds, pg_url) for k in keys
                for n in counts]
        # the ceiling reuses the 1,000 RSA manifests measure() generated
        top = ceiling(directory) if "rsa" in keys and "1000" in counts else "-"
    store = "PostgreSQL" if pg_url else "SQLite"
    print(f"Cold sync, {store} store ({args.rounds} rounds; concurrency {CONCURRENCY}); "
          "target reconciler/baseline <= 1.3 (the median of the rounds)")
    print("seconds, jobs/s, CPU ms/job, baseline CPU: each side's lowest over the rounds "
          "(wall and CPU each); ratio, CPU ratio: the median of the rounds' own ratios to the "
          "plain httpx baseline; 'same transport': the median CPU ratio to that baseline on "
          "the reconciler's transport (the reconciler's own work alone)")
    print(table(["key", "N", "reconciler", "baseline", "transport", "jobs/s", "ratio",
                 "CPU ms/job", "baseline CPU", "CPU ratio", "same transport"], rows))
    print(f"dev requester ceiling (pre-signed submits, concurrency 64): {top} requests/s")


if __name__ == "__main__":
    main()
