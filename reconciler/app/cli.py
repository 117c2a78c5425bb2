"""The ``reconciler`` command line: thin wrappers that load settings and call the core."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click
import structlog

from reconciler import events
from reconciler.app import wiring
from reconciler.backends.errors import (
    CredentialsRejected,
    NoExecutions,
    NotAuthorized,
    RequesterError,
    Unreachable,
)
from reconciler.backends.signing import KeyFileError, Signer, load_signer, write_new_key
from reconciler.domain.desired import Desired, collect
from reconciler.domain.plan import SYMBOLS, Action, Plan
from reconciler.domain.records import Record, Run
from reconciler.domain.specview import spec_view, view_changes
from reconciler.engine.executor import ApplyReport
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import PassResult
from reconciler.events import iso_time, scrub_text
from reconciler.ports import Fetching, StateStore
from reconciler.settings import Settings, SettingsError, load_settings, parse_duration
from reconciler.sources.errors import FetchError
from reconciler.store.errors import StoreError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK, EXIT_ERROR, EXIT_CHANGES, EXIT_BLOCKED = 0, 1, 2, 3


LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_option_callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``--log-format``/``--log-level`` work before and after the command: each use records
    its value on the root context, and events are configured again with what is known."""
    if value is None:
        return value
    meta = ctx.find_root().meta
    meta[f"reconciler.{param.name}"] = value
    events.configure(meta.get("reconciler.log_format", "auto"),
                     meta.get("reconciler.log_level", "info"))
    return value


def log_options(command: F) -> F:
    for option in reversed([
        click.option("--log-format", type=click.Choice(["auto", "json", "console"]),
                     default=None, expose_value=False, callback=_log_option_callback,
                     help="Event format: JSON lines, console lines, or by whether stderr is a "
                     "terminal (console lines on a terminal, JSON otherwise) [default: auto, "
                     "or log_format from the config]."),
        click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False),
                     default=None, expose_value=False, callback=_log_option_callback,
                     help="Least severe events shown [default: info]."),
    ]):
        command = option(command)
    return command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@log_options
@click.version_option(package_name="reconciler")
def main() -> None:
    """Keep a Bacalhau network in line with a folder of job manifests."""
    meta = click.get_current_context().meta
    if "reconciler.log_format" not in meta and "reconciler.log_level" not in meta:
        events.configure("auto", "info")


def _configure_from(settings: Settings) -> None:
    """``log_format`` from the config applies unless ``--log-format`` was given."""
    meta = click.get_current_context().find_root().meta
    if "reconciler.log_format" not in meta and settings.log_format != "auto":
        events.configure(settings.log_format, meta.get("reconciler.log_level", "info"))


