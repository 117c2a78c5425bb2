"""File-system events as hints: any accepted event only asks for a pass (docs/operations-notes.md,
File events are hints).

inotify (watchdog's ``Observer``) by default; ``poll`` for NFS and other file systems where
inotify sees nothing. The event filter keeps the daemon's own reads from producing events.

Watch placement, checked again before every pass (:meth:`Watcher.ensure`):

* a plain folder is watched recursively; if it is replaced (another inode) or appears later,
  the watch is moved;
* a symlinked folder (git-sync style) is watched through its parent, where a swap arrives as a
  move of the link, plus the current target, recursively, for edits in place;
* a missing folder is watched through its nearest existing parent, so its creation is seen.

The periodic resync is the real guarantee; inotify loses events in several cases (queue
overflow, watch limits), some silently. An overflow warning from watchdog marks the folder dirty.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from reconciler.domain.manifest import wanted_file
from reconciler.sources.folder import split_at_link

EVENT_FILTER = [
    FileCreatedEvent, FileClosedEvent, FileMovedEvent, FileDeletedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
]
POLL_FILTER = [*EVENT_FILTER, FileModifiedEvent]  # polling never reports a close

Placement = tuple[str, bool, tuple[int, int] | None]  # path, recursive, (dev, ino) of the path


OnEvent = Callable[[str], None]
WHOLE_TREE = ""


class _Handler(FileSystemEventHandler):
    """Turns an event into the manifest-relative keys it touches; O(1) per event, because
    the observer's single thread must never wait on us."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        for path in (event.src_path, event.dest_path):
            if path:
                key = self._watcher.key_of(os.fsdecode(path), event.is_directory)
                if key is not None:
                    self._watcher.on_event(key)


class _OverflowHook(logging.Filter):
    """watchdog logs a lost-events warning on inotify overflow; treat it as 'rescan all'."""

    def __init__(self, on_event: OnEvent) -> None:
        super().__init__()
        self._on_event = on_event

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self._on_event(WHOLE_TREE)
        return True


class Watcher:
    def __init__(self, root: Path, on_event: OnEvent,
                 mode: Literal["inotify", "poll"] = "inotify") -> None:
        self.root = root
        #: Called on the observer's thread with a manifest-relative path ("sub/" for a
        #: folder, "" for the whole tree).
        self.on_event = on_event
        self._mode = mode
        self._observer: BaseObserver = PollingObserver(timeout=0.5) if mode == "poll" \
            else Observer()
        self._handler = _Handler(self)
        self._base = str(root.absolute())
        self._watches: dict[Placement, ObservedWatch] = {}
        self._overflow = _OverflowHook(on_event)

    def start(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").addFilter(self._overflow)
        self._observer.start()
        self.ensure()

    def stop(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeFilter(self._overflow)
        self._observer.stop()
        self._observer.join(timeout=5)

    def key_of(self, path: str, is_directory: bool) -> str | None:
        """The key an event path stands for, or None for files that are not manifests."""
        base = self._base
        if not path.startswith(base + os.sep):
            return WHOLE_TREE  # the folder itself, or its parent (a symlink swap)
        relative = path[len(base) + 1 :]
        if is_directory:
            return relative + "/"
        return relative if wanted_file(os.path.basename(relative)) else None

    def ensure(self) -> bool:
        """Move the watches where they belong now; True when something moved."""
        root = self.root.absolute()
        self._base = str(root.resolve() if split_at_link(root)[0] else root)
        wanted = set(self._placements())
        current = set(self._watches)
        for placement in current - wanted:
            self._observer.unschedule(self._watches.pop(placement))
        for placement in wanted - current:
            path, recursive, _ = placement
            try:
                self._watches[placement] = self._observer.schedule(
                    self._handler, path, recursive=recursive,
                    event_filter=POLL_FILTER if self._mode == "poll" else EVENT_FILTER,
                )
            except OSError:
                continue  # vanished in between; the next ensure() tries again
        return wanted != current

    def _placements(self) -> list[Placement]:
        root = self.root.absolute()
        link, _ = split_at_link(root)
        if link is not None:
            placements = [_placement(link.parent, recursive=False)]
            target = root.resolve()
            if target.is_dir():
                placements.append(_placement(target, recursive=True))
            return [p for p in placements if p is not None]
        if root.is_dir():
            found = _placement(root, recursive=True)
            return [found] if found else []
        parent = _existing_parent(root)
        found = _placement(parent, recursive=False) if parent else None
        return [found] if found else []


def _placement(path: Path, recursive: bool) -> Placement | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (str(path), recursive, (info.st_dev, info.st_ino))


def _existing_parent(path: Path) -> Path | None:
    for parent in path.parents:
        if parent.is_dir():
            return parent
    return None
