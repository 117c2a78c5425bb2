"""The command line as a newcomer meets it (issue 12): exit codes, one set of options, honest
status, readable plans. In-process through click's CliRunner; a dev requester process where a
command talks to one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from reconciler.app.cli import main
from reconciler.domain.records import Phase, Record
from reconciler.settings import load_settings
from reconciler.store.sqlite import Store
from tests.conftest import DevProcess
from tests.harness import envelope

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli(*args: str, color: bool = False, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), color=color, env=env)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    root.mkdir()
    (root / "hello.yaml").write_text(envelope("hello"))
    return root


def offline(folder: Path, *args: str) -> list[str]:
    return ["--manifests", str(folder), "--state", str(folder.parent / "state.db"), *args]


def online(folder: Path, dev_url: str, key: Path) -> list[str]:
    return [*offline(folder), "--endpoint", dev_url, "--key", str(key)]


def live_records(state: Path, *names: str) -> None:
    with Store(state) as store:
        store.save([Record(n, Phase.ACTIVE, "0" * 64, f"{n}.yaml", job_id=f"j-{n}")
                    for n in names])


# --- validate ---------------------------------------------------------------------------


def test_validate_takes_manifests_and_config_and_lists_every_problem(
    folder: Path, tmp_path: Path
) -> None:
    (folder / "typo.yaml").write_text(
        envelope("typo").replace("image:", "imgae:") + "policy:\n  onChnage: keep\n")
    (folder / "next.yaml").write_text(envelope("next").replace("reconciler/v1", "reconciler/v2"))
    config = tmp_path / "config.toml"
    config.write_text(f'manifests = "{folder}"\n')
    for args in (["--manifests", str(folder)], ["--config", str(config)], [str(folder)]):
        result = cli("validate", *args)
        assert result.exit_code == 1, result.output
        lines = result.stdout.splitlines()
        assert any("typo.yaml" in line and "did you mean `image`?" in line for line in lines)
        assert any("typo.yaml" in line and "did you mean `onChange`?" in line for line in lines)
        assert any("next.yaml" in line and "unsupported apiVersion" in line for line in lines)
        assert "more problem" not in result.stdout


# --- logging options --------------------------------------------------------------------


def test_log_options_after_the_command_and_a_bad_level(folder: Path) -> None:
    after = cli("plan", *offline(folder), "--log-level", "warning", "--log-format", "json")
    assert after.exit_code == 2, after.output
    bad = cli("plan", *offline(folder), "--log-level", "DEBUGX")
    assert bad.exit_code == 2 and "Invalid value for '--log-level'" in bad.output
    assert "Traceback" not in bad.output and isinstance(bad.exception, SystemExit)


def test_apply_honours_log_format_from_the_config(folder: Path, tmp_path: Path,
                                                  dev: DevProcess, rsa_key: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('log_format = "json"\ngit_interval = "30s"\n')
    # Under CliRunner stderr is no terminal: "auto" would be JSON too, so ask for console
    # first and check that the config's json wins over auto but not over the flag.
    result = cli("apply", "--config", str(config), *online(folder, dev.url, rsa_key))
    assert result.exit_code == 0, result.output
    assert any(json.loads(line).get("event") == "job.submitted"
               for line in result.stderr.splitlines() if line.startswith("{"))
    config.write_text('log_format = "console"\n')
    console = cli("apply", "--config", str(config), *online(folder, dev.url, rsa_key))
    assert console.exit_code == 0, console.output
    assert "pass.completed" in console.stderr and '{"' not in console.stderr
    flagged = cli("apply", "--config", str(config), *online(folder, dev.url, rsa_key),
                  "--log-format", "json")
    assert '"event": "pass.completed"' in flagged.stderr


def test_durations_in_the_config(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('git_interval = "30s"\nresync_interval = "5m"\ndebounce = "250ms"\n')
    settings = load_settings(config)
    assert (settings.git_interval, settings.resync_interval) == (30.0, 300.0)
    assert settings.debounce == pytest.approx(0.25)


def test_status_and_approve_list_only_what_they_use() -> None:
    status = cli("status", "--help").stdout
    assert "--state" in status and "--manifests" in status
    assert "--key" not in status
    assert "--git-interval" not in status
    # Both ask the requester which API it speaks (issue 14): status shows it, approve refuses
    # an orchestrator (no job approval there).
    assert "--endpoint" in status and "--api" in status
    approve = cli("approve", "--help").stdout
    assert "--key" in approve and "--node" in approve and "--api" in approve
    for unused in ("--manifests", "--git-url", "--allow-empty"):
        assert unused not in approve
    assert "--allow-empty" in cli("plan", "--help").stdout
    # Hidden, not refused: a script passing a common set of options keeps working.
    assert "No such option" not in cli("status", "--endpoint", "x", "--help").output


# --- plan / apply --dry-run exit codes -------------------------------------------------------


@pytest.mark.parametrize("command", [("plan",), ("apply", "--dry-run")])
def test_exit_codes(command: tuple[str, ...], folder: Path) -> None:
    changes = cli(*command, *offline(folder))
    assert changes.exit_code == 2, changes.output
    (folder / "bad.yaml").write_text("apiVersion: reconciler/v1\nkind: Job\n")
    assert cli(*command, *offline(folder)).exit_code == 1
    (folder / "bad.yaml").unlink()
    (folder / "hello.yaml").unlink()
    live_records(folder.parent / "state.db", "a", "b")
    empty = cli(*command, *offline(folder))
    assert empty.exit_code == 1 and empty.stdout.count("source is empty") == 1  # once
    assert empty.stdout.count("! hold") == 2
    Path(folder.parent / "state.db").unlink()
    allowed = cli(*command, *offline(folder), "--allow-empty")
    assert allowed.exit_code == 0 and "No changes." in allowed.stdout


def test_a_guard_blocks_with_exit_3_and_its_reason_once(folder: Path) -> None:
    live_records(folder.parent / "state.db", "a", "b", "c", "d")
    result = cli("plan", *offline(folder))
    assert result.exit_code == 3, result.output
    assert result.stdout.count("would cancel 4 of 4 live jobs") == 1
    assert result.stdout.count("x blocked") == 4
    assert cli("apply", "--dry-run", *offline(folder)).exit_code == 3
    assert cli("apply", "--dry-run", "--allow-mass-cancel", *offline(folder)).exit_code == 2


def test_no_changes_and_colour(folder: Path) -> None:
    coloured = cli("plan", *offline(folder), color=True)
    assert ANSI.search(coloured.stdout)
    plain = cli("plan", *offline(folder), color=True, env={"NO_COLOR": "1"})
    assert not ANSI.search(plain.stdout) and "+ submit" in plain.stdout
    assert not ANSI.search(cli("plan", *offline(folder)).stdout)  # not a terminal
    (folder / "hello.yaml").unlink()
    (folder / "other.txt").write_text("x")
    live_records(folder.parent / "state.db")
    assert "No changes." in cli("plan", *offline(folder), "--allow-empty").stdout


# --- secrets -------------------------------------------------------------------------------


def test_credentials_in_a_git_url_are_never_printed(folder: Path) -> None:
    state = folder.parent / "state.db"
    live_records(state, "hello")
    url = ["--git-url", "https://deploy:hunter2@127.0.0.1:9/jobs.git"]
    outputs = [cli("plan", *offline(folder), *url), cli("plan", "--json", *offline(folder), *url),
               cli("status", *offline(folder), *url),
               cli("status", "--json", *offline(folder), *url)]
    for result in outputs:
        assert "127.0.0.1:9" in result.output, result.output
        assert "hunter2" not in result.output


# --- status ----------------------------------------------------------------------------------


def test_status_without_a_state_database(folder: Path) -> None:
    result = cli("status", *offline(folder))
    assert result.exit_code == 1
    assert "no state yet" in result.output and "state: ready" not in result.output
    assert not (folder.parent / "state.db").exists()


def test_status_shows_held_rows_and_when_it_was_refreshed(folder: Path) -> None:
    live_records(folder.parent / "state.db", "hello")
    (folder / "hello.yaml").write_text(envelope("hello").replace("engine: docker", "engine: 4"))
    result = cli("status", *offline(folder))
    assert result.exit_code == 0, result.output
    [row] = [line for line in result.stdout.splitlines() if line.startswith("hello")]
    assert row.split()[1] == "held" and "spec.Engine" in row
    assert re.search(r"as of \d{4}-\d\d-\d\dT", result.stdout)
    data = json.loads(cli("status", "--json", *offline(folder)).stdout)
    assert data["jobs"][0]["phase"] == "held" and data["jobs"][0]["last_error"]
    assert data["refreshed_at"].endswith("Z") and data["recorded_at"]


# --- apply -----------------------------------------------------------------------------------


def test_apply_tries_now_after_a_failed_apply_and_exits_0_only_when_converged(
    folder: Path, dev: DevProcess, rsa_key: Path
) -> None:
    down = cli("apply", *online(folder, "http://127.0.0.1:9", rsa_key))
    assert down.exit_code == 1, down.output
    assert "cannot connect to http://127.0.0.1:9" in down.stdout
    # The requester is unreachable, so the name lookup that comes before any submit of a name
    # without a record fails first (docs/design.md, lost stores): nothing is submitted.
    failed = [json.loads(line) for line in down.stderr.splitlines()
              if '"action.failed"' in line]
    assert failed and all(e.get("retry_at") is None or re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["retry_at"]) for e in failed)
    status = json.loads(cli("status", "--json", *offline(folder)).stdout)
    assert status["state"] == "degraded"  # not in line: the job was never submitted
    assert cli("plan", *offline(folder)).exit_code == 2  # apply would try now
    again = cli("apply", *online(folder, dev.url, rsa_key))
    assert again.exit_code == 0, again.output
    assert "backing off" not in again.stdout
    assert [j["Job"]["Spec"]["Docker"]["Image"] for j in dev.jobs()] == ["ubuntu:22.04"]
    # The plan comes first, the summary last.
    lines = again.stdout.splitlines()
    assert lines[0].startswith("+ submit") and lines[-1].startswith("ready;")
    assert cli("plan", *offline(folder)).exit_code == 0


# --- the dev requester ---------------------------------------------------------------------------


def test_dev_requester_says_where_it_listens(dev: DevProcess) -> None:
    deadline = time.monotonic() + 10
    while f"dev requester listening on {dev.url}" not in dev.log.read_text():
        assert time.monotonic() < deadline, dev.log.read_text()
        time.sleep(0.05)


def test_run_dev_says_how_to_point_status_and_plan_at_it(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "--dev", "--log-format", "json"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HOME": str(tmp_path)})
    try:
        assert process.stderr is not None
        for line in process.stderr:
            event = json.loads(line)
            if event["event"] == "dev.requester":
                break
        assert event["endpoint"].startswith("http://127.0.0.1:")
        assert "reconciler status --state" in event["hint"]
        assert "reconciler plan --state" in event["hint"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)


def test_readme_documents_the_cli() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("## Commands"):readme.index("## What it will not do")]
    assert "| `reconciler approve JOB_ID" in table
    assert "--log-format" in table and "console lines on a terminal, JSON lines" in table
    for code in ("nothing to do", "changes to make", "a guard blocks"):
        assert code in table


def test_a_replace_shows_its_changed_fields_but_no_secret(
    folder: Path, dev: DevProcess, rsa_key: Path
) -> None:
    (folder / "hello.yaml").write_text(envelope("hello", env=("TOKEN=abc-old-123",)))
    assert cli("apply", *online(folder, dev.url, rsa_key)).exit_code == 0
    (folder / "hello.yaml").write_text(
        envelope("hello", image="ubuntu:24.04", env=("TOKEN=xyz-new-789",)))
    plain = cli("plan", *offline(folder))
    assert plain.exit_code == 2, plain.output
    assert "    docker.image: ubuntu:22.04 → ubuntu:24.04" in plain.stdout
    assert "docker.environmentVariables: changed (values not shown)" in plain.stdout
    as_json = json.loads(cli("plan", "--json", *offline(folder)).stdout)
    [replace] = [d for d in as_json["decisions"] if d["action"] == "replace"]
    assert "docker.image: ubuntu:22.04 → ubuntu:24.04" in replace["changes"]
    applied = cli("apply", *online(folder, dev.url, rsa_key))
    assert "docker.image: ubuntu:22.04 → ubuntu:24.04" in applied.stdout
    for result in (plain, applied):
        assert "abc-old" not in result.output and "xyz-new" not in result.output
    for path in folder.parent.glob("state.db*"):
        assert b"abc-old" not in path.read_bytes() and b"xyz-new" not in path.read_bytes()


def test_status_table_shows_version_with_the_state_and_a_one_line_short_message() -> None:
    from reconciler.app.cli import MESSAGE_WIDTH, _job_state, _short

    assert _job_state({"job_state": "Running", "job_version": 2}) == "Running v2"
    assert _job_state({"job_state": "New", "job_version": None}) == "New"
    assert _job_state({"job_state": None, "job_version": None}) == "-"
    shown = _short("exit code 1:\n  " + "x" * 200)
    assert "\n" not in shown and len(shown) == MESSAGE_WIDTH and shown.endswith("…")
    assert shown.startswith("exit code 1: xxx")
    assert _short("stopped by hand") == "stopped by hand"
