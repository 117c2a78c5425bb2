"""What a source's fetch can fail with (the daemon catches this, whatever the source)."""

from __future__ import annotations


class FetchError(Exception):
    """A fetch failed; the message names the step and carries no credentials."""
