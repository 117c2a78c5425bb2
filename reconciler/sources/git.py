"""A git repository as the source: fetched into the state directory, read from snapshots.

The daemon never reads a live checkout (docs/operations-notes.md, Git sources). Each fetch updates a
bare repository under ``<state dir>/git``; each new commit is exported (``git archive
<commit>:<path>``) into ``snapshots/<commit>`` — written to a temporary folder and renamed, so it is
complete or absent — and published by renaming a symlink ``current`` over the old one. Reading goes
through :class:`~reconciler.sources.folder.FolderSource` on that symlink, whose pinned read makes
the commit hash (the link target's name) the snapshot's revision.

A failed fetch (network, auth, a missing ref) or a ``--git-path`` absent from the commit makes
the source *not ready*: the planner then cancels nothing, the last good snapshot stays on disk,
and fetches are retried with backoff. A force-push is followed like any other new commit.

Errors: :class:`GitError`, with git's stderr scrubbed of credentials.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reconciler.domain.snapshot import Snapshot
from reconciler.events import scrub_text
from reconciler.sources.folder import FolderSource

GIT_TIMEOUT = 120.0
KEEP_SNAPSHOTS = 2
_TARGET_REF = "refs/reconciler/target"


class GitError(Exception):
    """A git command failed; the message names the step and carries no credentials."""


@dataclass(frozen=True)
class FetchResult:
    commit: str
    changed: bool


class GitSource:
    def __init__(self, url: str, ref: str, path: str, workdir: Path) -> None:
        self.url, self.ref, self.path = url, ref, path.strip("/")
        self.workdir = workdir
        self.repo = workdir / "repo.git"
        self.snapshots = workdir / "snapshots"
        self.current = workdir / "current"
        self._folder = FolderSource(self.current)
        self.problem: str | None = None  # why the source is not ready, if it is not

    # --- reading (cheap; called by every pass) -----------------------------------------

    def read(self) -> Snapshot:
        if self.problem is not None:
            return Snapshot(False, self.problem, self.commit())
        if not self.current.is_symlink():
            return Snapshot(False, f"{self.url}: no revision fetched yet")
        return self._folder.read()

    def commit(self) -> str | None:
        try:
            return os.path.basename(os.readlink(self.current))
        except OSError:
            return None

    # --- fetching (slow; run on a thread) ----------------------------------------------

    def fetch(self) -> FetchResult:
        """Fetch, export and publish the ref's commit. Sets or clears :attr:`problem`."""
        try:
            result = self._fetch()
        except GitError as exc:
            self.problem = str(exc)
            raise
        self.problem = None
        return result

    def _fetch(self) -> FetchResult:
        self._ensure_repo()
        # No --prune: it would delete our own ref, which the remote's refspec does not cover.
        self._git("fetch", "--force", "--no-tags", "origin", f"+{self.ref}:{_TARGET_REF}",
                  step="fetch")
        commit = self._git("rev-parse", "--verify", f"{_TARGET_REF}^{{commit}}",
                           step="resolve").strip()
        if commit == self.commit():
            return FetchResult(commit, changed=False)
        self._export(commit)
        self._publish(commit)
        self._prune(keep=commit)
        return FetchResult(commit, changed=True)

    def _ensure_repo(self) -> None:
        if not (self.repo / "HEAD").exists():
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._git("init", "--quiet", "--bare", str(self.repo), step="init", in_repo=False)
            self._git("remote", "add", "origin", self.url, step="init")
        elif self._git("remote", "get-url", "origin", step="config").strip() != self.url:
            self._git("remote", "set-url", "origin", self.url, step="config")

    def _export(self, commit: str) -> None:
        treeish = f"{commit}:{self.path}"  # "<commit>:" is the root tree
        try:
            kind = self._git("cat-file", "-t", treeish, step="export").strip()
        except GitError:
            kind = ""
        if kind != "tree":
            raise GitError(f"{self.url}@{commit[:12]}: path {self.path!r} is not a folder in "
                           "this revision")
        archive = self._git_bytes("archive", "--format=tar", treeish, step="export")
        final = self.snapshots / commit
        if final.is_dir():
            return
        self.snapshots.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.snapshots))
        try:
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(staging, filter="data")
            os.replace(staging, final)  # a snapshot is complete or absent
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _publish(self, commit: str) -> None:
        link_tmp = self.workdir / "current.tmp"
        link_tmp.unlink(missing_ok=True)
        os.symlink(os.path.join("snapshots", commit), link_tmp)
        os.replace(link_tmp, self.current)  # the atomic publish

    def _prune(self, keep: str) -> None:
        """Drop old snapshots, keeping a few: a reader may still be inside the previous one."""
        snapshots = sorted((p for p in self.snapshots.iterdir() if p.name != keep),
                           key=lambda p: p.stat().st_mtime, reverse=True)
        for old in snapshots[KEEP_SNAPSHOTS - 1 :]:
            shutil.rmtree(old, ignore_errors=True)

    # --- the git CLI ------------------------------------------------------------------

    def _git(self, *args: str, step: str, in_repo: bool = True) -> str:
        return self._git_bytes(*args, step=step, in_repo=in_repo).decode("utf-8", "replace")

    def _git_bytes(self, *args: str, step: str, in_repo: bool = True) -> bytes:
        command = ["git", "-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null"]
        if in_repo:
            command += ["--git-dir", str(self.repo)]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_ASKPASS": "/bin/false", "LC_ALL": "C"}
        try:
            done = subprocess.run([*command, *args], capture_output=True, timeout=GIT_TIMEOUT,
                                  env=env, check=False)
        except subprocess.TimeoutExpired:
            raise GitError(f"git {step}: timed out after {GIT_TIMEOUT:.0f}s") from None
        except OSError as exc:
            raise GitError(f"git {step}: cannot run git ({exc.strerror})") from None
        if done.returncode != 0:
            detail = scrub_text(_error_line(done.stderr) or f"exit {done.returncode}")
            raise GitError(f"git {step} failed for {scrub_text(self.url)}: {detail}")
        return done.stdout


def _error_line(stderr: bytes) -> str:
    """git's own verdict (a fatal:/error: line) rather than whatever progress came last."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()
             if line.strip()]
    verdicts = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (verdicts or lines or [""])[-1]
