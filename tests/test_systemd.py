"""The service definition, checked with systemd's own tools, and the daemon started the way
systemd starts it (credentials, state directory, notify socket, journal stream)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.backends.signing import load_signer, write_new_key
from reconciler.settings import Settings, load_settings
from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess
from tests.harness import envelope
from tests.test_daemon import NotifySocket, by_name, wait_until

ROOT = Path(__file__).parents[1]
UNIT = ROOT / "systemd/reconciler.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed (.ci/run installs it)")


def rendered_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's reconciler, as installed."""
    binary = Path(sys.executable).parent / "reconciler"
    assert binary.exists()
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace("/opt/reconciler/bin/reconciler", str(binary)))
    return unit


@needs_systemd
def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no",
                             str(rendered_unit(tmp_path))], capture_output=True, text=True)
    # verify exits 0 on unknown keys and bad values, with a warning: stderr must be empty.
    assert (result.returncode, result.stderr) == (0, "")


@needs_systemd
def test_unit_is_hardened(tmp_path: Path) -> None:
    unit = rendered_unit(tmp_path)
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                             str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]  # the threshold is on a 0-100 scale
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert score and float(score.group(1)) <= 2.0, result.stdout[-300:]


def test_unit_has_what_the_daemon_relies_on() -> None:
    text = UNIT.read_text()
    for line in ["Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "Restart=on-failure",
                 "RestartPreventExitStatus=78",
                 "StateDirectory=reconciler", "ConfigurationDirectory=reconciler",
                 "LoadCredential=signing-key:/etc/reconciler/signing-key", "WatchdogSec=",
                 "DynamicUser=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6"]:
        assert line in text
    assert "notify-reload" not in text  # not in systemd 252
    assert not re.search(r"^[^#\n]+#", text, flags=re.MULTILINE)  # no trailing comments


def test_example_config_lists_every_setting_and_loads(tmp_path: Path) -> None:
    text = (ROOT / "systemd/config.toml").read_text()
    for name in Settings.model_fields:
        assert re.search(rf"^#? ?{name} = ", text, flags=re.MULTILINE), name
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    (tmp_path / "config.toml").write_text(uncommented)
    settings = load_settings(tmp_path / "config.toml")
    assert settings.metrics_listen == "127.0.0.1:9100"
    assert settings.git_path == "manifests"


def test_daemon_started_the_way_systemd_starts_it(tmp_path: Path, dev: DevProcess) -> None:
    credentials = tmp_path / "run-credentials"
    credentials.mkdir()
    key = credentials / "signing-key"
    write_new_key(key, "rsa")
    os.chmod(key, 0o400)  # what LoadCredential= hands over
    state_dir = tmp_path / "var-lib-reconciler"
    state_dir.mkdir(mode=0o700)
    config_dir = tmp_path / "etc-reconciler"
    config_dir.mkdir()
    manifests = tmp_path / "srv-manifests"
    manifests.mkdir()
    (manifests / "a.yaml").write_text(envelope("a"))
    (config_dir / "config.toml").write_text(
        f'manifests = "{manifests}"\nendpoint = "{dev.url}"\n')
    notify = NotifySocket(str(tmp_path / "notify"))
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "STATE_DIRECTORY": str(state_dir),
           "CONFIGURATION_DIRECTORY": str(config_dir), "NOTIFY_SOCKET": str(tmp_path / "notify"),
           "WATCHDOG_USEC": "2000000", "HOME": str(tmp_path / "no-home")}
    daemon = DaemonProcess(["--config", str(config_dir / "config.toml")], env)
    try:
        wait_until(lambda: notify.with_key("READY"))
        [started] = daemon.named("daemon.started")
        assert started["client_id"] == load_signer(key).client_id
        assert started["state"] == str(state_dir / "state.db")
        assert (state_dir / "state.db").exists()
        wait_until(lambda: by_name(dev) == {"a": ["New"]})
        assert daemon.stop() == 0
        assert notify.with_key("STOPPING")
    finally:
        notify.close()
        daemon.stop()


def test_journal_stream_gets_priority_prefixes(tmp_path: Path, dev: DevProcess,
                                               rsa_key: Path) -> None:
    manifests = tmp_path / "m"
    manifests.mkdir()
    (manifests / "bad.yaml").write_text("{")
    log = tmp_path / "journal"
    with log.open("w") as stream:
        info = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        process = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--manifests", str(manifests),
             "--state", str(tmp_path / "s.db"), "--endpoint", dev.url, "--key", str(rsa_key)],
            stderr=stream, stdout=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 15
        while "pass.completed" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        process.terminate()
        assert process.wait(10) == 0
    lines = log.read_text().splitlines()
    assert any(line.startswith('<6>{"manifests"') for line in lines)
    assert any(line.startswith("<3>{") and "manifest.invalid" in line for line in lines)
    assert all(re.match(r"<\d>\{", line) for line in lines if line.strip())


def test_unit_documentation_points_at_this_project() -> None:
    [line] = [x for x in UNIT.read_text().splitlines() if x.startswith("Documentation=")]
    assert "bacalhau-project" not in line
    assert "/usr/share/doc/reconciler/README.md" in line
    readme = (ROOT / "README.md").read_text()
    assert "/usr/share/doc/reconciler" in readme  # the install steps put it there