class Duration(click.ParamType[float]):
    """Seconds, written ``30``, ``30s``, ``5m`` or ``1h``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        seconds = parse_duration(value)
        if isinstance(seconds, int | float) and not isinstance(seconds, bool):
            return float(seconds)
        self.fail(f"{value!r} is not a duration (e.g. 30s, 5m)", param, ctx)


#: Options shared by the commands; each is also a setting (RECONCILER_*). A command lists the
#: ones it uses; the others are still accepted (scripts may pass a common set) but hidden.
_SHARED: dict[str, Callable[..., Any]] = {
    "config": lambda hidden: click.option(
        "--config", type=click.Path(path_type=Path), hidden=hidden,
        help="TOML config file [default: /etc/reconciler/config.toml]."),
    "manifests": lambda hidden: click.option(
        "--manifests", type=click.Path(path_type=Path), hidden=hidden,
        help="Folder of job manifests [default: ./manifests]."),
    "endpoint": lambda hidden: click.option(
        "--endpoint", hidden=hidden, help="Requester base URL [default: http://127.0.0.1:1234]."),
    "key": lambda hidden: click.option(
        "--key", type=click.Path(path_type=Path), hidden=hidden, help="Signing key file."),
    "api": lambda hidden: click.option(
        "--api", type=click.Choice(["auto", "legacy", "orchestrator"]), hidden=hidden,
        help="The requester's API: auto asks its version (v1.5+: orchestrator) "
        "[default: auto]."),
    "namespace": lambda hidden: click.option(
        "--namespace", hidden=hidden, help="Orchestrator namespace [default: default]."),
    "state": lambda hidden: click.option(
        "--state", hidden=hidden,
        help="State database: a file, or postgresql://user@host/db (HA)."),
    "git_url": lambda hidden: click.option(
        "--git-url", hidden=hidden, help="Follow this git repository instead of a folder."),
    "git_ref": lambda hidden: click.option(
        "--git-ref", hidden=hidden, help="Branch or tag to follow [default: main]."),
    "git_path": lambda hidden: click.option(
        "--git-path", hidden=hidden, help="Folder of manifests inside the repository."),
    "git_interval": lambda hidden: click.option(
        "--git-interval", type=Duration(), hidden=hidden,
        help="Time between fetches, e.g. 30s [default: 30s]."),
    "allow_empty": lambda hidden: click.option(
        "--allow-empty/--no-allow-empty", default=None, hidden=hidden,
        help="An empty folder means 'cancel everything' instead of 'not ready' "
        "[default: no]."),
}
_SOURCE = ("config", "manifests", "state", "git_url", "git_ref", "git_path", "allow_empty")


def common_options(*uses: str) -> Callable[[F], F]:
    """Add every shared option to a command, listing (in --help) only those in ``uses``."""
    def decorate(command: F) -> F:
        for name in reversed(_SHARED):
            command = _SHARED[name](name not in uses)(command)
        return log_options(command)
    return decorate


def settings_from(config: Path | None, **flags: Any) -> Settings:
    try:
        settings = load_settings(config, **flags)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    _configure_from(settings)
    return settings


def refused(exc: CredentialsRejected) -> click.ClickException:
    """The server refused the credentials: one line naming the setting to fix, exit 1, as
    for every other configuration error (README, "Exit codes")."""
    return click.ClickException(scrub_text(str(exc)))


def signer_from(settings: Settings) -> Signer:
    try:
        return load_signer(settings.key_path())
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None


def maybe_signer(settings: Settings) -> Signer | None:
    """The signing key; only the legacy API needs one, so with ``api`` auto or orchestrator a
    key file that is not there at all is an error only once the requester turns out to be
    legacy. A key given or present is loaded and refused as before (loose mode, bad PEM)."""
    if settings.api == "legacy" or settings.key is not None or settings.key_path().exists():
        return signer_from(settings)  # a key that is there is checked (permissions) as ever
    return None


@contextmanager
def opened_store(settings: Settings, *, writer: bool) -> Iterator[StateStore]:
    try:
        store = wiring.store(settings, writer=writer)
    except StoreError as exc:
        raise click.ClickException(scrub_text(str(exc))) from None
    try:
        yield store
    finally:
        store.close()


def out(text: str = "", **style: Any) -> None:
    """One line on stdout: styled on a terminal (click strips the codes elsewhere), never
    with NO_COLOR set (https://no-color.org), credentials in URLs always masked."""
    line = scrub_text(text)
    no_color = bool(os.environ.get("NO_COLOR"))
    click.echo(click.style(line, **style) if style and not no_color else line,
               color=False if no_color else None)


# --- validate / plan / apply / status ----------------------------------------------------


@main.command()
@common_options("config", "manifests")
@click.argument("directory", type=click.Path(path_type=Path), required=False)
def validate(config: Path | None, directory: Path | None, **flags: Any) -> None:
    """Check every manifest: one line per problem. Exit 0 when all are valid, else 1.

    DIRECTORY is the same as --manifests (kept for older scripts)."""
    if directory is not None:
        flags["manifests"] = directory
    settings = settings_from(config, **flags)
    desired = collect(wiring.folder(settings.manifests).read())
    if not desired.ready:
        click.echo(f"error: {scrub_text(desired.reason)}", err=True)
        sys.exit(EXIT_ERROR)
    for error in desired.errors:
        out(str(error))
    click.echo(f"{len(desired.manifests)} valid, {len(desired.errors)} errors", err=True)
    sys.exit(EXIT_ERROR if desired.errors else EXIT_OK)


def plan_exit(desired: Desired, the_plan: Plan) -> int:
    """``plan`` and ``apply --dry-run``: 1 a manifest error or the source not ready, 3 a
    guard blocks, 2 changes, 0 nothing to do (README, "Exit codes")."""
    if not the_plan.ready or desired.errors:
        return EXIT_ERROR
    if the_plan.blocked:
        return EXIT_BLOCKED
    return EXIT_CHANGES if the_plan.changes else EXIT_OK


def _preview(settings: Settings, allow_mass_cancel: bool = False
             ) -> tuple[Desired, Plan, Changes]:
    """The offline plan, as a one-shot ``apply`` would make it (it tries failed actions now,
    without the daemon's backoff)."""
    policy = wiring.plan_policy(settings, allow_mass_cancel=allow_mass_cancel,
                                honour_backoff=False)
    with opened_store(settings, writer=False) as store:
        desired, the_plan = wiring.reconciler(settings, store, policy).plan(policy)
        return desired, the_plan, replace_changes(store, the_plan)


Changes = dict[str, list[str]]


def replace_changes(store: StateStore, the_plan: Plan) -> Changes:
    """A replace's changed fields (``docker.image: a → b``), from the view the store kept of
    the running spec; secret values are never part of a view (domain/specview.py)."""
    changes: Changes = {}
    for decision in the_plan.by_action(Action.REPLACE, Action.WAIT):
        if decision.record is None or decision.manifest is None:
            continue
        old = store.view(decision.record.spec_hash)
        if old is not None and decision.record.spec_hash != decision.manifest.spec_hash:
            changes[decision.name] = view_changes(old, spec_view(decision.manifest.wire()))
    return changes


@main.command("plan")
@common_options(*_SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option("--all", "show_all", is_flag=True, help="Also list unchanged names.")
def plan_command(config: Path | None, as_json: bool, show_all: bool, **flags: Any) -> None:
    """Show what apply would do and why. Offline.

    Exit 0 nothing to do, 2 changes, 1 a manifest error or the source not ready, 3 a guard
    blocks."""
    settings = settings_from(config, **flags)
    desired, the_plan, changes = _preview(settings)
    errors = [str(e) for e in desired.errors]
    if as_json:
        out(json.dumps(plan_json(the_plan, errors, changes), indent=2))
    else:
        print_plan(the_plan, errors, show_all, changes)
    sys.exit(plan_exit(desired, the_plan))


def plan_json(the_plan: Plan, errors: list[str], changes: Changes | None = None
              ) -> dict[str, Any]:
    return {
        "ready": the_plan.ready,
        "revision": the_plan.revision,
        "decisions": [
            {"name": d.name, "action": str(d.action), "reason": d.reason, "path": d.path,
             "job_id": d.job_id} | ({"changes": (changes or {})[d.name]}
                                    if d.name in (changes or {}) else {})
            | ({"next_run": _iso_or_none(d.scheduled.slot.next_run)} if d.scheduled else {})
            for d in the_plan.decisions
        ],
        "guards": [{"name": g.name, "reason": g.reason, "names": list(g.names)}
                   for g in the_plan.guards],
        "errors": errors,
    }


_COLOURS = {Action.SUBMIT: "green", Action.RESUBMIT: "green", Action.REPLACE: "yellow",
            Action.CANCEL: "red", Action.FORGET: "red", Action.RESOLVE: "cyan",
            Action.UPDATE: "cyan", Action.HOLD: "magenta", Action.BLOCKED: "red",
            Action.WAIT: "blue"}


def print_plan(the_plan: Plan, errors: list[str], show_all: bool = False,
               changes: Changes | None = None) -> None:
    for decision in the_plan.decisions:
        # A scheduled manifest's no-op names its next run: shown, as that is what plan is for.
        if decision.action is Action.NOOP and not show_all and decision.scheduled is None:
            continue
        job = f" [{decision.job_id}]" if decision.job_id else ""
        out(f"{SYMBOLS[decision.action]} {decision.action:<8} {decision.name}{job}: "
            f"{decision.reason}", fg=_COLOURS.get(decision.action))
        for change in (changes or {}).get(decision.name, ()):
            out(f"    {change}", fg=_COLOURS.get(decision.action))
    for guard in the_plan.guards:  # a guard's reason once, not on every job it holds
        out(f"guard {guard.name}: {guard.reason}", fg="red", bold=True)
    for error in errors:
        out(f"error {error}", fg="red")
    if not the_plan.changes:
        out("No changes.")
        return
    counts = {a: len(the_plan.by_action(a)) for a in Action}
    out(
        f"Plan: {counts[Action.SUBMIT] + counts[Action.RESUBMIT]} to submit, "
        f"{counts[Action.REPLACE]} to replace, {counts[Action.CANCEL]} to cancel, "
        f"{counts[Action.RESOLVE]} to resolve, {counts[Action.FORGET]} to forget, "
        f"{counts[Action.UPDATE]} to update, "
        + (f"{counts[Action.SKIP]} slots to skip, " if counts[Action.SKIP] else "")
        + f"{counts[Action.HOLD]} held, {counts[Action.BLOCKED]} blocked.", bold=True
    )


@main.command("apply")
@common_options("endpoint", "key", "api", "namespace", *_SOURCE)
@click.option("--allow-mass-cancel", is_flag=True,
              help="Allow this one run to cancel past the mass-cancel guard.")
@click.option("--dry-run", is_flag=True,
              help="Plan and print only; change nothing (exit codes as for plan).")
def apply_command(config: Path | None, allow_mass_cancel: bool, dry_run: bool,
                  **flags: Any) -> None:
    """Act now, until nothing is left to do; failed actions are tried again at once (backoff
    is the daemon's). Prints the plan, then progress, then a summary.

    Exit 0 converged, 1 errors (or not converged, or the server refuses the credentials:
    nothing more is sent then), 3 blocked by a guard."""
    settings = settings_from(config, **flags)
    if dry_run:
        desired, the_plan, changes = _preview(settings, allow_mass_cancel)
        print_plan(the_plan, [str(e) for e in desired.errors], changes=changes)
        sys.exit(plan_exit(desired, the_plan))
    signer = maybe_signer(settings)
    with opened_store(settings, writer=True) as store:
        try:
            outcome = asyncio.run(apply_until_settled(settings, signer, store,
                                                      allow_mass_cancel))
        except SettingsError as exc:
            raise click.ClickException(str(exc)) from None
        except CredentialsRejected as exc:
            raise refused(exc) from None
    result = outcome.result
    out(result.summary(), bold=True)
    for error in result.report.errors:
        out(f"error {error}", fg="red")
    if not result.plan.ready or result.desired.errors:
        sys.exit(EXIT_ERROR)
    if result.plan.blocked:
        sys.exit(EXIT_BLOCKED)
    if not outcome.converged:
        click.echo("not converged: " + (
            "actions failed" if result.report.failed else "decisions still pending"), err=True)
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK)


@dataclass(frozen=True)
class ApplyOutcome:
    result: PassResult
    #: The last pass found nothing left to do (nothing failed, nothing waiting).
    converged: bool


async def apply_until_settled(
    settings: Settings, signer: Signer | None, store: StateStore, allow_mass_cancel: bool,
    rounds: int = 5,
) -> ApplyOutcome:
    """Passes until a plan has no changes (a replace or resolve can take two passes)."""
    policy = wiring.plan_policy(settings, allow_mass_cancel=allow_mass_cancel,
                                honour_backoff=False)
    source = wiring.source(settings)
    if isinstance(source, Fetching):
        try:
            await asyncio.to_thread(source.fetch)
        except FetchError as exc:  # the pass below then reports the source not ready
            structlog.get_logger("reconciler").error("git.fetch_failed", error=str(exc))
    reconciler = wiring.reconciler(settings, store, policy, source)
    leader = wiring.leader_of(store)
    if leader is not None and not await asyncio.to_thread(leader.campaign):
        # A PostgreSQL state shared with daemons: only the leader acts (docs/design.md,
        # "High availability"); apply takes the lease only when nobody holds it.
        info = wiring.leader_info(settings)
        raise click.ClickException(
            f"{store.location}: another reconciler leads ("
            f"{info['holder'] if info else 'unknown'}); it reconciles this folder, so apply "
            "changes nothing (use `plan` to preview)")
    async with wiring.backend(settings, signer) as opened:
        backend = opened if leader is None else wiring.fenced(
            opened, lambda: leader.epoch is not None)
        executor = wiring.executor(settings, store, backend, policy)
        if sys.stderr.isatty():
            executor.on_progress = _progress_line
        try:
            await observe(store, backend, policy)
        except CredentialsRejected:
            raise  # a configuration error: nothing else would be accepted either
        except RequesterError as exc:  # planning goes on; effects meet the same error
            structlog.get_logger("reconciler").warning("observe.failed", error=str(exc))
        desired, preview = reconciler.plan()
        # The plan first, then act.
        print_plan(preview, [str(e) for e in desired.errors],
                   changes=replace_changes(store, preview))
        first = result = await reconciler.run_pass(executor)
        for _ in range(rounds - 1):
            if not result.plan.changes or result.report.failed:
                break
            if leader is not None:  # renewed between passes; a lost lease fails the pass
                await asyncio.to_thread(leader.campaign)
            result = await reconciler.run_pass(executor)
        converged = (not result.plan.changes and not result.report.failed
                     and not result.plan.by_action(Action.WAIT))
        if result.plan.changes and not result.report.failed:
            # The last pass acted: converged only if what it left needs nothing more.
            _, after = reconciler.plan()
            converged = not after.changes and not after.by_action(Action.WAIT)
        if result is not first:
            counts = first.report.counts + result.report.counts
            report = ApplyReport(counts, first.report.errors + result.report.errors)
            result = PassResult(result.desired, first.plan, report, result.duration)
        return ApplyOutcome(result, converged)


def _progress_line(done: int, total: int) -> None:
    end = "\n" if done == total else ""
    click.echo(f"\rapplying {done}/{total}", nl=False, err=True)
    click.echo(end, nl=False, err=True)


_STATE_COLOURS = {"ready": "green", "degraded": "yellow", "not ready": "red"}


@main.command()
@common_options("endpoint", "api", *_SOURCE)
@click.option("--json", "as_json", is_flag=True, help="Print status as JSON.")
@click.option("--approvals", is_flag=True, help="List approval requests (pending first).")
def status(config: Path | None, as_json: bool, approvals: bool, **flags: Any) -> None:
    """One row per managed name, and the overall state (ready / degraded / not ready).

    Exit 1 when there is no state database yet, or the server refuses the credentials."""
    settings = settings_from(config, **flags)
    if not wiring.is_postgres(settings) and not wiring.state_path(settings).exists():
        raise click.ClickException(
            f"no state yet: {wiring.state_path(settings)} does not exist (nothing has been "
            "reconciled with this --state; run `reconciler run` or `reconciler apply`)")
    if approvals:
        _print_approvals(settings, as_json)
        return
    refreshed = time.time()
    with opened_store(settings, writer=False) as store:
        reconciler = wiring.reconciler(settings, store)
        desired, the_plan = reconciler.plan()
        records = store.records()
        runs = store.runs()
    try:
        choice = asyncio.run(wiring.choose_api(settings, wait=2.0))
        if choice.api == "orchestrator" and not choice.detail:
            # One authenticated request: a daemon with these credentials would exit 78.
            asyncio.run(wiring.check_credentials(settings, wait=2.0))
    except CredentialsRejected as exc:
        raise refused(exc) from None
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    api = {"api": choice.api, "mode": choice.mode,
           "server_version": choice.server_version or ("unknown" if choice.detail else "")}
    overall = PassResult(desired, the_plan).overall
    if overall == "ready" and any(d.action is not Action.SKIP for d in the_plan.changes):
        # Changes not carried out yet (a requester that could not be reached, a daemon that is
        # not running): the network is not in line with the folder.
        overall = "degraded"
    leader = wiring.leader_info(settings)
    held = len(the_plan.by_action(Action.HOLD))
    holds = {d.name: d.reason for d in the_plan.by_action(Action.HOLD)}
    written = max((r.updated_at for r in records), default=0.0)
    rows = [
        {"name": r.name, "phase": "held" if r.name in holds else str(r.phase),
         "job_id": r.job_id, "job_state": r.job_state, "job_version": r.job_version,
         "job_message": r.job_message, "spec_hash": r.spec_hash[:12],
         "source": r.path, "revision": r.revision,
         "last_error": holds.get(r.name) or r.last_error}
        for r in records
    ]
    schedules = _schedule_rows(the_plan, records, runs)
    if as_json:
        out(json.dumps({"state": overall, "held": held, "reason": the_plan.guards[0].reason
                        if the_plan.guards else "", "refreshed_at": iso_time(refreshed),
                        "recorded_at": iso_time(written), "api": api, "jobs": rows,
                        "schedules": schedules}
                       | ({"leader": leader} if wiring.is_postgres(settings) else {}),
                       indent=2))
        return
    out(f"state: {overall}" + (f" ({held} held manifests)" if held else ""),
        fg=_STATE_COLOURS.get(overall), bold=True)
    out(f"api: {api['api']} ({api['mode']} mode), server "
        f"{api['server_version'] or 'without a version route (legacy)'}")
    age = f" ({refreshed - written:.0f}s ago)" if written else ""
    out(f"as of {iso_time(refreshed)}: source read now; store last written "
        f"{iso_time(written) or 'never'}{age}")
    if wiring.is_postgres(settings):
        out(f"leader: {leader['holder'] or 'none'} since {leader['since']} (epoch "
            f"{leader['epoch']}; lease until {leader['expires']})" if leader
            else "leader: unknown (the lease could not be read)")
    for guard in the_plan.guards:
        out(f"guard {guard.name}: {guard.reason}", fg="red")
    header = ("NAME", "PHASE", "JOB ID", "JOB STATE", "SPEC", "SOURCE", "MESSAGE",
              "LAST ERROR")
    table: list[tuple[Any, ...]] = [header] + [
        (r["name"], r["phase"], r["job_id"] or "-", _job_state(r), r["spec_hash"],
         r["source"], _short(str(r["job_message"] or "")), r["last_error"] or "")
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header) - 1)]
    for row in table:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        out("  ".join([*cells, str(row[-1])]).rstrip(),
            fg="magenta" if row[1] == "held" else None)
    if schedules:
        lines: list[tuple[str, ...]] = [("SCHEDULED", "LAST RUN", "OUTCOME", "NEXT RUN")]
        lines += [(str(r["name"]), str(r["last_run"] or "-"), str(r["outcome"] or "-"),
                   str(r["next_run"] or ("suspended" if r["suspended"] else "-")))
                  for r in schedules]
        sizes = [max(len(line[i]) for line in lines) for i in range(4)]
        out()
        for line in lines:
            out("  ".join(c.ljust(w) for c, w in zip(line, sizes, strict=True)).rstrip())


