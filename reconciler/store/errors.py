"""What opening or using a store can fail with, whatever the store (the daemon catches these)."""

from __future__ import annotations


class StoreError(Exception):
    """The state store cannot be used."""


class StoreLocked(StoreError):
    pass


class StoreTooNew(StoreError):
    pass


class StoreCorrupt(StoreError):
    pass


class NotLeader(StoreError):
    """A fenced write found that our lease is gone: another daemon leads now (or none)."""
