"""Prometheus metrics and the health endpoints, on an optional loopback listener.

``GET /metrics`` (text format 0.0.4), ``GET /healthz`` (the loop is alive: a pass completed
recently), ``GET /readyz`` (the last pass completed, is recent, and the source was ready), and
``POST /sync`` (ask for a pass now), served by :mod:`reconciler.service.http`.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog

from reconciler.service.http import HttpServer, Response

LabelKey = tuple[tuple[str, str], ...]
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


def _render_labels(key: LabelKey, extra: str = "") -> str:
    parts = [f'{k}="{_escape(v)}"' for k, v in key]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(BUCKETS, value)
        if index < len(BUCKETS):
            self.counts[index] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters, gauges and histograms by name and labels; rendered on demand."""

    def __init__(self) -> None:
        self._help: dict[str, tuple[str, str]] = {}
        self._values: dict[str, dict[LabelKey, float]] = defaultdict(dict)
        self._histograms: dict[str, dict[LabelKey, _Histogram]] = defaultdict(dict)

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        self._values[name][key] = self._values[name].get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values[name][_labels(labels)] = value

    def replace(self, name: str, values: Iterable[tuple[dict[str, str], float]]) -> None:
        """Set a whole gauge family at once (phases that emptied drop to 0, not stale)."""
        family = {key: 0.0 for key in self._values[name]}
        family.update({_labels(labels): value for labels, value in values})
        self._values[name] = family

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._histograms[name].setdefault(_labels(labels), _Histogram()).observe(value)

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(set(self._values) | set(self._histograms) | set(self._help)):
            kind, text = self._help.get(name, ("untyped", ""))
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            for key, value in sorted(self._values.get(name, {}).items()):
                lines.append(f"{name}{_render_labels(key)} {value:g}")
            for key, hist in sorted(self._histograms.get(name, {}).items()):
                cumulative = 0
                for bound, count in zip(BUCKETS, hist.counts, strict=True):
                    cumulative += count
                    labels = _render_labels(key, 'le="' + str(bound) + '"')
                    lines.append(f"{name}_bucket{labels} {cumulative}")
                labels = _render_labels(key, 'le="+Inf"')
                lines.append(f"{name}_bucket{labels} {hist.count}")
                lines.append(f"{name}_sum{_render_labels(key)} {hist.total:g}")
                lines.append(f"{name}_count{_render_labels(key)} {hist.count}")
        return "\n".join(lines) + "\n"


def standard_metrics() -> Metrics:
    metrics = Metrics()
    for name, kind, text in [
        ("reconciler_passes_total", "counter", "Passes run, by outcome."),
        ("reconciler_pass_duration_seconds", "histogram", "Duration of a pass."),
        ("reconciler_actions_total", "counter", "Actions carried out, by action and outcome."),
        ("reconciler_jobs", "gauge", "Managed names by phase."),
        ("reconciler_held_manifests", "gauge", "Manifests held (broken, unreadable, duplicate)."),
        ("reconciler_ready", "gauge", "1 when the last pass was complete and the source ready."),
        ("reconciler_last_pass_timestamp_seconds", "gauge", "When the last pass completed."),
        ("reconciler_requests_total", "counter", "Requests to the requester, by operation and "
                                                 "HTTP status (0: no reply)."),
        ("reconciler_request_duration_seconds", "histogram", "Request latency by operation."),
    ]:
        metrics.describe(name, kind, text)
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
            return Response(200, self._metrics.render().encode(), "text/plain; version=0.0.4")
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
