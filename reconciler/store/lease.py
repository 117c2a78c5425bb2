"""Leadership on one host: an exclusive ``flock`` on ``<db>.lock`` beside the store.

Two daemons must never share a store: the one writer keeps a write-through copy of the records
(``docs/design.md``, "Seams"). The lease is its own object, taken by the wiring and handed to
the store, so a store for several hosts can come with another kind of leadership.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from reconciler.store.errors import StoreError, StoreLocked


class FileLease:
    """:class:`reconciler.ports.Leadership` held through a lock file; released on close or
    when the process ends, however it ends."""

    def __init__(self, store_path: Path) -> None:
        self.store_path = store_path
        self.lock_path = store_path.with_name(store_path.name + ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            self.store_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.store_path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLocked(
                f"{self.store_path}: in use by another reconciler process (lock "
                f"{self.lock_path}); two daemons must not share a store"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
