"""The ``scale`` fixture: each scenario that has a long form runs as ``quick`` (the default
suite) and as ``full`` (marked ``slow``; docs/reliability.md has the figures of both)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.reliability import common


@pytest.fixture(params=[pytest.param("quick", marks=pytest.mark.quick),
                        pytest.param("full", marks=pytest.mark.slow)])
def scale(request: pytest.FixtureRequest) -> Iterator[str]:
    common.use_full(request.param == "full")
    yield str(request.param)
    common.use_full(common.FULL)