#: The job message's width in the status table (``--json`` has it whole): the table should
#: stay readable on a 100-column terminal.
MESSAGE_WIDTH = 32


def _job_state(row: Mapping[str, Any]) -> str:
    """``Running v2``: the state and, where the backend has one, the job's version."""
    state = row["job_state"] or "-"
    return state if row["job_version"] is None else f"{state} v{row['job_version']}"


def _short(text: str, width: int = MESSAGE_WIDTH) -> str:
    """One line of at most ``width`` characters (server text may hold newlines)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _iso_or_none(instant: Any) -> str | None:
    return None if instant is None else str(instant.isoformat())


def _schedule_rows(the_plan: Plan, records: list[Record], runs: list[Run]
                   ) -> list[dict[str, Any]]:
    """Per scheduled manifest: its last run (slot), that run's outcome (the record's phase
    while it is the current run) and its next run; earlier runs as ``runs``."""
    by_name = {r.name: r for r in records}
    history: dict[str, list[Run]] = {}
    for run in runs:
        history.setdefault(run.name, []).append(run)
    rows = []
    for d in the_plan.decisions:
        if d.scheduled is None:
            continue
        mine = history.get(d.name, [])
        last = mine[0] if mine else None
        record = by_name.get(d.name)
        outcome = None
        if last is not None:
            outcome = (str(record.phase) if last.outcome == "current" and record is not None
                       else last.outcome)
        slot = d.scheduled.slot
        upcoming = slot.slot if slot.action == "fire" else slot.next_run
        rows.append({"name": d.name,
                     "last_run": iso_time(last.slot) if last else None,
                     "outcome": outcome, "next_run": _iso_or_none(upcoming),
                     "suspended": d.manifest is not None and d.manifest.policy.suspend,
                     "runs": [{"slot": iso_time(r.slot), "job_id": r.job_id,
                               "outcome": r.outcome} for r in mine[1:]]})
    return rows


# --- the daemon ----------------------------------------------------------------------------


@main.command()
@common_options("endpoint", "key", "api", "namespace", "git_interval", *_SOURCE)
@click.option("--watch", type=click.Choice(["inotify", "poll"]),
              help="How to notice changes [default: inotify; poll for NFS and the like].")
@click.option("--metrics-listen", help="host:port for /metrics, /healthz, /readyz, /sync.")
@click.option("--probe-listen", help="host:port of the job-selection probe (POST /probe).")
@click.option("--dev", is_flag=True, help="Start an embedded dev requester with a temporary "
              "key and state, and reconcile against it.")
@click.option("--bacalhau-version", type=click.Choice(["1.0", "1.6", "1.9"]), default="1.0",
              show_default=True, help="With --dev: the Bacalhau the dev requester emulates "
              "(1.9: the orchestrator API with job names).")
def run(config: Path | None, dev: bool, bacalhau_version: str, **flags: Any) -> None:
    """Keep reconciling until stopped (SIGTERM/SIGINT; SIGHUP reloads the configuration).

    Exit 0 when stopped; 78 (EX_CONFIG) when the server refuses the credentials (a 401/403
    from the orchestrator API: logged once as api.unauthorized, never retried)."""
    settings = settings_from(config, **flags)
    dev_overrides: dict[str, Any] = {}
    requester = None
    if dev:
        requester, dev_overrides = _start_dev(settings, bacalhau_version)
        settings = settings.model_copy(update=dev_overrides)
    signer = maybe_signer(settings)
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


def _start_dev(settings: Settings, bacalhau_version: str = "1.0"
               ) -> tuple[Any, dict[str, Any]]:
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
    requester = DevRequesterThread(DevConfig(job_duration=30.0,
                                             bacalhau_version=bacalhau_version)).start()
    manifests = str(settings.manifests.absolute())
    hint = (f"reconciler status --state {state} --manifests {manifests}; "
            f"reconciler plan --state {state} --manifests {manifests}")
    structlog.get_logger("reconciler").info("dev.requester", endpoint=requester.url, hint=hint)
    if sys.stderr.isatty():  # otherwise stderr is JSON events, and dev.requester has the hint
        click.echo(f"dev requester listening on {requester.url}; from another terminal, "
                   f"while this runs:\n  {hint.replace('; ', chr(10) + '  ')}", err=True)
    return requester, {"endpoint": requester.url, "key": key, "state": state,
                       "api_prefix": "/api/v1"}


# --- approvals ------------------------------------------------------------------------------


@main.command()
@common_options("config", "key", "state", "endpoint", "api")
@click.argument("job_id")
@click.option("--node", help="Compute node base URL [default: the callback of the recorded "
              "pending approval].")
@click.option("--reject", is_flag=True, help="Refuse the job instead of approving it.")
@click.option("--reason", default="", help="Reason sent to the node.")
def approve(config: Path | None, job_id: str, node: str | None, reject: bool, reason: str,
            **flags: Any) -> None:
    """Approve (or --reject) a job waiting on a compute node, with a signed request.

    Legacy API only: Bacalhau v1.5+ (the orchestrator API) has no job approval (exit 1)."""
    settings = settings_from(config, **flags)
    try:
        choice = asyncio.run(wiring.choose_api(settings))
    except CredentialsRejected as exc:
        raise refused(exc) from None
    if choice.api == "orchestrator":
        raise click.ClickException(
            f"{job_id}: the requester speaks the orchestrator API (Bacalhau "
            f"{choice.server_version or 'v1.5+'}), which has no job approval: there is nothing "
            "to approve (approval is for legacy compute nodes, Bacalhau <= 1.4)")
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
    try:
        pending = store.approval(job_id)
        if pending is not None:
            store.save_approval(replace(pending, state=verdict, reason=reason,
                                        decided_at=time.time()))
    finally:
        store.close()


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
@log_options
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
@log_options
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
@click.option("--bacalhau-version", type=click.Choice(["1.0", "1.6", "1.9"]), default="1.0",
              show_default=True, help="Emulate this Bacalhau: 1.0 (legacy API), 1.6 "
              "(orchestrator API, legacy routes 410) or 1.9 (orchestrator API with job names).")
@click.option("--api-key", envvar="DEVNET_API_KEY",
              help="Require 'Authorization: Bearer KEY' (1.9 only; 20-255 characters).")
@click.option("--api-user", envvar="DEVNET_API_USER",
              help="Require 'Authorization: Basic' for USER:PASSWORD (1.9 only).")
@click.option("--git-version", help="Report this GitVersion instead of the profile's.")
def dev_requester(
    host: str, port: int, port_file: Path | None, job_duration: float, approver: str | None,
    state_file: Path | None, error_rate: float, latency: float, fail_after_store: float,
    drop_rate: float, seed: int | None, probe_url: str | None, submit_latency: float,
    bacalhau_version: str, api_key: str | None, api_user: str | None, git_version: str | None,
) -> None:
    """Serve a local requester with Bacalhau's wire contract, for trials and tests."""
    from reconciler.devnet import DevConfig, serve

    try:
        config = DevConfig(
            job_duration=job_duration, approver=approver, state_file=state_file,
            error_rate=error_rate, latency=latency, fail_after_store=fail_after_store,
            drop_rate=drop_rate, seed=seed, probe_url=probe_url, submit_latency=submit_latency,
            bacalhau_version=bacalhau_version, api_key=api_key, api_user=api_user,
            git_version=git_version,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None

    def announce(bound: int) -> None:
        url = f"http://{host}:{bound}"
        click.echo(f"dev requester listening on {url} (point the reconciler at it: "
                   f"--endpoint {url})", err=True)

    serve(config, host, port, port_file, announce=announce)
