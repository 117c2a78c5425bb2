"""The ``reconciler`` command line."""

from __future__ import annotations

from pathlib import Path

import click

from reconciler import events
from reconciler.signing import KeyFileError, write_new_key


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
def dev_requester(
    host: str, port: int, port_file: Path | None, job_duration: float, approver: str | None,
    state_file: Path | None, error_rate: float, latency: float, fail_after_store: float,
    drop_rate: float, seed: int | None,
) -> None:
    """Serve a local requester with Bacalhau's wire contract, for trials and tests."""
    from reconciler.devnet import DevConfig, serve

    config = DevConfig(
        job_duration=job_duration, approver=approver, state_file=state_file,
        error_rate=error_rate, latency=latency, fail_after_store=fail_after_store,
        drop_rate=drop_rate, seed=seed,
    )
    serve(config, host, port, port_file)
