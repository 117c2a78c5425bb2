"""docs/events.md lists exactly the events the code emits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
LOG_METHODS = {"debug", "info", "warning", "error", "exception", "log"}
# Names built at run time: manifest.{action}, guard names, observe's phase events.
DYNAMIC = {"manifest.hold", "manifest.blocked", "source.not_ready", "prune.blocked",
           "job.completed", "job.failed", "job.drift", "job.lost"}


def emitted() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "reconciler").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in LOG_METHODS and node.args):
                continue
            first = node.args[1] if node.func.attr == "log" and len(node.args) > 1 \
                else node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                names.add(first.value)
    return names


def documented() -> set[str]:
    text = (ROOT / "docs/events.md").read_text()
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", text, flags=re.MULTILINE))


def test_every_emitted_event_is_documented() -> None:
    assert emitted() - documented() == set()


def test_every_documented_event_is_emitted() -> None:
    assert documented() - emitted() - DYNAMIC == set()
    assert documented() >= DYNAMIC
