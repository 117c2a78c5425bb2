"""The import rule of ``docs/design.md`` ("Layers"), checked on the source with ``ast``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "reconciler"
#: Packages whose concrete classes only app/ builds; their ``errors`` modules are vocabulary
#: that anyone may catch.
CONCRETE = ("store", "backends", "sources")
#: Modules of those packages that build nothing: the signer's protocol and key helpers.
SHARED = {"reconciler.backends.signing"}
#: What only a backend may know of the legacy API (docs/wire-legacy.md, Job states; the uid tag).
LEGACY_WORDS = {"New", "Queued", "InProgress", "Completed", "Error", "Cancelled", "Undefined"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), ast.parse(path.read_text(), str(path))


def _imports(tree: ast.Module) -> Iterator[str]:
    """Every reconciler module imported, at any depth (lazy imports count too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            # ``from reconciler.app import wiring`` imports the module reconciler.app.wiring
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").exists() or (
        PACKAGE.parent / relative / "__init__.py").exists()


def _violations() -> Iterator[str]:
    for module, tree in _modules():
        for imported in _imports(tree):
            if not _within(imported, "reconciler") or not _is_module(imported):
                continue
            if _within(module, "reconciler.domain") and not _within(imported, "reconciler.domain"):
                yield f"{module} (domain) imports {imported}"
            if module == "reconciler.ports" and not _within(imported, "reconciler.domain"):
                yield f"{module} (ports) imports {imported}"
            if module == "reconciler.settings" and imported != "reconciler.events":
                yield f"{module} (values only) imports {imported}"
            if _within(module, "reconciler.engine") and (
                _within(imported, "reconciler.app") or _within(imported, "reconciler.service")
            ):
                yield f"{module} (engine) imports {imported}"
            for package in CONCRETE:
                home = f"reconciler.{package}"
                if (_within(imported, home) and not _within(module, home)
                        and not _within(module, "reconciler.app")
                        and imported not in (home, f"{home}.errors") and imported not in SHARED):
                    yield f"{module} imports {imported}: only app/ builds {package}/ classes"


def test_the_import_rule_holds() -> None:
    assert list(_violations()) == []


def test_the_rule_sees_a_violation() -> None:
    """The checker itself: a domain module importing the store is caught."""
    tree = ast.parse("from reconciler.store.sqlite import Store\nimport reconciler.engine\n")
    assert list(_imports(tree)) == ["reconciler.store.sqlite", "reconciler.store.sqlite.Store",
                                    "reconciler.engine"]
    assert _is_module("reconciler.store.sqlite") and not _is_module("reconciler.store.sqlite.Store")


def _code_strings(tree: ast.Module) -> Iterator[str]:
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node.value


def test_only_backends_know_legacy_state_names_and_tags() -> None:
    found = []
    for module, tree in _modules():
        if any(_within(module, f"reconciler.{p}") for p in ("backends", "devnet")):
            continue
        for text in _code_strings(tree):
            if text in LEGACY_WORDS or text.startswith("reconciler-uid:"):
                found.append(f"{module}: {text!r}")
    assert found == []
