"""A backend that sends nothing unless this daemon leads (docs/design.md, "High availability").

The lease is checked just before each request, on the leader's own clock (CLOCK_BOOTTIME, so a
pause counts): a daemon that was stopped, cut off or replaced finds its lease gone and sends
nothing. Every store write is fenced on its own (store/postgres.py), so an intent is never
recorded under a lost lease either; this wrapper covers the requests themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from reconciler.backends.errors import Unreachable
from reconciler.domain.manifest import Manifest
from reconciler.ports import Backend, JobInfo, Refusing, UpdatesInPlace


class NotLeading(Unreachable):
    """The lease is not ours: the request was not sent (so, like Unreachable, nothing
    happened remotely)."""


class FencedBackend:
    """:class:`~reconciler.ports.Backend` that asks ``may_act`` before every request."""

    def __init__(self, inner: Backend, may_act: Callable[[], bool]) -> None:
        self._inner = inner
        self._may_act = may_act
        #: Requests refused because the lease was not ours (tests and metrics read it).
        self.refused = 0

    def _check(self) -> None:
        if not self._may_act():
            self.refused += 1
            raise NotLeading("not the leader (lease lost or not held): request not sent")

    @property
    def identity(self) -> str:
        return self._inner.identity

    # The optional capabilities pass through: the executor decides by them (an update in
    # place, a manifest refused before anything is cancelled), and neither sends a request.

    @property
    def updates_in_place(self) -> bool:
        return isinstance(self._inner, UpdatesInPlace) and self._inner.updates_in_place

    def refusal(self, manifest: Manifest) -> str | None:
        return self._inner.refusal(manifest) if isinstance(self._inner, Refusing) else None

    async def submit(self, manifest: Manifest, uid: str) -> JobInfo:
        self._check()
        return await self._inner.submit(manifest, uid)

    async def find(self, uids: Sequence[str]) -> dict[str, list[JobInfo]]:
        self._check()
        return await self._inner.find(uids)

    async def find_by_name(self, names: Sequence[str]) -> dict[str, list[JobInfo]]:
        self._check()
        return await self._inner.find_by_name(names)

    async def stop(self, job_id: str, reason: str) -> str:
        self._check()
        return await self._inner.stop(job_id, reason)

    async def status(self, job_id: str) -> JobInfo | None:
        self._check()
        return await self._inner.status(job_id)

    async def owner_of(self, job_id: str) -> str | None:
        self._check()
        return await self._inner.owner_of(job_id)
