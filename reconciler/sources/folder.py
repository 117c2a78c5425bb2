"""Reading the manifests folder as one consistent snapshot.

A folder that is missing, not a directory or unreadable is *not ready*: never "zero manifests"
(docs/operations-notes.md, Lessons from other reconcilers). A subdirectory or file that cannot
be read is reported as broken, so the jobs it produced are held rather than cancelled.

When the folder is, or lies below, a symlink that an external syncer swaps (git-sync and
friends), the link is resolved once, the tree is read through a directory fd pinned to that
target, and the link is read again afterwards; if it moved, the read starts over
(docs/operations-notes.md, Git sources).
A file or directory that vanishes mid-read also restarts the read, so a listing is never
silently incomplete. The link target's name is the snapshot's revision.

Files are parsed only when their (size, mtime, ctime, inode) changed since the last read, so a
pass over an unchanged tree costs one ``stat`` per file.

With ``settle`` set (the daemon sets its ``debounce``), a snapshot also lists the files that may
still be being written: modified less than ``settle`` seconds ago by their mtime, or, when the
mtime cannot tell (whole seconds, or in the future), whose stat changed since an earlier read
less than ``settle`` seconds ago. The planner waits for those, whatever made the pass run: a
write in place sends no event until it closes, and ``--watch poll`` sees changes late.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from reconciler.domain.manifest import MAX_FILE_BYTES, FileResult, LoadError, load_file, wanted_file
from reconciler.domain.snapshot import Snapshot

MAX_DEPTH = 16
READ_ATTEMPTS = 5

_StatKey = tuple[int, int, int, int, int]


class _Moved(Exception):
    """The tree changed under the reader; read again."""


class FolderSource:
    """A manifests folder (or a symlink to one). Keeps a parse cache between reads."""

    def __init__(
        self,
        root: Path,
        *,
        settle: float = 0.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        #: Files changed less than this many seconds ago are reported as settling (0: never).
        self.settle = settle
        self._clock = clock
        self._monotonic = monotonic
        self._cache: dict[str, tuple[_StatKey, FileResult]] = {}
        self._primed = False  # a first read happened: later new or changed stats are changes
        #: path -> when a read first saw its current stat (monotonic), while that is recent
        self._changed_at: dict[str, float] = {}

    def read(self) -> Snapshot:
        for _ in range(READ_ATTEMPTS):
            try:
                return self._read_once()
            except _Moved:
                continue
        return Snapshot(False, f"{self.root}: kept changing while being read; will retry")

    def _read_once(self) -> Snapshot:
        link_path, rest = split_at_link(self.root)
        link = _read_link(link_path) if link_path is not None else None
        if link_path is not None and link is not None:
            target = link_path.parent / link / rest
            revision: str | None = os.path.basename(os.path.normpath(link))
        else:
            target, revision = self.root, None
        try:
            dfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if link_path is not None and _read_link(link_path) != link:
                raise _Moved from None
            return Snapshot(False, f"{self.root}: manifests folder does not exist")
        except NotADirectoryError:
            return Snapshot(False, f"{self.root}: not a directory")
        except OSError as exc:
            return Snapshot(False, f"{self.root}: cannot open ({exc.strerror})")
        walk = _Walk(self._cache)
        try:
            walk.directory(dfd, "", 0)
        except PermissionError as exc:
            return Snapshot(False, f"{self.root}: cannot list ({exc.strerror})")
        finally:
            os.close(dfd)
        if link_path is not None and _read_link(link_path) != link:
            raise _Moved  # swapped while we read: the listing may mix two revisions
        settling = self._settling(walk.seen)
        self._cache = walk.seen
        files = {path: result for path, (_, result) in walk.seen.items()}
        files.update(walk.failed)
        return Snapshot(True, "", revision, files, tuple(walk.broken_dirs), settling)

    def _settling(self, seen: Mapping[str, tuple[_StatKey, FileResult]]) -> frozenset[str]:
        """Files that may still be being written (see the module's docstring)."""
        if not self.settle:
            return frozenset()
        wall, now, settle = self._clock(), self._monotonic(), self.settle
        primed, self._primed = self._primed, True
        changed_at: dict[str, float] = {}
        young: set[str] = set()
        for rel, (key, _) in seen.items():
            age = wall - key[1] / 1e9
            if -settle < age < settle:
                young.add(rel)
                continue
            # An mtime that cannot tell: in the future (clock skew, NFS) or in whole seconds
            # (a coarse file system may date a write up to a second early). A stat that
            # changed since the last read then settles by the reader's clock.
            if age > 0 and key[1] % 1_000_000_000:
                continue
            before = self._cache.get(rel)
            if primed and (before is None or before[0] != key):
                changed_at[rel] = now
            elif rel in self._changed_at and now - self._changed_at[rel] < settle:
                changed_at[rel] = self._changed_at[rel]
            if rel in changed_at:
                young.add(rel)
        self._changed_at = changed_at
        return frozenset(young)


def split_at_link(root: Path) -> tuple[Path | None, Path]:
    """The deepest symlink on the way to ``root`` (the one a syncer swaps) and the path below
    it: ``/srv/git/current/jobs`` with ``current`` a link gives (``/srv/git/current``, ``jobs``)."""
    path = root.absolute()
    for depth in range(len(path.parts), 1, -1):
        candidate = Path(*path.parts[:depth])
        if candidate.is_symlink():
            return candidate, Path(*path.parts[depth:]) if depth < len(path.parts) else Path()
    return None, Path()


def _read_link(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


class _Walk:
    """One recursive listing below a pinned directory fd."""

    def __init__(self, cache: Mapping[str, tuple[_StatKey, FileResult]]) -> None:
        self._cache = cache
        self.seen: dict[str, tuple[_StatKey, FileResult]] = {}
        self.failed: dict[str, FileResult] = {}
        self.broken_dirs: list[str] = []

    def directory(self, dfd: int, prefix: str, depth: int) -> None:
        with os.scandir(dfd) as entries:
            listing = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in listing:
            if name.startswith("."):
                continue  # hidden files and folders, .git included
            if is_dir:
                if wanted_file(name):  # x.yaml/ replaced a file: hold what x.yaml made
                    self.failed[prefix + name] = _unreadable(prefix + name, None,
                                                             "a folder, not a manifest file")
                self._subdirectory(dfd, prefix + name + "/", name, depth)
            elif wanted_file(name):
                self._file(dfd, prefix + name, name)

    def _subdirectory(self, dfd: int, rel: str, name: str, depth: int) -> None:
        if depth >= MAX_DEPTH:
            self._broken_dir(rel, f"deeper than {MAX_DEPTH} levels; not read")
            return
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            raise _Moved from None
        except OSError as exc:
            self._broken_dir(rel, f"cannot open ({exc.strerror})")
            return
        try:
            self.directory(sub, rel, depth + 1)
        except PermissionError as exc:
            self._broken_dir(rel, f"cannot list ({exc.strerror})")
        finally:
            os.close(sub)

    def _broken_dir(self, rel: str, message: str) -> None:
        self.broken_dirs.append(rel)
        self.failed[rel] = FileResult(rel, errors=(LoadError(rel, 1, "directory", message),))

    def _file(self, dfd: int, rel: str, name: str) -> None:
        try:
            info = os.stat(name, dir_fd=dfd)
        except FileNotFoundError:
            if _exists_as_link(dfd, name):
                self.failed[rel] = _unreadable(rel, None, "symbolic link to nothing")
                return
            raise _Moved from None  # listed a moment ago: something is changing the tree
        except OSError as exc:
            self.failed[rel] = _unreadable(rel, exc)
            return
        if not stat.S_ISREG(info.st_mode):
            self.failed[rel] = _unreadable(rel, None, "not a regular file")
            return
        key = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, info.st_dev)
        cached = self._cache.get(rel)
        if cached is not None and cached[0] == key:
            self.seen[rel] = cached
            return
        if info.st_size > MAX_FILE_BYTES:
            self.seen[rel] = (key, _unreadable(rel, None, f"larger than {MAX_FILE_BYTES} bytes"))
            return
        try:
            data = _read_at(dfd, name)
        except FileNotFoundError:
            raise _Moved from None
        except OSError as exc:
            self.failed[rel] = _unreadable(rel, exc)
            return
        self.seen[rel] = (key, load_file(rel, data))


def _exists_as_link(dfd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _read_at(dfd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dfd)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _unreadable(rel: str, exc: OSError | None, message: str = "") -> FileResult:
    text = message or f"cannot read ({exc.strerror if exc else 'error'})"
    return FileResult(rel, errors=(LoadError(rel, 1, "file", text),))
