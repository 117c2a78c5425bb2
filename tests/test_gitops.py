"""Following a git repository: real repositories (a local bare origin, commits pushed by the
test), a real daemon process, a real dev requester."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DevProcess
from tests.daemon_proc import DaemonProcess, Daemons, daemon_args
from tests.harness import envelope
from tests.test_daemon import by_name, wait_until

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


class Repo:
    def __init__(self, tmp: Path) -> None:
        self.origin = tmp / "origin.git"
        self.work = tmp / "work"
        self.git("init", "--quiet", "--bare", "--initial-branch=main", str(self.origin), cwd=tmp)
        self.git("clone", "--quiet", str(self.origin), str(self.work), cwd=tmp)
        self.git("checkout", "--quiet", "-b", "main")

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.work, check=True, text=True,
                              capture_output=True, env={**os.environ, **GIT_ENV}).stdout

    def commit(self, write: dict[str, str] | None = None, delete: tuple[str, ...] = (),
               message: str = "change") -> str:
        for path, text in (write or {}).items():
            target = self.work / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        for path in delete:
            self.git("rm", "--quiet", path)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)
        self.git("push", "--quiet", "--force", "origin", "main")
        return self.git("rev-parse", "HEAD").strip()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path)


@pytest.fixture
def follow(tmp_path: Path, rsa_key: Path) -> Iterator[Callable[..., DaemonProcess]]:
    daemons = Daemons()

    def start(dev: DevProcess, url: str, *extra: str, env: dict[str, str] | None = None
              ) -> DaemonProcess:
        return daemons.start(daemon_args(
            tmp_path / "unused", tmp_path / "state" / "state.db", dev.url, rsa_key,
            "--git-url", url, "--git-interval", "0.3s", *extra), env)

    yield start
    daemons.stop_all()


def last_pass(daemon: DaemonProcess) -> dict[str, object]:
    return daemon.named("pass.completed")[-1]


def test_jobs_follow_commits(repo: Repo, dev: DevProcess,
                             follow: Callable[..., DaemonProcess]) -> None:
    first = repo.commit({"jobs/a.yaml": envelope("a"), "jobs/b.yaml": envelope("b"),
                         "README.md": "not a manifest\n"})
    daemon = follow(dev, str(repo.origin), "--git-path", "jobs")
    wait_until(lambda: by_name(dev) == {"a": ["New"], "b": ["New"]})
    assert daemon.named("git.fetched")[0]["revision"] == first
    submitted = daemon.named("job.submitted")
    assert {e["revision"] for e in submitted} == {first}

    second = repo.commit({"jobs/a.yaml": envelope("a", image="alpine"),
                          "jobs/c.yaml": envelope("c")}, delete=("jobs/b.yaml",))
    wait_until(lambda: by_name(dev) == {"a": ["Cancelled", "New"], "b": ["Cancelled"],
                                         "c": ["New"]})
    wait_until(lambda: last_pass(daemon)["revision"] == second)

    repo.commit({"jobs/c.yaml": envelope("c").replace("engine: docker", "engine: 42")})
    daemon.wait_event("manifest.invalid")
    time.sleep(0.8)
    assert by_name(dev)["c"] == ["New"]  # held: a broken commit cancels nothing

    status = subprocess.run(
        [sys.executable, "-m", "reconciler", "status", "--json", "--state",
         daemon.args[daemon.args.index("--state") + 1],
         "--git-url", str(repo.origin), "--git-path", "jobs"],
        capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert '"revision": "' + second in status.stdout
    assert '"state": "degraded"' in status.stdout


def test_unreachable_remote_is_not_ready_and_cancels_nothing(
    repo: Repo, dev: DevProcess, follow: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    repo.commit({"jobs/a.yaml": envelope("a")})
    daemon = follow(dev, str(repo.origin), "--git-path", "jobs")
    wait_until(lambda: by_name(dev) == {"a": ["New"]})
    hidden = tmp_path / "moved-away.git"
    os.rename(repo.origin, hidden)
    failure = daemon.wait_event("git.fetch_failed")[0]
    assert str(repo.origin) in failure["error"]
    wait_until(lambda: last_pass(daemon)["state"] == "not ready")
    time.sleep(1.0)
    assert by_name(dev) == {"a": ["New"]}
    assert daemon.named("source.not_ready")
    os.rename(hidden, repo.origin)
    repo.commit({"jobs/b.yaml": envelope("b")})
    wait_until(lambda: by_name(dev) == {"a": ["New"], "b": ["New"]}, timeout=20)


def test_missing_git_path_is_not_ready(repo: Repo, dev: DevProcess,
                                       follow: Callable[..., DaemonProcess]) -> None:
    repo.commit({"jobs/a.yaml": envelope("a")})
    daemon = follow(dev, str(repo.origin), "--git-path", "jobs")
    wait_until(lambda: by_name(dev) == {"a": ["New"]})
    emptied = repo.commit(delete=("jobs/a.yaml",), write={"other/x.yaml": envelope("x")})
    # git keeps no empty folder: the fetch worked, and the source is empty, not failed.
    wait_until(lambda: last_pass(daemon)["revision"] == emptied)
    assert last_pass(daemon)["state"] == "not ready"
    assert "empty" in daemon.named("source.not_ready")[-1]["reason"]
    assert not daemon.named("git.fetch_failed")
    time.sleep(1.0)
    assert by_name(dev) == {"a": ["New"]}


def test_force_push_to_an_older_commit(repo: Repo, dev: DevProcess,
                                       follow: Callable[..., DaemonProcess]) -> None:
    old = repo.commit({"a.yaml": envelope("a"), "b.yaml": envelope("b")})
    daemon = follow(dev, str(repo.origin))
    wait_until(lambda: by_name(dev) == {"a": ["New"], "b": ["New"]})
    repo.commit({"a.yaml": envelope("a", image="alpine"), "c.yaml": envelope("c")})
    wait_until(lambda: by_name(dev).get("c") == ["New"])
    repo.git("reset", "--quiet", "--hard", old)
    repo.git("push", "--quiet", "--force", "origin", "main")
    wait_until(lambda: last_pass(daemon)["revision"] == old)
    wait_until(lambda: by_name(dev) == {"a": ["Cancelled", "Cancelled", "New"],
                                         "b": ["New"], "c": ["Cancelled"]})


def test_deleting_every_manifest(repo: Repo, dev: DevProcess,
                                 follow: Callable[..., DaemonProcess]) -> None:
    names = [f"m{i}" for i in range(6)]
    repo.commit({f"{n}.yaml": envelope(n) for n in names} | {"README.md": "jobs\n"})
    daemon = follow(dev, str(repo.origin), env={"RECONCILER_ALLOW_EMPTY": "true"})
    wait_until(lambda: len(by_name(dev)) == 6)
    repo.commit(delete=tuple(f"{n}.yaml" for n in names))
    blocked = daemon.wait_event("prune.blocked")[0]
    assert blocked["count"] == 6
    time.sleep(1.0)
    assert all(states == ["New"] for states in by_name(dev).values())


def test_emptied_folder_without_allow_empty_is_not_ready(
    repo: Repo, dev: DevProcess, follow: Callable[..., DaemonProcess]
) -> None:
    repo.commit({"a.yaml": envelope("a"), "README.md": "jobs\n"})
    daemon = follow(dev, str(repo.origin))
    wait_until(lambda: by_name(dev) == {"a": ["New"]})
    repo.commit(delete=("a.yaml",))
    wait_until(lambda: last_pass(daemon)["state"] == "not ready")
    assert by_name(dev) == {"a": ["New"]}


def test_sigusr1_fetches_at_once(repo: Repo, dev: DevProcess,
                                 follow: Callable[..., DaemonProcess]) -> None:
    repo.commit({"a.yaml": envelope("a")})
    daemon = follow(dev, str(repo.origin), "--git-interval", "1h")
    wait_until(lambda: by_name(dev) == {"a": ["New"]})
    repo.commit({"b.yaml": envelope("b")})
    time.sleep(0.5)
    assert "b" not in by_name(dev)
    daemon.signal(signal.SIGUSR1)
    wait_until(lambda: by_name(dev).get("b") == ["New"], timeout=5)


def test_credentials_in_the_url_never_reach_the_logs(
    dev: DevProcess, follow: Callable[..., DaemonProcess]
) -> None:
    daemon = follow(dev, "https://deploy:hunter2-token@127.0.0.1:9/jobs.git")
    daemon.wait_event("git.fetch_failed")
    daemon.stop()
    text = "".join(daemon.raw)
    assert "hunter2-token" not in text
    assert "https://127.0.0.1:9/jobs.git" in text  # taken out of the URL altogether
