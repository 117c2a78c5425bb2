"""``reconciler run``: the long-running loop that keeps passes coming and never goes deaf.

One worker coroutine does all the work, one piece at a time, so passes and observations never
interleave their writes to the store:

* file events (from the watcher thread) mark their path as changing; a pass runs as soon as a
  changed path has been quiet for ``debounce`` seconds (or has kept changing for ``max_delay``).
  Paths still changing go to the planner as *settling*, which defers their effects: a steady
  stream of new files is picked up file by file, yet a save that deletes then recreates a file
  never looks like a removal;
* a full pass runs every ``resync_interval`` whatever events arrive (inotify loses events);
* live jobs are observed every ``poll_interval``; a change found there is followed by a pass;
* SIGHUP re-reads the configuration and runs a pass; SIGUSR1 (or ``POST /sync``) runs one now
  (with a git source: fetches now); a git source is fetched every ``git_interval`` seconds,
  with backoff after failures, and a new commit is followed by a pass;
* SIGTERM/SIGINT: no new actions (not-started intents are given back), in-flight requests get
  ``shutdown_deadline`` seconds, then they are cancelled; exit 0. A second signal exits at once:
  SQLite's journal keeps the store whole either way.
* the server refuses our credentials (401/403 on the orchestrator API, from a pass, a poll or
  the version check): one ``api.unauthorized`` event, ``STATUS=`` to systemd, the same orderly
  shutdown, exit 78 (EX_CONFIG): a configuration error is not retried in a loop.

With a PostgreSQL state several daemons share one database: each campaigns for a lease every
``lease / 3`` seconds (off the loop); only the leader's passes act, a standby's passes only read
and plan (docs/design.md, "High availability").

systemd hears ``READY=1`` after the first complete pass, ``STATUS=`` after each pass,
``WATCHDOG=1`` only while passes keep completing, ``RELOADING=1`` around a reload and
``STOPPING=1`` on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from enum import Enum

import structlog

from reconciler.app import wiring
from reconciler.backends.errors import CredentialsRejected, RequesterError
from reconciler.backends.signing import Signer
from reconciler.domain.plan import PlanPolicy
from reconciler.engine.executor import Executor
from reconciler.engine.fenced import FencedBackend
from reconciler.engine.observe import observe
from reconciler.engine.reconcile import PassResult
from reconciler.events import scrub_text
from reconciler.ports import Backend, Campaigning, Fetching, Settling, StateStore
from reconciler.service.http import HttpServer
from reconciler.service.metrics import HealthServer, standard_metrics
from reconciler.service.notify import Notifier
from reconciler.service.probe import MAX_PROBE_BODY, ProbeService
from reconciler.service.timers import Backoff, PollBudget, Renewal, ScheduleClock, Settle
from reconciler.settings import Settings, SettingsError
from reconciler.sources.errors import FetchError
from reconciler.store.errors import NotLeader, StoreError

#: Settings the open backend, store, lease or listeners were built with: a reload reports
#: them as needing a restart instead of half-applying them (a new namespace or instance label
#: under an open backend would make every managed job look foreign after its next reopen).
_RESTART_ONLY = frozenset({
    "endpoint", "api_prefix", "key", "state", "watch", "metrics_listen", "manifests", "lease",
    "instance", "work_dir", "api", "namespace", "instance_label", "api_key", "api_username",
    "api_password", "request_timeout", "concurrency",
})
_RETRY_AFTER_FAILED_PASS = 2.0
#: sysexits.h EX_CONFIG: the server refused our credentials. Retrying cannot help, so the
#: daemon exits with it and the unit's RestartPreventExitStatus=78 keeps systemd from
#: restarting it in a loop (docs/design.md, "The orchestrator backend").
EX_CONFIG = 78
_SETTLE_AFTER_CHANGES = 1.0


class _Work(Enum):
    FETCH = "fetch"
    PASS = "pass"
    POLL = "poll"
    STOP = "stop"


class Daemon:
    def __init__(
        self,
        settings: Settings,
        signer: Signer | None,
        store: StateStore,
        *,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        leader: Campaigning | None = None,
    ) -> None:
        self.settings = settings
        # Without a lease to campaign for (SQLite: the FileLease is held) this daemon leads.
        self._leader = leader
        self._leading = leader is None
        self._signer = signer
        self._store = store
        self._reload = reload
        self._notifier = notifier or Notifier()
        self._metrics = standard_metrics()
        self._log = structlog.get_logger("reconciler")
        self._source = wiring.source(settings)
        # A source that fetches (git) is fetched on a timer; any other is watched for events.
        self._git = self._source if isinstance(self._source, Fetching) else None
        self._reconciler = wiring.reconciler(settings, store, self._policy(), self._source)
        self._schedule_clock = ScheduleClock.from_environment()
        self._reconciler.schedule_clock = self._schedule_clock.now
        self._apply_settle_settings()
        self._fetches = Backoff(settings.git_interval, settings.git_interval * 10,
                                first_at=float("inf"))  # armed by the loop, for git only
        self._fetch_requested = False
        self._poll = PollBudget(settings.poll_interval, settings.poll_budget)
        self._started = time.monotonic()
        self._last_alive = self._started  # a completed pass, or progress inside one
        self._last_result: PassResult | None = None
        self._last_pass_ok = False
        self._settle = Settle(settings.debounce, settings.max_delay)
        self._stopping = False
        self._reload_requested = False
        self._sync_requested = False
        self._reload_done_pending = False  # READY=1 goes out after the pass that follows
        self._executor: Executor | None = None
        self._pass_task: asyncio.Task[PassResult] | None = None
        self._exit_code = 0

    def _policy(self) -> PlanPolicy:
        return wiring.plan_policy(self.settings)

    def _apply_settle_settings(self) -> None:
        """A removal counts after ``removal_grace``; a file whose mtime is younger than
        ``debounce`` waits whatever triggered the pass (docs/design.md, Departures)."""
        self._reconciler.removal_grace = self.settings.removal_grace
        if isinstance(self._source, Settling):
            self._source.settle = self.settings.debounce

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._install_signals(loop)
        def from_watcher_thread(key: str) -> None:
            loop.call_soon_threadsafe(self._on_file_event, key)

        # A git source publishes immutable snapshots after its own fetches: nothing to watch.
        watcher = None if self._git else wiring.watcher(self.settings, from_watcher_thread)
        if watcher is not None:
            watcher.start()
        self._watcher = watcher
        server = await self._start_health_server()
        probe = await self._start_probe()
        pinger = self._start_watchdog()
        try:
            self._api = await wiring.choose_api(self.settings)
            started = False
            campaigner: asyncio.Task[None] | None = None
            try:
                while not self._stopping:
                    # Reopened when the server's API or mode changed under us (an upgrade):
                    # the store and its records stay; only the backend is replaced.
                    async with wiring.backend(self.settings, self._signer,
                                              on_request=self._on_request, choice=self._api,
                                              max_connections=max(16, self.settings.concurrency)
                                              ) as backend:
                        # Under a lease, every request asks first whether it is still ours.
                        self._backend: Backend = (backend if self._leader is None
                                                  else FencedBackend(backend, self.may_act))
                        api = wiring.api_of(backend)
                        self._metrics.replace("reconciler_api_info", [
                            ({"api": api["api"], "mode": api["api_mode"],
                              "server_version": api["server_version"]}, 1.0)])
                        if not started:
                            self._log.info("daemon.started", manifests=self._describe_source(),
                                           endpoint=self.settings.endpoint,
                                           client_id=backend.identity, **api,
                                           state=self._store.location,
                                           watch=self.settings.watch, pid=os.getpid())
                            started = True
                        self._executor = self._new_executor()
                        if campaigner is None:  # once the first executor exists
                            campaigner = self._start_campaigner()
                        if not await self._work_loop():
                            break
            finally:
                if campaigner is not None:
                    campaigner.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await campaigner
        except CredentialsRejected as exc:  # a pass has drained its requests before raising
            self._unauthorized(exc)
        finally:
            self._notifier.stopping()
            if pinger is not None:
                pinger.cancel()
            if watcher is not None:
                watcher.stop()
            if server is not None:
                await server.stop()
            if probe is not None:
                await probe.stop()
            self._log.info("daemon.stopped")
        return self._exit_code

    def _unauthorized(self, exc: CredentialsRejected) -> None:
        """The server refused our credentials: report it once and stop (exit 78)."""
        self._exit_code = EX_CONFIG
        self._stopping = True
        self._metrics.set("reconciler_ready", 0)
        self._log.error("api.unauthorized",
                        endpoint=exc.endpoint or scrub_text(self.settings.endpoint),
                        auth=exc.credential, status=exc.status, hint=exc.hint,
                        error=str(exc), exit_status=EX_CONFIG,
                        reason="the server refused the credentials: a configuration error, "
                               "not retried; fix it and start the daemon again")
        self._notifier.status(f"stopped: the server refused the {exc.credential} credentials "
                              f"(HTTP {exc.status}); {exc.hint}")

    def _new_executor(self) -> Executor:
        executor = wiring.executor(self.settings, self._store, self._backend, self._policy())
        executor.on_progress = lambda done, total: self._alive()
        return executor

    def _describe_source(self) -> str:
        if self._git is not None:
            return self._git.describe()
        return str(self.settings.manifests)

    async def _work_loop(self) -> bool:
        """Work until stopped (False) or until the server's API changed (True: reopen)."""
        next_resync = time.monotonic()  # the first pass runs at once
        next_poll = next_resync + self.settings.poll_interval
        self._fetches.next_at = next_resync if self._git else float("inf")
        first = True
        while True:
            work = await self._next_work(next_resync, next_poll)
            if work is _Work.STOP:
                return False
            if not first and time.monotonic() >= next_resync and await self._api_changed():
                return True
            first = False
            if self._reload_requested:
                self._apply_reload()
            if work is _Work.FETCH and not await self._fetch():
                continue
            if work is _Work.POLL:
                changed = await self._observe()
                next_poll = time.monotonic() + self._poll.delay()
                if not changed:
                    continue
            next_resync = time.monotonic() + await self._pass_then_delay()

    async def _api_changed(self) -> bool:
        """At a resync, ask the server's version again (auto only): an upgrade from 1.7 to
        1.9, or from a legacy requester to an orchestrator, is followed (``api.changed``)."""
        if self.settings.api != "auto":
            return False
        choice = await wiring.choose_api(self.settings)
        if choice.detail or (choice.mode, choice.server_version) == (
                self._api.mode, self._api.server_version):
            return False  # unknown now (unreachable): keep what works
        self._log.warning("api.changed", api=choice.api, api_mode=choice.mode,
                          server_version=choice.server_version or "none",
                          previous_mode=self._api.mode,
                          previous_version=self._api.server_version or "none")
        self._api = choice
        return True

    async def _next_work(self, next_resync: float, next_poll: float) -> _Work:
        while True:
            now = time.monotonic()
            if self._stopping:
                return _Work.STOP
            if self._fetch_requested or (self._git and self._fetches.due()):
                self._fetch_requested = False
                return _Work.FETCH
            if self._sync_requested or self._reload_requested:
                self._sync_requested = False
                return _Work.PASS
            if self._settle.due():
                return _Work.PASS
            if now >= next_resync:
                return _Work.PASS
            if now >= next_poll:
                return _Work.POLL
            await self._sleep_until(min(next_resync, next_poll, self._fetches.next_at,
                                        self._settle.deadline()))

    async def _sleep_until(self, deadline: float) -> None:
        self._wake.clear()
        timeout = max(0.0, deadline - time.monotonic())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    # --- passes and observations ----------------------------------------------------------

    async def _pass_then_delay(self) -> float:
        """Run a pass; return how long until the next full one.

        A pass that changed something is followed by a settle pass a second later (an adopted
        job whose manifest is gone is cancelled then); failed actions back off in the plan, so
        this cannot spin.
        """
        if not await self._guarded_pass():
            return _RETRY_AFTER_FAILED_PASS
        delay = self.settings.resync_interval
        result = self._last_result
        if result is not None and result.plan.changes:
            delay = min(delay, _SETTLE_AFTER_CHANGES)
        if self._reconciler.source_settling and not self._settle:
            # A file written moments ago and no event to bring a pass: look again once it
            # settled (an in-place write, or --watch poll). Pending events bring their own.
            delay = min(delay, self.settings.debounce + 0.01)
        check = self._reconciler.next_removal_check()
        if check is not None:  # a removal waiting out its grace period: look again then
            delay = min(delay, max(0.0, check - time.monotonic()) + 0.01)
        retry = result.plan.next_retry() if result is not None else None
        if retry is not None:  # a failed action backing off: try again when it may
            delay = min(delay, max(0.0, retry - time.time()) + 0.01)
        if result is not None and result.plan.next_slot is not None:
            # Sleep until the next slot of any scheduled manifest, not a moment longer or
            # shorter: a pass then fires it (no polling in between).
            delay = min(delay, self._schedule_clock.seconds_until(result.plan.next_slot) + 0.01)
        return delay

    async def _guarded_pass(self) -> bool:
        """Run one pass; a failure is logged and reported, never the end of the loop."""
        settling = self._settle.take_settling()
        if self._watcher is not None and self._watcher.ensure():
            self._log.info("watch.moved", manifests=str(self.settings.manifests))
        assert self._executor is not None
        # A standby reads and plans (status, readiness) but carries nothing out.
        executor = self._executor if self.may_act() else None
        self._pass_task = asyncio.create_task(self._reconciler.run_pass(executor, settling))
        try:
            result = await self._pass_task
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            self._log.warning("pass.cancelled", reason="shutdown deadline reached")
            return False
        except CredentialsRejected:
            raise  # not a failed pass: the daemon stops (run)
        except (StoreError, RequesterError, OSError) as exc:
            if self._leader is not None and (isinstance(exc, NotLeader) or not self.may_act()):
                # Fenced out mid-pass: stop acting and stand by; not a failure of this daemon.
                # A retired executor's pass (its lease was lost, already reported) does not
                # step down the lease this daemon may hold again by now.
                if executor is None or executor is self._executor:
                    self._lost(str(exc) or type(exc).__name__)
                return False
            self._pass_failed(exc)
            return False
        except Exception as exc:  # the loop must not die of a bug in one pass
            self._log.exception("pass.failed", error=type(exc).__name__)
            self._pass_failed(exc)
            return False
        finally:
            self._pass_task = None
        self._pass_completed(result)
        return True

    def _pass_failed(self, exc: BaseException) -> None:
        self._last_pass_ok = False
        self._metrics.inc("reconciler_passes_total", outcome="failed")
        self._metrics.set("reconciler_ready", 0)
        self._log.error("pass.failed", error=str(exc) or type(exc).__name__,
                        retry_in_s=_RETRY_AFTER_FAILED_PASS)
        self._notifier.status(f"degraded: pass failed: {exc}")

    def _pass_completed(self, result: PassResult) -> None:
        first = self._last_result is None
        if first:
            # The parse cache is long-lived; keep the collector from rescanning it on every
            # pass (full collections cost ~0.1 s per pass at 10,000 manifests).
            gc.freeze()
        self._last_result, self._last_pass_ok = result, True
        self._alive()
        self._record_pass_metrics(result)
        summary = result.summary()
        if self._leader is not None:
            summary = f"{'leader' if self.may_act() else 'standby'}: {summary}"
        if first or self._reload_done_pending:
            self._reload_done_pending = False
            self._notifier.ready(summary)
        else:
            self._notifier.status(summary)

    async def _fetch(self) -> bool:
        """Fetch the repository; True when a pass should follow (new commit, or a failure
        that the status must show)."""
        assert self._git is not None
        try:
            result = await asyncio.to_thread(self._git.fetch)
        except FetchError as exc:
            retry = self._fetches.failed()
            self._log.error("git.fetch_failed", error=str(exc), retry_in_s=retry,
                            revision=self._git.commit(),
                            reason="source not ready: nothing is cancelled; last good "
                                   "snapshot kept")
            return self._fetches.failures == 1
        was_failing = self._fetches.succeeded()
        if result.changed:
            self._log.info("git.fetched", revision=result.commit, ref=self._git.ref)
        return result.changed or was_failing

    async def _observe(self) -> bool:
        """Refresh live jobs; True when something changed that a pass should act on."""
        if not self.may_act():  # a standby records nothing: the leader observes
            return False
        epoch = self._leader.epoch if self._leader is not None else None
        with self._poll.measuring():
            try:
                counts: Counter[str] = await observe(
                    self._store, self._backend, self._policy(),
                    still_ours=lambda: self.may_act() and (
                        self._leader is None or self._leader.epoch == epoch))
            except CredentialsRejected:
                raise  # the daemon stops (run)
            except (RequesterError, StoreError) as exc:
                self._poll.failures += 1
                self._log.warning("observe.failed", error=str(exc), retry_in_s=self._poll.delay())
                return False
        self._poll.failures = 0
        return bool(counts)

    def _configure_timers(self) -> None:
        """Settings a reload may change take effect on the next deadline."""
        self._settle.debounce, self._settle.max_delay = (self.settings.debounce,
                                                         self.settings.max_delay)
        self._fetches.interval = self.settings.git_interval
        self._fetches.cap = self.settings.git_interval * 10
        self._poll.interval, self._poll.budget = (self.settings.poll_interval,
                                                  self.settings.poll_budget)

    # --- reload ---------------------------------------------------------------------------

    def _apply_reload(self) -> None:
        self._reload_requested = False
        self._notifier.reloading()
        if self._reload is None:
            self._reload_done_pending = True
            return
        try:
            fresh = self._reload()
        except SettingsError as exc:
            self._log.error("config.reload_failed", error=str(exc), reason="keeping the "
                            "previous configuration")
            self._reload_done_pending = True
            return
        changed = sorted(k for k in Settings.model_fields
                         if getattr(fresh, k) != getattr(self.settings, k))
        restart_needed = [k for k in changed if k in _RESTART_ONLY]
        applied = [k for k in changed if k not in restart_needed]
        self.settings = self.settings.model_copy(update={k: getattr(fresh, k) for k in applied})
        self._reconciler.policy = self._policy()
        self._apply_settle_settings()
        self._executor = self._new_executor()
        self._configure_timers()
        self._log.info("config.reloaded", changed=applied, needs_restart=restart_needed)
        self._reload_done_pending = True

    # --- signals, events, health --------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        loop.add_signal_handler(signal.SIGUSR1, self.request_sync)

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if self._stopping:
            self._log.warning("daemon.killed", signal=sig.name, reason="second signal")
            os._exit(128 + sig.value)  # at once; SQLite's journal keeps the store whole
        self._stopping = True
        self._log.info("daemon.stopping", signal=sig.name,
                       deadline_s=self.settings.shutdown_deadline)
        self._notifier.stopping()
        if self._executor is not None:
            self._executor.stop()
        loop = asyncio.get_running_loop()
        loop.call_later(self.settings.shutdown_deadline, self._cancel_in_flight)
        self._wake.set()

    def _cancel_in_flight(self) -> None:
        if self._pass_task is not None:
            self._pass_task.cancel()

    def _on_reload_signal(self) -> None:
        self._log.info("daemon.reload_requested")
        self._reload_requested = True
        self._wake.set()

    def request_sync(self) -> None:
        """SIGUSR1 or POST /sync: fetch now (git), or run a pass now (folder)."""
        if self._git is not None:
            self._fetch_requested = True
        else:
            self._sync_requested = True
        self._wake.set()

    def _on_file_event(self, key: str) -> None:
        self._settle.changed(key)
        self._wake.set()

    def _alive(self) -> None:
        self._last_alive = time.monotonic()

    def healthy(self) -> bool:
        """Passes keep completing (or a long pass keeps making progress)."""
        return time.monotonic() - self._last_alive <= 2 * self.settings.resync_interval + 10

    def ready(self) -> bool:
        result = self._last_result
        return bool(result and self._last_pass_ok and result.plan.ready and self.healthy())

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = self._notifier.watchdog_interval
        if interval is None:
            return None

        async def ping() -> None:
            while True:
                await asyncio.sleep(interval)
                if self.healthy():
                    self._notifier.watchdog()
                else:
                    self._log.error("watchdog.withheld", reason="no pass completed recently")

        return asyncio.create_task(ping())

    async def _start_probe(self) -> HttpServer | None:
        if not self.settings.probe_listen:
            return None
        service = ProbeService(self._store, self._client_id_of, acting=self.may_act,
                               max_stored=self.settings.approval_max,
                               retention=self.settings.approval_retention)
        server = HttpServer(service.handle, max_body=MAX_PROBE_BODY)
        bound = await server.start(self.settings.probe_listen)
        self._log.info("probe.listening", listen=bound, path="/probe")
        return server

    async def _client_id_of(self, job_id: str) -> str | None:
        try:
            return await self._backend.owner_of(job_id)
        except RequesterError:
            return None

    async def _start_health_server(self) -> HealthServer | None:
        if not self.settings.metrics_listen:
            return None
        server = HealthServer(self._metrics, self.healthy, self.ready, self.request_sync)
        await server.start(self.settings.metrics_listen)
        return server

    # --- leadership (docs/design.md, "High availability") ---------------------------------

    def may_act(self) -> bool:
        """True while this daemon leads and its lease is valid by its own clock; checked
        before every request (FencedBackend) and before every pass acts."""
        if self._leader is None:
            return True
        return self._leading and self._leader.epoch is not None

    def _start_campaigner(self) -> asyncio.Task[None] | None:
        if self._leader is None:
            self._metrics.set("reconciler_leader", 1)
            return None
        self._metrics.set("reconciler_leader", 0)
        return asyncio.create_task(self._campaign_loop(self._leader))

    async def _campaign_loop(self, leader: Campaigning) -> None:
        renewal = Renewal(leader.interval)
        while not self._stopping:
            renewal.started()
            # Blocking driver calls, on their own connection: off the loop, so a long pass
            # never delays a renewal and a renewal never stalls a pass.
            error = None
            try:
                leading = await asyncio.to_thread(leader.campaign)
                error = getattr(leader, "last_error", None)
            except Exception as exc:  # a bug must not end the campaigns: stand by, retry
                leading, error = False, f"{type(exc).__name__}: {exc}"
            if leading and not self._leading:
                self._acquired(leader)
            elif not leading and self._leading:
                self._lost(f"renewal failed: {error}" if error else "the lease was not renewed")
            await asyncio.sleep(renewal.delay())

    def _acquired(self, leader: Campaigning) -> None:
        self._leading = True
        epoch = leader.epoch
        self._log.info("leader.acquired", instance=leader.instance, epoch=epoch,
                       reason="the lease was free; in-doubt intents of earlier epochs are "
                              "resolved by uid first")
        self._metrics.set("reconciler_leader", 1)
        self._metrics.set("reconciler_leader_epoch", float(epoch or 0))
        self._notifier.status(f"leader (epoch {epoch}): resolving, then reconciling")
        # A fresh executor (no suspects of another epoch) and a pass at once: its plan
        # resolves every record left submitting/cancelling before anything else is sent.
        self._executor = self._new_executor()
        self._sync_requested = True
        self._wake.set()

    def _lost(self, reason: str) -> None:
        assert self._leader is not None
        was_leading = self._leading
        self._leading = False
        self._leader.step_down()
        if self._executor is not None:
            # A pass still running began under this lease: it starts and writes nothing more,
            # even should this daemon lead again before it ends (Executor.retire).
            self._executor.retire()
        self._metrics.set("reconciler_leader", 0)
        if was_leading:
            self._log.warning("leader.lost", instance=self._leader.instance, reason=reason)
        self._notifier.status(f"standby: {reason}")

    # --- metrics ------------------------------------------------------------------------

    def _on_request(self, operation: str, status: int | None, seconds: float) -> None:
        self._metrics.inc("reconciler_requests_total", operation=operation,
                          status=str(status or 0))
        self._metrics.observe("reconciler_request_duration_seconds", seconds,
                              operation=operation)

    def _record_pass_metrics(self, result: PassResult) -> None:
        m = self._metrics
        m.inc("reconciler_passes_total", outcome="completed")
        m.observe("reconciler_pass_duration_seconds", result.duration)
        for key, count in result.report.counts.items():
            action, _, outcome = key.partition(".")
            m.inc("reconciler_actions_total", count, action=action, outcome=outcome)
        phases = Counter(str(r.phase) for r in self._store.records())
        m.replace("reconciler_jobs", [({"phase": p}, n) for p, n in phases.items()])
        for key, count in result.report.counts.items():
            if key.startswith("schedule."):
                m.inc("reconciler_schedule_slots_total", count,
                      outcome=key.removeprefix("schedule."))
        scheduled = {d.name for d in result.plan.decisions if d.scheduled is not None}
        if scheduled:
            last = Counter(str(r.phase) for r in self._store.records() if r.name in scheduled)
            m.replace("reconciler_schedule_last_runs", [({"outcome": o}, n)
                                                        for o, n in last.items()])
        m.set("reconciler_held_manifests", result.held)
        m.set("reconciler_ready", 1 if result.plan.ready else 0)
        m.set("reconciler_last_pass_timestamp_seconds", time.time())
