"""Prometheus metrics and the health endpoints, on an optional loopback listener.

``GET /metrics`` (Prometheus text, by ``prometheus-client``), ``GET /healthz`` (the loop is
alive: a pass completed recently), ``GET /readyz`` (the last pass completed, is recent, and the
source was ready), and ``POST /sync`` (ask for a pass now), served by
:mod:`reconciler.service.http`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import prometheus_client
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from reconciler.service.http import HttpServer, Response

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# The exposition comes from the maintained prometheus-client, not hand-rendered text: values
# keep full float precision (a timestamp printed with 6 digits was ~45 minutes off).
# ``*_created`` series are the client's default; nothing reads them here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

_KINDS: dict[str, type[Counter] | type[Gauge] | type[Histogram]] = {
    "counter": Counter, "gauge": Gauge, "histogram": Histogram,
}


class Metrics:
    """Counters, gauges and histograms by name and labels, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._families: dict[str, Counter | Gauge | Histogram] = {}
        self._seen: dict[str, set[tuple[tuple[str, str], ...]]] = {}

    def describe(self, name: str, kind: str, text: str, labels: Sequence[str] = ()) -> None:
        family = _KINDS[kind]
        # prometheus-client appends _total to counters itself.
        base = name.removesuffix("_total") if kind == "counter" else name
        extra = {"buckets": BUCKETS} if kind == "histogram" else {}
        self._families[name] = family(base, text, list(labels), registry=self.registry,
                                      **extra)  # type: ignore[arg-type]
        self._seen[name] = set()

    def _child(self, name: str, labels: dict[str, str]) -> Counter | Gauge | Histogram:
        family = self._families[name]
        if not labels:
            return family
        self._seen[name].add(tuple(sorted(labels.items())))
        return family.labels(**labels)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Counter | Gauge)
        child.inc(amount)

    def set(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Gauge)
        child.set(value)

    def replace(self, name: str, values: Iterable[tuple[dict[str, str], float]]) -> None:
        """Set a whole gauge family at once (phases that emptied drop to 0, not stale)."""
        family = self._families[name]
        assert isinstance(family, Gauge)
        for seen in self._seen[name]:
            family.labels(**dict(seen)).set(0.0)
        for labels, value in values:
            self.set(name, value, **labels)

    def observe(self, name: str, value: float, **labels: str) -> None:
        child = self._child(name, labels)
        assert isinstance(child, Histogram)
        child.observe(value)

    def render(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


def standard_metrics() -> Metrics:
    metrics = Metrics()
    for name, kind, text, labels in [
        ("reconciler_passes_total", "counter", "Passes run, by outcome.", ("outcome",)),
        ("reconciler_pass_duration_seconds", "histogram", "Duration of a pass.", ()),
        ("reconciler_actions_total", "counter", "Actions carried out, by action and outcome.",
         ("action", "outcome")),
        ("reconciler_jobs", "gauge", "Managed names by phase.", ("phase",)),
        ("reconciler_held_manifests", "gauge", "Manifests held (broken, unreadable, duplicate).",
         ()),
        ("reconciler_ready", "gauge", "1 when the last pass was complete and the source ready.",
         ()),
        ("reconciler_last_pass_timestamp_seconds", "gauge", "When the last pass completed.", ()),
        ("reconciler_leader", "gauge", "1 while this daemon leads (may act), 0 on a standby.",
         ()),
        ("reconciler_leader_epoch", "gauge", "The lease epoch this daemon last acquired.", ()),
        ("reconciler_requests_total", "counter", "Requests to the requester, by operation and "
                                                 "HTTP status (0: no reply).",
         ("operation", "status")),
        ("reconciler_request_duration_seconds", "histogram", "Request latency by operation.",
         ("operation",)),
        ("reconciler_schedule_slots_total", "counter", "Slots of scheduled manifests, by "
                                                       "outcome (fired, skipped, missed).",
         ("outcome",)),
        ("reconciler_schedule_last_runs", "gauge", "Scheduled manifests by the outcome of "
                                                   "their last run (its record's phase).",
         ("outcome",)),
        ("reconciler_api_info", "gauge", "1 for the API, mode and server version in use.",
         ("api", "mode", "server_version")),
    ]:
        metrics.describe(name, kind, text, labels)
    return metrics


class HealthServer:
    """The listener. ``health()`` and ``ready()`` are the daemon's judgments, asked per request."""

    def __init__(self, metrics: Metrics, health: Callable[[], bool], ready: Callable[[], bool],
                 on_sync: Callable[[], None]) -> None:
        self._metrics = metrics
        self._health, self._ready, self._on_sync = health, ready, on_sync
        self._http = HttpServer(self._route)

    async def start(self, listen: str) -> None:
        bound = await self._http.start(listen)
        structlog.get_logger("reconciler").info("metrics.listening", listen=bound)

    async def stop(self) -> None:
        await self._http.stop()

    async def _route(self, method: str, path: str, body: bytes) -> Response:
        if path == "/metrics":
            return Response(200, self._metrics.render().encode(),
                            prometheus_client.CONTENT_TYPE_LATEST)
        if path == "/healthz":
            return _judged(self._health(), b"ok\n", b"stale\n")
        if path == "/readyz":
            return _judged(self._ready(), b"ready\n", b"not ready\n")
        if path == "/sync" and method == "POST":
            self._on_sync()
            return Response(202, b"sync requested\n")
        return Response(404, b"not found\n")


def _judged(ok: bool, good: bytes, bad: bytes) -> Response:
    return Response(200, good) if ok else Response(503, bad)
