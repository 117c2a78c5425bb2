"""What one read of a source saw: the value a pass plans from (no I/O here)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.domain.manifest import FileResult


@dataclass(frozen=True)
class Snapshot:
    """What one read of the source saw."""

    ready: bool
    reason: str = ""
    revision: str | None = None
    files: Mapping[str, FileResult] = field(default_factory=dict)
    #: Subdirectories (relative, with a trailing "/") that could not be listed.
    broken_dirs: tuple[str, ...] = ()
    #: Files changed moments ago that may still be being written: the planner waits for them.
    settling: frozenset[str] = frozenset()
