"""The seams between the engine and the outside world: what a pass reads from and acts through.

Concrete classes live in ``sources/``, ``store/`` and ``backends/``; only ``app/wiring`` picks
them. Everything here is a :class:`typing.Protocol`, so tests plug in in-memory fakes.
"""

from __future__ import annotations

from typing import Protocol

from reconciler.domain.snapshot import Snapshot


class Source(Protocol):
    """Anything a pass can read a snapshot from: a folder, or a git repository's snapshots."""

    def read(self) -> Snapshot: ...
