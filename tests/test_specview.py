"""What plan may show of a spec: visible fields, hidden secrets, changes by field."""

from __future__ import annotations

from reconciler.domain.specview import spec_view, view_changes


def test_secrets_never_enter_the_view() -> None:
    wire = {"Engine": "Docker", "Docker": {"Image": "u:1", "EnvironmentVariables": ["A=s3cr3t"]},
            "PublisherSpec": {"Type": "S3", "Params": {"AccessKey": "k3y"}},
            "Inputs": [{"URL": "https://me:pw9@h/x"}]}
    view = spec_view(wire)
    text = repr(view)
    assert "s3cr3t" not in text and "k3y" not in text and "pw9" not in text
    assert view["docker.image"] == "u:1" and view["docker.environmentVariables"] == "A"


def test_changes_by_field() -> None:
    old = spec_view({"Docker": {"Image": "ubuntu:22.04", "EnvironmentVariables": ["A=1"]}})
    new = spec_view({"Docker": {"Image": "ubuntu:24.04", "EnvironmentVariables": ["A=2"]},
                     "Timeout": 60})
    assert view_changes(old, new) == [
        "docker.image: ubuntu:22.04 → ubuntu:24.04",
        "timeout: (none) → 60",
        "docker.environmentVariables: changed (values not shown)",
    ]
    assert view_changes(old, old) == []
