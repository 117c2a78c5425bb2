"""The /metrics exposition comes from prometheus-client: exact values, standard format."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from reconciler.service.metrics import standard_metrics


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_timestamps_keep_full_precision() -> None:
    metrics = standard_metrics()
    metrics.set("reconciler_last_pass_timestamp_seconds", 1796130000.123456)
    text = metrics.render()
    assert "1.79613e+09" not in text
    assert samples(text)[("reconciler_last_pass_timestamp_seconds", ())] == 1796130000.123456


def test_counters_gauges_and_histograms() -> None:
    metrics = standard_metrics()
    metrics.inc("reconciler_actions_total", 2, action="submit", outcome="ok")
    metrics.inc("reconciler_requests_total", operation="submit", status="200")
    metrics.observe("reconciler_pass_duration_seconds", 0.02)
    metrics.replace("reconciler_jobs", [({"phase": "active"}, 3), ({"phase": "error"}, 1)])
    metrics.replace("reconciler_jobs", [({"phase": "active"}, 4)])
    text = metrics.render()
    got = samples(text)
    assert got[("reconciler_actions_total", (("action", "submit"), ("outcome", "ok")))] == 2
    assert got[("reconciler_requests_total", (("operation", "submit"), ("status", "200")))] == 1
    assert got[("reconciler_pass_duration_seconds_count", ())] == 1
    assert got[("reconciler_pass_duration_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("reconciler_jobs", (("phase", "active"),))] == 4
    assert got[("reconciler_jobs", (("phase", "error"),))] == 0  # emptied, not stale
    assert "# TYPE reconciler_actions_total counter" in text
    assert "_created" not in text
