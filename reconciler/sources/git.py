"""A git repository as the source: fetched into the state directory, read from snapshots.

The daemon never reads a live checkout (docs/operations-notes.md, Git sources). Each fetch updates a
bare repository under ``<state dir>/git``; each new commit is exported (``git archive
<commit>:<path>``) into ``snapshots/<commit>`` — written to a temporary folder and renamed, so it is
complete or absent — and published by renaming a symlink ``current`` over the old one. Reading goes
through :class:`~reconciler.sources.folder.FolderSource` on that symlink, whose pinned read makes
the commit hash (the link target's name) the snapshot's revision.

A failed fetch (network, auth, a missing ref) makes the source *not ready*: the planner then
cancels nothing, the last good snapshot stays on disk, and fetches are retried with backoff. A
``--git-path`` absent from a fetched commit is an *empty* snapshot, not a failed fetch: git
keeps no empty folders, so deleting the last manifest removes the folder itself; the planner
then treats it like any emptied folder (not ready, unless ``allow_empty``). A force-push is
followed like any other new commit.

Credentials never touch the disk: ``user:password@`` is taken out of the URL before the bare
repository is created (its ``config`` holds the bare URL only) and handed to git through the
environment of each git process, answered by a small askpass helper that contains no secret
(``docs/design.md``, "Secrets"). Without a password in the URL, the file
``$CREDENTIALS_DIRECTORY/git-password`` (systemd ``LoadCredential=``) is used when present.

Errors: :class:`GitError`, with git's stderr scrubbed of credentials.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from reconciler.domain.snapshot import Snapshot
from reconciler.events import clean, scrub_text
from reconciler.ports import FetchResult
from reconciler.sources.errors import FetchError
from reconciler.sources.folder import FolderSource

GIT_TIMEOUT = 120.0
KEEP_SNAPSHOTS = 2
_TARGET_REF = "refs/reconciler/target"
#: Answers git's "Username for ..." / "Password for ..." prompts from the git process's own
#: environment, so the helper file holds no secret.
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*) printf '%s\\n' "$RECONCILER_GIT_USERNAME" ;;
  *) printf '%s\\n' "$RECONCILER_GIT_PASSWORD" ;;
esac
"""


class GitError(FetchError):
    """A git command failed; the message names the step and carries no credentials."""

    def __init__(self, message: str) -> None:
        # git's error lines can echo remote text of any length: bounded here, once.
        super().__init__(clean(message))


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``(url without user:password, user, password)``; only http(s) URLs carry them away
    (an ssh user name is part of the address, and ssh has its own keys)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url, None, None
    host = parts.netloc.rpartition("@")[2]
    bare = urlunsplit(SplitResult(parts.scheme, host, parts.path, parts.query, parts.fragment))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return bare, user, password


class GitSource:
    def __init__(self, url: str, ref: str, path: str, workdir: Path) -> None:
        # self.url never holds credentials: it is what messages, events and the repo show.
        self.url, self._user, self._password = split_credentials(url)
        self.ref, self.path = ref, path.strip("/")
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

    def describe(self) -> str:
        return f"{scrub_text(self.url)} ref {self.ref} path /{self.path}"

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
        if kind not in ("tree", ""):
            raise GitError(f"{self.url}@{commit[:12]}: path {self.path!r} is not a folder in "
                           "this revision")
        # Absent: git keeps no empty folders, so removing the last manifest removes the path.
        # That is an empty snapshot, which the planner judges like any emptied folder.
        archive = (self._git_bytes("archive", "--format=tar", treeish, step="export")
                   if kind == "tree" else b"")
        final = self.snapshots / commit
        if final.is_dir():
            return
        self.snapshots.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self.snapshots))
        try:
            if archive:
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
        # credential.helper= empties the helper list: a user's "store" helper would otherwise
        # write the password to ~/.git-credentials.
        command = ["git", "-c", "protocol.ext.allow=never", "-c", "core.hooksPath=/dev/null",
                   "-c", "credential.helper="]
        if in_repo:
            command += ["--git-dir", str(self.repo)]
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
               "GIT_ASKPASS": self._askpass(), "LC_ALL": "C"}
        env.pop("RECONCILER_GIT_PASSWORD", None)
        user, password = self._credentials()
        if password is not None:
            env |= {"RECONCILER_GIT_USERNAME": user or "git", "RECONCILER_GIT_PASSWORD": password}
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


    def _credentials(self) -> tuple[str | None, str | None]:
        if self._password is not None:
            return self._user, self._password
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if directory:
            try:
                secret = (Path(directory) / "git-password").read_text().strip()
            except OSError:
                return self._user, None
            return self._user, secret
        return self._user, None

    def _askpass(self) -> str:
        """The helper's path (written once, mode 0700, no secret in it); /bin/false when no
        credentials are known, so git fails fast instead of asking a terminal."""
        if self._credentials()[1] is None:
            return "/bin/false"
        helper = self.workdir / "askpass.sh"
        if not helper.exists():
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            temporary = self.workdir / "askpass.sh.tmp"
            temporary.unlink(missing_ok=True)
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as handle:
                handle.write(_ASKPASS)
            os.replace(temporary, helper)
        return str(helper)


def _error_line(stderr: bytes) -> str:
    """git's own verdict (a fatal:/error: line) rather than whatever progress came last."""
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines()
             if line.strip()]
    verdicts = [line for line in lines if line.startswith(("fatal:", "error:"))]
    return (verdicts or lines or [""])[-1]
