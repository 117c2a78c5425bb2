"""What an operator may see of a spec, and how two specs differ, field by field.

``plan`` shows a replace's changed fields (``docker.image: ubuntu:22.04 → ubuntu:24.04``). The
view is flat (dotted paths, keys written as in a manifest: ``docker.image``) and safe to print
and to keep in the store: values that may be secrets never enter it. Environment variables
keep their names only; values under sensitive-looking keys and publisher or storage
parameters become ``[redacted]``; credentials in URLs are masked. A change confined to such
values still shows, as ``changed (values not shown)``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"
_SENSITIVE = re.compile(
    r"(password|passwd|secret|token|credential|private|api_?key|access_?key|env|params)",
    re.IGNORECASE,
)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]+(:[^/@\s]*)?@")
_ENV_KEYS = ("EnvironmentVariables",)
#: A hidden value is kept as a short digest, so a change shows without the value. It lets
#: whoever holds the store test a guess, as the spec hash the store has always kept does.
_HIDDEN = "(hidden)"


def _key(wire: str) -> str:
    """``Image`` -> ``image``, ``CPU`` -> ``cpu``, ``EntryModule`` -> ``entryModule``."""
    return wire.lower() if wire.isupper() else wire[:1].lower() + wire[1:]


def spec_view(wire: Mapping[str, Any]) -> dict[str, str]:
    """The spec's visible fields by dotted path."""
    view: dict[str, str] = {}
    _flatten(wire, "", view)
    return view


def _digest(value: Any) -> str:
    return hashlib.sha256(repr(value).encode()).hexdigest()[:12]


def _flatten(value: Any, path: str, view: dict[str, str]) -> None:
    if isinstance(value, Mapping):
        prefix = f"{path}." if path else ""
        for key, item in value.items():
            name, kind = _key_kind(str(key))
            child = prefix + name
            if kind == _PLAIN:
                _flatten(item, child, view)
            elif kind == _ENV:
                names = (sorted(str(k) for k in item) if isinstance(item, Mapping)
                         else [str(e).partition("=")[0] for e in item or ()])
                view[child] = ", ".join(names)
                view[child + " (values)"] = f"{_HIDDEN} {_digest(item)}"
            else:
                view[child] = f"{REDACTED} {_digest(item)}"
    elif isinstance(value, list) and all(not isinstance(v, Mapping | list) for v in value):
        view[path] = "[" + ", ".join(_text(v) for v in value) + "]"
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(item, f"{path}[{index}]", view)
    else:
        view[path] = _text(value)


_PLAIN, _ENV, _SENSITIVE_KEY = "plain", "env", "sensitive"


@functools.lru_cache(maxsize=1024)
def _key_kind(key: str) -> tuple[str, str]:
    """A key's name in the view and how its value is shown; asked once per key name: a
    cold sync views every submitted spec (docs/performance.md)."""
    if key in _ENV_KEYS:
        return _key(key), _ENV
    if _SENSITIVE.search(key) is not None:
        return _key(key), _SENSITIVE_KEY
    return _key(key), _PLAIN


def _text(value: Any) -> str:
    text = str(value)
    if "://" not in text:  # no URL, so no credentials in one
        return text
    return _URL_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def view_changes(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """``field: old → new`` for every visible difference; hidden ones are named, not shown."""
    lines: list[str] = []
    hidden: list[str] = []
    for path in sorted(set(old) | set(new)):
        before, after = old.get(path), new.get(path)
        if before == after:
            continue
        if path.endswith(" (values)") or REDACTED in (before or "") + (after or ""):
            hidden.append(path.removesuffix(" (values)"))
            continue
        lines.append(f"{path}: {before if before is not None else '(none)'} → "
                     f"{after if after is not None else '(none)'}")
    lines += [f"{path}: changed (values not shown)" for path in hidden]
    return lines

