"""Settings → objects: the one place that picks the source, the store, the backend and builds
the engine and the daemon from them (``docs/design.md``, "Layers").

Everything else receives what it needs through the protocols of :mod:`reconciler.ports`; a
second backend or store is chosen here and nowhere else.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler.backends.errors import CredentialsRejected, RequesterError
from reconciler.backends.legacy import ApiClient, RetryPolicy
from reconciler.backends.legacy_jobs import LegacyBackend
from reconciler.backends.orchestrator import (
    Credentials,
    Mode,
    OrchestratorBackend,
    OrchestratorClient,
    detect_version,
    mode_of,
)
from reconciler.backends.signing import Signer
from reconciler.domain.plan import PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.reconcile import Reconciler
from reconciler.ports import Backend, Campaigning, Source, StateStore
from reconciler.settings import Settings, api_credentials
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


@dataclass(frozen=True)
class ApiChoice:
    """Which backend, and why: for ``daemon.started``, ``status`` and the metric."""

    mode: Mode  # legacy | label | name
    server_version: str  # the server's GitVersion; "" when it has none (legacy-era) or unknown
    detail: str = ""  # why, when auto could not ask

    @property
    def api(self) -> str:
        return "legacy" if self.mode == "legacy" else "orchestrator"


async def choose_api(settings: Settings, *, wait: float = 10.0) -> ApiChoice:
    """``settings.api`` made concrete. ``auto`` asks ``GET /api/v1/agent/version``: v1.5+ is
    the orchestrator (v1.8+ by name, else by label), a 404 or an older server legacy. When
    the server cannot be asked, auto assumes legacy (the default before issue 14); the daemon
    asks again at each resync and follows a change. A 401/403 on the version route raises
    :class:`CredentialsRejected`."""
    if settings.api == "legacy":
        return ApiChoice("legacy", "")
    try:
        version = await detect_version(settings.endpoint,
                                       wait=min(wait, settings.request_timeout))
    except CredentialsRejected:
        raise  # a configuration error, not "unknown": the caller stops (exit 78 / 1)
    except RequesterError as exc:
        if settings.api == "orchestrator":
            return ApiChoice("name", "", f"version unknown ({exc}); name mode assumed")
        return ApiChoice("legacy", "", f"version unknown ({exc}); legacy assumed")
    mode = mode_of(version)
    if settings.api == "orchestrator" and mode == "legacy":
        mode = "name"  # asked for explicitly: an unknown version is taken to be the newest
    return ApiChoice(mode, version or "")


async def check_credentials(settings: Settings, *, wait: float = 10.0) -> None:
    """One authenticated request to the orchestrator (a one-job page of our labels): raises
    :class:`CredentialsRejected` when the server refuses the credentials; any other failure
    is left to the caller's own checks (``status`` shows what it can)."""
    async with OrchestratorClient(settings.endpoint, namespace=settings.namespace,
                                  credentials=credentials(settings),
                                  timeout=min(wait, settings.request_timeout),
                                  retry=RetryPolicy(attempts=1)) as client:
        try:
            await client.check_access()
        except CredentialsRejected:
            raise
        except RequesterError:
            return


def credentials(settings: Settings) -> Credentials:
    key, user, password = api_credentials(settings)
    return Credentials(api_key=key, username=user, password=password)


@contextlib.asynccontextmanager
async def backend(
    settings: Settings, signer: Signer | None, *, on_request: OnRequest | None = None,
    max_connections: int = 16, choice: ApiChoice | None = None,
) -> AsyncIterator[Backend]:
    """The backend that runs jobs, open for the duration of the ``async with``: the legacy
    API (signed) or the orchestrator API, as :func:`choose_api` says (or ``choice``)."""
    choice = choice or await choose_api(settings)
    if choice.mode == "legacy" and signer is None and choice.detail and settings.api == "auto":
        # The server could not be asked (not up yet) and legacy needs a key we do not have:
        # today's API is the likelier one. The daemon asks again at each resync and reopens
        # its backend when the answer differs, instead of failing to start.
        choice = ApiChoice("name", "", choice.detail.replace(
            "legacy assumed", "no signing key for legacy: name mode assumed"))
    if choice.mode != "legacy":
        async with OrchestratorClient(settings.endpoint, namespace=settings.namespace,
                                      credentials=credentials(settings),
                                      timeout=settings.request_timeout,
                                      max_connections=max_connections) as orchestrator:
            orchestrator.on_request = on_request
            yield OrchestratorBackend(orchestrator, mode=choice.mode,
                                      version=choice.server_version,
                                      instance=settings.instance_label)
        return
    if signer is None:
        raise RequesterError("the legacy API needs a signing key (--key)")
    async with ApiClient(settings.endpoint, signer, prefix=settings.api_prefix,
                         timeout=settings.request_timeout,
                         max_connections=max_connections) as client:
        client.on_request = on_request
        yield LegacyBackend(client)


def api_of(jobs: Backend) -> dict[str, str]:
    """The api, mode and server version a backend was opened with (events and status)."""
    if isinstance(jobs, OrchestratorBackend):
        return {"api": "orchestrator", "api_mode": jobs.mode,
                "server_version": jobs.version or "unknown"}
    return {"api": "legacy", "api_mode": "legacy", "server_version": ""}


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
    settings: Settings, signer: Signer | None, state: StateStore, *,
    reload: Callable[[], Settings] | None = None, notifier: Notifier | None = None,
) -> Daemon:
    from reconciler.service.daemon import Daemon

    return Daemon(settings, signer, state, reload=reload, notifier=notifier,
                  leader=leader_of(state))
