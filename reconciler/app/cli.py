"""The ``reconciler`` command line: thin wrappers that load settings and call the core."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog

from reconciler import events
from reconciler.app import wiring
from reconciler.backends.errors import NoExecutions, NotAuthorized, RequesterError, Unreachable
from reconciler.backends.signing import KeyFileError, Signer, load_signer, write_new_key
from reconciler.domain.desired import collect
from reconciler.domain.plan import SYMBOLS, Action, Plan
from reconciler.engine.executor import ApplyReport
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import PassResult
from reconciler.events import scrub_text
from reconciler.ports import Fetching, StateStore
from reconciler.settings import Settings, SettingsError, load_settings
from reconciler.sources.errors import FetchError
from reconciler.store.errors import StoreError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_CHANGES, EXIT_BLOCKED = 0, 1, 2, 3


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-format",
    type=click.Choice(["auto", "json", "console"]),
    default="auto",
    show_default=True,
    help="Event format: JSON lines, console lines, or by whether stderr is a terminal.",
)
@click.option("--log-level", default="info", show_default=True)
@click.version_option(package_name="reconciler")
def main(log_format: events.LogFormat, log_level: str) -> None:
    """Keep a Bacalhau network in line with a folder of job manifests."""
    events.configure(log_format, log_level)


class Duration(click.ParamType[float]):
    """Seconds, written ``30``, ``30s``, ``5m`` or ``1h``."""

    name = "duration"
    _UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        text = str(value).strip().lower()
        unit = self._UNITS.get(text[-1:], None)
        try:
            return float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            self.fail(f"{value!r} is not a duration (e.g. 30s, 5m)", param, ctx)


def common_options(command: F) -> F:
    """Options every reconciling command shares; each is also a setting (RECONCILER_*)."""
    options = [
        click.option("--config", type=click.Path(path_type=Path),
                     help="TOML config file [default: /etc/reconciler/config.toml]."),
        click.option("--manifests", type=click.Path(path_type=Path),
                     help="Folder of job manifests [default: ./manifests]."),
        click.option("--endpoint", help="Requester base URL [default: http://127.0.0.1:1234]."),
        click.option("--key", type=click.Path(path_type=Path), help="Signing key file."),
        click.option("--state", type=click.Path(path_type=Path), help="State database."),
        click.option("--git-url", help="Follow this git repository instead of a folder."),
        click.option("--git-ref", help="Branch or tag to follow [default: main]."),
        click.option("--git-path", help="Folder of manifests inside the repository."),
        click.option("--git-interval", type=Duration(),
                     help="Time between fetches, e.g. 30s [default: 30s]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def settings_from(config: Path | None, **flags: Any) -> Settings:
    try:
        return load_settings(config, **flags)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def signer_from(settings: Settings) -> Signer:
    try:
        return load_signer(settings.key_path())
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


@contextmanager
def opened_store(settings: Settings, *, writer: bool) -> Iterator[StateStore]:
    try:
        store = wiring.store(settings, writer=writer)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        yield store
    finally:
        store.close()


# --- validate / plan / apply / status ----------------------------------------------------


@main.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
def validate(directory: Path | None) -> None:
    """Check every manifest; one line per error. Exit 0 when all are valid."""
    root = directory or settings_from(None).manifests
    desired = collect(wiring.folder(root).read())
    if not desired.ready:
        click.echo(f"error: {desired.reason}", err=True)
        sys.exit(EXIT_ERROR)
    for error in desired.errors:
        click.echo(str(error))
    click.echo(f"{len(desired.manifests)} valid, {len(desired.errors)} errors", err=True)
    sys.exit(EXIT_ERROR if desired.errors else EXIT_OK)


@main.command("plan")
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged names.")
def plan_command(config: Path | None, as_json: bool, show_all: bool, **flags: Any) -> None:
    """Show what apply would do and why. Offline. Exit 0 no changes, 2 changes, 1 error."""
    settings = settings_from(config, **flags)
    with opened_store(settings, writer=False) as store:
        reconciler = wiring.reconciler(settings, store)
        desired, the_plan = reconciler.plan()
    errors = [str(e) for e in desired.errors]
    if as_json:
        click.echo(json.dumps(plan_json(the_plan, errors), indent=2))
    else:
        print_plan(the_plan, errors, show_all)
    sys.exit(EXIT_CHANGES if the_plan.changes else EXIT_OK)


def plan_json(the_plan: Plan, errors: list[str]) -> dict[str, Any]:
    return {
        "ready": the_plan.ready,
        "revision": the_plan.revision,
        "decisions": [
            {"name": d.name, "action": str(d.action), "reason": d.reason, "path": d.path,
             "job_id": d.job_id}
            for d in the_plan.decisions
        ],
        "guards": [{"name": g.name, "reason": g.reason, "names": list(g.names)}
                   for g in the_plan.guards],
        "errors": errors,
    }


def print_plan(the_plan: Plan, errors: list[str], show_all: bool = False) -> None:
    for decision in the_plan.decisions:
        if decision.action is Action.NOOP and not show_all:
            continue
        job = f" [{decision.job_id}]" if decision.job_id else ""
        click.echo(f"{SYMBOLS[decision.action]} {decision.action:<8} {decision.name}{job}: "
                   f"{decision.reason}")
    for guard in the_plan.guards:
        click.echo(f"guard {guard.name}: {guard.reason}")
    for error in errors:
        click.echo(f"error {error}")
    counts = {a: len(the_plan.by_action(a)) for a in Action}
    click.echo(
        f"Plan: {counts[Action.SUBMIT] + counts[Action.RESUBMIT]} to submit, "
        f"{counts[Action.REPLACE]} to replace, {counts[Action.CANCEL]} to cancel, "
        f"{counts[Action.RESOLVE]} to resolve, {counts[Action.FORGET]} to forget, "
        f"{counts[Action.UPDATE]} to update, "
        f"{counts[Action.HOLD]} held, {counts[Action.BLOCKED]} blocked."
    )


@main.command("apply")
@common_options
@click.option("--allow-mass-cancel", is_flag=True,
              help="Allow this one run to cancel past the mass-cancel guard.")
@click.option("--dry-run", is_flag=True, help="Plan and print only; change nothing.")
def apply_command(config: Path | None, allow_mass_cancel: bool, dry_run: bool,
                  **flags: Any) -> None:
    """Run passes until nothing is left to do. Exit 0 done, 1 errors, 3 blocked by a guard."""
    settings = settings_from(config, **flags)
    if dry_run:
        with opened_store(settings, writer=False) as store:
            policy = wiring.plan_policy(settings, allow_mass_cancel=allow_mass_cancel)
            desired, the_plan = wiring.reconciler(settings, store, policy).plan(policy)
        print_plan(the_plan, [str(e) for e in desired.errors])
        sys.exit(EXIT_OK)
    signer = signer_from(settings)
    with opened_store(settings, writer=True) as store:
        result = asyncio.run(apply_until_settled(settings, signer, store, allow_mass_cancel))
    print_plan(result.plan, [str(e) for e in result.desired.errors])
    click.echo(result.summary())
    if result.plan.blocked or not result.plan.ready:
        sys.exit(EXIT_BLOCKED)
    sys.exit(EXIT_ERROR if result.report.failed else EXIT_OK)


async def apply_until_settled(
    settings: Settings, signer: Signer, store: StateStore, allow_mass_cancel: bool,
    rounds: int = 5,
) -> PassResult:
    """Passes until a plan has no changes (a replace or resolve can take two passes)."""
    policy = wiring.plan_policy(settings, allow_mass_cancel=allow_mass_cancel)
    source = wiring.source(settings)
    if isinstance(source, Fetching):
        try:
            await asyncio.to_thread(source.fetch)
        except FetchError as exc:  # the pass below then reports the source not ready
            structlog.get_logger("reconciler").error("git.fetch_failed", error=str(exc))
    reconciler = wiring.reconciler(settings, store, policy, source)
    async with wiring.backend(settings, signer) as backend:
        executor = wiring.executor(settings, store, backend, policy)
        if sys.stderr.isatty():
            executor.on_progress = _progress_line
        try:
            await observe(store, backend, policy)
        except RequesterError as exc:  # planning goes on; effects meet the same error
            structlog.get_logger("reconciler").warning("observe.failed", error=str(exc))
        first = result = await reconciler.run_pass(executor)
        for _ in range(rounds - 1):
            if not result.plan.changes or result.report.failed:
                break
            result = await reconciler.run_pass(executor)
        if result is not first:
            counts = first.report.counts + result.report.counts
            report = ApplyReport(counts, first.report.errors + result.report.errors)
            result = PassResult(result.desired, first.plan, report, result.duration)
        return result


def _progress_line(done: int, total: int) -> None:
    end = "\n" if done == total else ""
    click.echo(f"\rapplying {done}/{total}", nl=False, err=True)
    click.echo(end, nl=False, err=True)


@main.command()
@common_options
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
@click.option("--approvals", is_flag=True, help="List approval requests (pending first).")
def status(config: Path | None, as_json: bool, approvals: bool, **flags: Any) -> None:
    """One row per managed name, and the overall state (ready / degraded / not ready)."""
    settings = settings_from(config, **flags)
    if approvals:
        _print_approvals(settings, as_json)
        return
    with opened_store(settings, writer=False) as store:
        reconciler = wiring.reconciler(settings, store)
        desired, the_plan = reconciler.plan()
        records = store.records()
    overall = PassResult(desired, the_plan).overall
    held = len(the_plan.by_action(Action.HOLD))
    rows = [
        {"name": r.name, "phase": str(r.phase), "job_id": r.job_id, "job_state": r.job_state,
         "spec_hash": r.spec_hash[:12], "source": r.path, "revision": r.revision,
         "last_error": r.last_error}
        for r in records
    ]
    if as_json:
        click.echo(json.dumps({"state": overall, "held": held, "reason": the_plan.guards[0].reason
                               if the_plan.guards else "", "jobs": rows}, indent=2))
        return
    click.echo(f"state: {overall}" + (f" ({held} held manifests)" if held else ""))
    for guard in the_plan.guards:
        click.echo(f"guard {guard.name}: {guard.reason}")
    header = ("NAME", "PHASE", "JOB ID", "JOB STATE", "SPEC", "SOURCE", "LAST ERROR")
    table = [header] + [
        (r["name"], r["phase"], r["job_id"] or "-", r["job_state"] or "-", r["spec_hash"],
         r["source"], r["last_error"] or "")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        click.echo("  ".join([*cells, str(row[-1])]).rstrip())


# --- the daemon ----------------------------------------------------------------------------


@main.command()
@common_options
@click.option("--watch", type=click.Choice(["inotify", "poll"]),
              help="How to notice changes [default: inotify; poll for NFS and the like].")
@click.option("--metrics-listen", help="host:port for /metrics, /healthz, /readyz, /sync.")
@click.option("--probe-listen", help="host:port of the job-selection probe (POST /probe).")
@click.option("--dev", is_flag=True, help="Start an embedded dev requester with a temporary "
              "key and state, and reconcile against it.")
def run(config: Path | None, dev: bool, **flags: Any) -> None:
    """Keep reconciling until stopped (SIGTERM/SIGINT; SIGHUP reloads the configuration)."""
    settings = settings_from(config, **flags)
    if settings.log_format != "auto":
        events.configure(settings.log_format)
    dev_overrides: dict[str, Any] = {}
    requester = None
    if dev:
        requester, dev_overrides = _start_dev(settings)
        settings = settings.model_copy(update=dev_overrides)
    signer = signer_from(settings)
    try:
        with opened_store(settings, writer=True) as store:
            daemon = wiring.daemon(
                settings, signer, store,
                reload=lambda: load_settings(config, **flags) if not dev_overrides
                else load_settings(config, **flags).model_copy(update=dev_overrides))
            code = asyncio.run(daemon.run())
    finally:
        if requester is not None:
            requester.stop()
            scratch = dev_overrides["key"].parent
            shutil.rmtree(scratch, ignore_errors=True)  # the throwaway key and store
    sys.exit(code)


def _start_dev(settings: Settings) -> tuple[Any, dict[str, Any]]:
    """The quick start: a dev requester on a free loopback port, a throwaway key and store."""
    import tempfile

    from reconciler.devnet import DevConfig, DevRequesterThread

    scratch = Path(tempfile.mkdtemp(prefix="reconciler-dev-"))
    key = scratch / "dev-key.pem"
    write_new_key(key, "rsa")
    state = settings.state or scratch / "state.db"
    structlog.get_logger("reconciler").info(
        "dev.started", note="reconciling against an embedded dev requester; its jobs live in "
        "memory and end when this process stops", manifests=str(settings.manifests.absolute()),
        key=str(key), state=str(state))
    requester = DevRequesterThread(DevConfig(job_duration=30.0)).start()
    structlog.get_logger("reconciler").info("dev.requester", endpoint=requester.url)
    return requester, {"endpoint": requester.url, "key": key, "state": state,
                       "api_prefix": "/api/v1"}


# --- approvals ------------------------------------------------------------------------------


@main.command()
@common_options
@click.argument("job_id")
@click.option("--node", help="Compute node base URL [default: the callback of the recorded "
              "pending approval].")
@click.option("--reject", is_flag=True, help="Refuse the job instead of approving it.")
@click.option("--reason", default="", help="Reason sent to the node.")
def approve(config: Path | None, job_id: str, node: str | None, reject: bool, reason: str,
            **flags: Any) -> None:
    """Approve (or --reject) a job waiting on a compute node, with a signed request."""
    settings = settings_from(config, **flags)
    signer = signer_from(settings)
    url = _approve_url(settings, job_id, node)
    verdict = "rejected" if reject else "approved"
    reason = reason or f"{verdict} by an operator"
    asyncio.run(_send_approval(settings, signer, url, job_id, not reject, reason))
    _record_decision(settings, job_id, verdict, reason)
    structlog.get_logger("reconciler").info("approval.sent", job_id=job_id, decision=verdict,
                                            reason=reason, node=scrub_text(url))
    click.echo(f"{job_id}: {verdict}")


def _approve_url(settings: Settings, job_id: str, node: str | None) -> str:
    if node:
        return node.rstrip("/") + "/" + settings.api_prefix.strip("/") + "/compute/approve"
    with opened_store(settings, writer=False) as store:
        pending = store.approval(job_id)
    if pending is None or not pending.callback:
        raise click.ClickException(f"{job_id}: no recorded approval request for this job; "
                                   "give the compute node with --node URL")
    return pending.callback


async def _send_approval(settings: Settings, signer: Signer, url: str, job_id: str,
                         should_bid: bool, reason: str) -> None:
    async with wiring.approver(settings, signer) as client:
        try:
            await client.approve_at(url, job_id, should_bid=should_bid, reason=reason)
        except NotAuthorized:
            raise click.ClickException(
                f"{job_id}: refused (401): this key (client id {signer.client_id}) is not the "
                "node's approver; start the node with BACALHAU_JOB_APPROVER set to it") from None
        except NoExecutions:
            raise click.ClickException(
                f"{job_id}: the node holds no execution of this job waiting for approval "
                "(already decided, expired, or another node)") from None
        except Unreachable:
            raise click.ClickException(f"cannot reach the compute node at {scrub_text(url)}"
                                       ) from None
        except RequesterError as exc:
            raise click.ClickException(f"{job_id}: {scrub_text(str(exc))}") from None


def _record_decision(settings: Settings, job_id: str, verdict: str, reason: str) -> None:
    """Mark the recorded request decided; a running daemon holds the store's daemon lock, so
    write without it (SQLite serializes the writers)."""
    try:
        store = wiring.store(settings, writer=True, exclusive=False)
    except StoreError:
        return
    with store:
        pending = store.approval(job_id)
        if pending is not None:
            store.save_approval(replace(pending, state=verdict, reason=reason,
                                        decided_at=time.time()))


def _print_approvals(settings: Settings, as_json: bool) -> None:
    with opened_store(settings, writer=False) as store:
        approvals = sorted(store.approvals(), key=lambda a: (a.state != "pending", a.received_at))
    rows = [{"job_id": a.job_id, "state": a.state, "node_id": a.node_id, "rule": a.rule,
             "reason": a.reason, "job": json.loads(a.summary), "callback": scrub_text(a.callback)}
            for a in approvals]
    if as_json:
        click.echo(json.dumps({"approvals": rows}, indent=2))
        return
    pending = sum(1 for a in approvals if a.state == "pending")
    click.echo(f"approvals: {pending} pending, {len(approvals) - pending} decided")
    for row in rows:
        job = row["job"]
        click.echo(f"{row['state']:<8} {row['job_id']}  node {row['node_id']}  "
                   f"{job.get('engine')} {job.get('image') or ''}  rule {row['rule']}: "
                   f"{row['reason']}")


# --- keys and the dev requester ------------------------------------------------------------


@main.command()
@click.option("--type", "key_type", type=click.Choice(["rsa", "ed25519"]), default="rsa",
              show_default=True, help="rsa works with every Bacalhau requester; ed25519 with "
              "the dev requester only.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Where to write the key (mode 0600; an existing file is never replaced).")
def keygen(key_type: str, out: Path) -> None:
    """Create a signing key and print its client id."""
    try:
        signer = write_new_key(out, "rsa" if key_type == "rsa" else "ed25519")
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(signer.client_id)


@main.command("dev-requester")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=1234, show_default=True, help="0 picks a free port.")
@click.option("--port-file", type=click.Path(path_type=Path),
              help="Write the bound port here once listening.")
@click.option("--job-duration", default=5.0, show_default=True,
              help="Seconds a job runs before it is Completed.")
@click.option("--approver", help="Client id allowed to approve; jobs then wait for approval.")
@click.option("--state-file", type=click.Path(path_type=Path),
              help="Persist jobs in this journal (default: memory only, like Bacalhau).")
@click.option("--error-rate", default=0.0, help="Share of requests answered 500/503/429.")
@click.option("--latency", default=0.0, help="Seconds added to every request.")
@click.option("--fail-after-store", default=0.0,
              help="Share of submits stored, then answered 500.")
@click.option("--drop-rate", default=0.0,
              help="Share of submits stored, then dropped without a reply.")
@click.option("--seed", type=int, help="Seed of the fault injection's random choices.")
@click.option("--probe-url", help="Ask this job-selection probe about each new job (the "
              "compute node's --job-selection-probe-http).")
@click.option("--submit-latency", default=0.0,
              help="Store each submitted job, then answer only after this many seconds.")
def dev_requester(
    host: str, port: int, port_file: Path | None, job_duration: float, approver: str | None,
    state_file: Path | None, error_rate: float, latency: float, fail_after_store: float,
    drop_rate: float, seed: int | None, probe_url: str | None, submit_latency: float,
) -> None:
    """Serve a local requester with Bacalhau's wire contract, for trials and tests."""
    from reconciler.devnet import DevConfig, serve

    config = DevConfig(
        job_duration=job_duration, approver=approver, state_file=state_file,
        error_rate=error_rate, latency=latency, fail_after_store=fail_after_store,
        drop_rate=drop_rate, seed=seed, probe_url=probe_url, submit_latency=submit_latency,
    )
    serve(config, host, port, port_file)
