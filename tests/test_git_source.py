"""GitSource in-process, against real git repositories: credentials never reach the disk or
any message, and a git path that a commit removed is an empty source, not a failed fetch."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reconciler.domain.desired import collect
from reconciler.domain.plan import PlanPolicy, plan
from reconciler.sources.git import GitError, GitSource, split_credentials
from tests.harness import envelope
from tests.test_gitops import Repo

PASSWORD = "s3cret-Pa55"


class _AuthHandler(SimpleHTTPRequestHandler):
    """git's "dumb" HTTP protocol is static files: enough for a fetch behind basic auth."""

    expected = "Basic " + base64.b64encode(f"deploy:{PASSWORD}".encode()).decode()

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.expected:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Repo, str]]:
    repo = Repo(tmp_path)
    repo.commit({"jobs/a.yaml": envelope("a")})
    repo.git("update-server-info", cwd=repo.origin)
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 partial(_AuthHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield repo, f"http://127.0.0.1:{server.server_address[1]}/origin.git"
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_are_used_but_never_written_to_disk(served: tuple[Repo, str],
                                                        tmp_path: Path) -> None:
    _, url = served
    authed = url.replace("http://", f"http://deploy:{PASSWORD}@")
    workdir = tmp_path / "state" / "git"
    source = GitSource(authed, "main", "jobs", workdir)
    source.fetch()  # succeeds only if git got the password
    assert set(source.read().files) == {"a.yaml"}
    assert source.url == url
    for path in (tmp_path / "state").rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    config = (workdir / "repo.git" / "config").read_text()
    assert "deploy" not in config and url in config


def test_wrong_password_fails_without_echoing_it(served: tuple[Repo, str],
                                                 tmp_path: Path) -> None:
    _, url = served
    source = GitSource(url.replace("http://", "http://deploy:wrong-Pa55@"), "main", "jobs",
                       tmp_path / "git")
    with pytest.raises(GitError) as failure:
        source.fetch()
    assert "wrong-Pa55" not in str(failure.value)
    assert "wrong-Pa55" not in source.read().reason


def test_password_from_the_credentials_directory(served: tuple[Repo, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = served
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "git-password").write_text(PASSWORD + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    source = GitSource(url.replace("http://", "http://deploy@"), "main", "jobs",
                       tmp_path / "git")
    source.fetch()
    assert set(source.read().files) == {"a.yaml"}


def test_split_credentials() -> None:
    assert split_credentials("https://u:p%40ss@h:8/x.git") == ("https://h:8/x.git", "u", "p@ss")
    assert split_credentials("https://h/x.git") == ("https://h/x.git", None, None)
    assert split_credentials("ssh://git@h/x.git") == ("ssh://git@h/x.git", None, None)


def test_deleting_the_last_manifest_is_an_empty_source(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"jobs/a.yaml": envelope("a"), "README.md": "x\n"})
    source = GitSource(str(repo.origin), "main", "jobs", tmp_path / "git")
    source.fetch()
    commit = repo.commit(delete=("jobs/a.yaml",))
    result = source.fetch()  # no GitError: the fetch worked
    assert result.commit == commit and source.problem is None
    snapshot = source.read()
    assert snapshot.ready and snapshot.files == {} and snapshot.revision == commit
    the_plan = plan(collect(snapshot), [], PlanPolicy(), 0.0)
    assert not the_plan.ready and "empty" in the_plan.guards[0].reason
    assert plan(collect(snapshot), [], PlanPolicy(allow_empty=True), 0.0).ready


def test_a_file_at_the_git_path_is_still_an_error(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"jobs": "not a folder\n"})
    source = GitSource(str(repo.origin), "main", "jobs", tmp_path / "git")
    with pytest.raises(GitError, match="not a folder"):
        source.fetch()
