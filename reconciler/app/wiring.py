"""Settings → objects: the one place that picks the source, the store, the backend and builds
the engine and the daemon from them (``docs/design.md``, "Layers").

Everything else receives what it needs through the protocols of :mod:`reconciler.ports`; a
second backend or store is chosen here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.backends.legacy import ApiClient, RetryPolicy
from reconciler.backends.legacy_jobs import LegacyBackend
from reconciler.backends.signing import Signer
from reconciler.domain.plan import PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.ports import Backend, Campaigning, Source, StateStore
from reconciler.settings import Settings
from reconciler.sources.folder import FolderSource
from reconciler.sources.watch import Watcher
from reconciler.store.lease import FileLease
from reconciler.store.sqlite import Store

if TYPE_CHECKING:
    from reconciler.service.daemon import Daemon
    from reconciler.service.notify import Notifier

OnRequest = Callable[[str, int | None, float], None]


def default_state_path() -> Path:
    """``$STATE_DIRECTORY/state.db`` under systemd, else ``~/.local/state/reconciler``."""
    state_dirs = os.environ.get("STATE_DIRECTORY")
    if state_dirs:
        return Path(state_dirs.split(":")[0]) / "state.db"
    return Path.home() / ".local/state/reconciler/state.db"


def is_postgres(settings: Settings) -> bool:
    """``state`` is a PostgreSQL URL: several daemons share it, one leads."""
    return isinstance(settings.state, str)


def state_path(settings: Settings) -> Path:
    """The SQLite file (callers check :func:`is_postgres` first)."""
    if isinstance(settings.state, str):
        raise ValueError("the state is a PostgreSQL database, not a file")
    return settings.state or default_state_path()


def state_url(settings: Settings) -> str:
    assert isinstance(settings.state, str)
    return settings.state


def work_dir(settings: Settings) -> Path:
    """Where local files go (the git working folder): ``work_dir``, else beside a SQLite
    state, else ``$STATE_DIRECTORY`` or ``~/.local/state/reconciler``; never derived from a
    URL."""
    if settings.work_dir is not None:
        return settings.work_dir
    if not is_postgres(settings):
        return state_path(settings).parent
    return default_state_path().parent


def plan_policy(settings: Settings, *, allow_mass_cancel: bool = False,
                honour_backoff: bool = True) -> PlanPolicy:
    return PlanPolicy(
        allow_empty=settings.allow_empty,
        mass_cancel_ratio=settings.mass_cancel_ratio,
        mass_cancel_min=settings.mass_cancel_min,
        mass_cancel_window=settings.mass_cancel_window,
        allow_mass_cancel=allow_mass_cancel,
        backoff_base=settings.backoff_base,
        backoff_max=settings.backoff_max,
        honour_backoff=honour_backoff,
    )


def source(settings: Settings) -> Source:
    """The folder, or (with ``git_url``) the git snapshots kept beside the state."""
    if settings.git_url:
        from reconciler.sources.git import GitSource

        workdir = work_dir(settings) / "git"
        return GitSource(settings.git_url, settings.git_ref, settings.git_path, workdir)
    return FolderSource(settings.manifests)


def folder(root: Path) -> Source:
    """A plain folder (``validate DIR``)."""
    return FolderSource(root)


def watcher(settings: Settings, on_event: Callable[[str], None]) -> Watcher:
    return Watcher(settings.manifests, on_event, settings.watch)


def open_store(path: Path, *, writer: bool = True, exclusive: bool = True) -> Store:
    """The SQLite store. A writer is ``exclusive`` by default: it leads (a :class:`FileLease`
    beside the file, released when the store closes) and may cache what it writes.
    ``exclusive=False`` writes beside a running daemon (small CLI updates)."""
    lease = FileLease(path) if writer and exclusive else None
    if lease is not None:
        lease.acquire()
    try:
        return Store(path, writer=writer, leadership=lease)
    except BaseException:
        if lease is not None:
            lease.release()
        raise


def store(settings: Settings, *, writer: bool, exclusive: bool = True) -> StateStore:
    """SQLite, or PostgreSQL for a URL: an ``exclusive`` writer there is fenced by a lease it
    does not hold yet (the daemon campaigns for it: :func:`leader_of`)."""
    if is_postgres(settings):
        from reconciler.store.pglease import PostgresLease
        from reconciler.store.postgres import PostgresStore

        url = state_url(settings)
        lease = (PostgresLease(url, settings.instance, settings.lease)
                 if writer and exclusive else None)
        pg: StateStore = PostgresStore(url, writer=writer, fence=lease)
        return pg
    return open_store(state_path(settings), writer=writer, exclusive=exclusive)


def leader_of(state: StateStore) -> Campaigning | None:
    """The lease a store's writes are fenced by, which the daemon campaigns for; None when
    the store needs no campaign (SQLite: its FileLease is held for good)."""
    from reconciler.store.pglease import PostgresLease

    fence = getattr(state, "fence", None)
    return fence if isinstance(fence, PostgresLease) else None


def leader_info(settings: Settings) -> dict[str, object] | None:
    """Who leads a PostgreSQL state, since when, under which epoch (None: SQLite, or the
    lease cannot be read)."""
    if not is_postgres(settings):
        return None
    from reconciler.store.pglease import PostgresLease

    lease = PostgresLease(state_url(settings), settings.instance, settings.lease)
    try:
        info = lease.info()
    finally:
        lease.close()
    if info is None:
        return None
    return {"holder": info.holder, "epoch": info.epoch,
            "since": info.acquired_at.isoformat() if info.acquired_at else None,
            "expires": info.expires_at.isoformat() if info.expires_at else None}


def approver(settings: Settings, signer: Signer) -> ApiClient:
    """The client that posts signed approvals to compute nodes (``reconciler approve``)."""
    return ApiClient(settings.endpoint, signer, prefix=settings.api_prefix,
                     retry=RetryPolicy(attempts=3))


@contextlib.asynccontextmanager
async def backend(
    settings: Settings, signer: Signer, *, on_request: OnRequest | None = None,
    max_connections: int = 16,
) -> AsyncIterator[Backend]:
    """The backend that runs jobs, open for the duration of the ``async with``."""
    async with ApiClient(settings.endpoint, signer, prefix=settings.api_prefix,
                         timeout=settings.request_timeout,
                         max_connections=max_connections) as client:
        client.on_request = on_request
        yield LegacyBackend(client)


def fenced(jobs: Backend, may_act: Callable[[], bool]) -> Backend:
    """A backend that sends nothing unless ``may_act()`` (the lease is ours)."""
    from reconciler.engine.fenced import FencedBackend

    return FencedBackend(jobs, may_act)


def executor(
    settings: Settings, state: StateStore, jobs: Backend, policy: PlanPolicy
) -> Executor:
    return Executor(state, jobs, policy, concurrency=settings.concurrency,
                    confirmations=settings.resolve_confirmations,
                    resolve_delay=settings.resolve_delay)


def reconciler(
    settings: Settings, state: StateStore, policy: PlanPolicy | None = None,
    from_source: Source | None = None,
) -> Reconciler:
    return Reconciler(from_source or source(settings), state,
                      policy or plan_policy(settings))


def daemon(
    settings: Settings, signer: Signer, state: StateStore, *,
    reload: Callable[[], Settings] | None = None, notifier: Notifier | None = None,
) -> Daemon:
    from reconciler.service.daemon import Daemon

    return Daemon(settings, signer, state, reload=reload, notifier=notifier,
                  leader=leader_of(state))
