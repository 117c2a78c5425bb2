"""Structured events: structlog configuration and the redaction that keeps secrets out of logs.

Every decision of the reconciler is one event with a stable name (``docs/events.md`` lists
them) and flat fields. JSON lines when the stream is not a terminal (or ``json`` is asked for),
readable console lines on a terminal.

Secrets never reach an event: the code logs names, hashes, paths and job ids, never spec
contents; :class:`Redact` is the safety net that masks values of sensitive-looking keys and
credentials embedded in URLs, wherever they appear.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]

# Credentials after any "://", whatever precedes it (masking more is the safe side). The pattern
# starts with a literal, which the regex engine finds at C speed, and each part stops at the
# next '/', '@' or space, so redaction is linear. The former pattern began with the scheme
# (`[a-zA-Z][a-zA-Z0-9+.-]*://`): every letter of a long run was tried as its start and
# rescanned the rest of the run, so it was quadratic, and a probe with a 200 kB field froze
# the daemon for 145 s (docs/reliability.md, "Hostile input").
_URL_CREDENTIALS = re.compile(r"://[^/@\s:]+(?::[^/@\s]*)?@")
_SENSITIVE = re.compile(
    r"(password|passwd|secret|token|credential|private|api_?key|access_?key|env)", re.IGNORECASE
)
REDACTED = "[redacted]"


#: The longest text any event field or error message carries; longer ones are cut, marked.
MAX_FIELD = 2000


def truncate(text: str, limit: int = MAX_FIELD) -> str:
    """The first ``limit`` characters of ``text``, and a marker saying how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters cut]"


def scrub_text(text: str) -> str:
    """Mask ``user:password@`` in any URL inside ``text``. Linear in the length of ``text``."""
    return _URL_CREDENTIALS.sub("://" + REDACTED + "@", text)


def clean(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` made fit for an event or an error: credentials masked, bounded in length.
    Masked before it is cut, so a cut never leaves half a credential unmasked."""
    return truncate(scrub_text(text), limit)


def iso_time(epoch: float | None) -> str | None:
    """An event's point in time as ISO 8601 UTC, like its ``timestamp`` (None stays None)."""
    if not epoch:
        return None
    stamp = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


class Redact:
    """Processor: mask values under sensitive keys and credentials in URLs, in the event's
    fields and in the mappings and lists they hold (a safety net: no event should carry a
    secret in the first place). Nested values are copied, never changed in place: they may
    be the caller's own."""

    def __call__(
        self, logger: object, method: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event_dict.items():
            if key != "event" and _sensitive(key):
                event_dict[key] = REDACTED
            elif isinstance(value, str):
                if "://" in value or len(value) > MAX_FIELD:
                    event_dict[key] = clean(value)  # else clean() would return it unchanged
            elif not isinstance(value, _SCALARS) and isinstance(value, Mapping | list | tuple):
                event_dict[key] = _redacted(value, _NESTED_DEPTH)
        return event_dict


#: Most fields: asked first, since the ``Mapping`` check is an ABC's (slower) and every
#: event's fields pass here.
_SCALARS = (int, float, type(None))


#: How deep Redact looks into a field's mappings and lists; deeper values are replaced whole.
_NESTED_DEPTH = 8


def _redacted(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return clean(value) if "://" in value or len(value) > MAX_FIELD else value
    if not isinstance(value, Mapping | list | tuple):
        return value
    if depth <= 0:
        return "[nested too deeply]"
    if isinstance(value, Mapping):
        return {key: REDACTED if isinstance(key, str) and _sensitive(key)
                else _redacted(item, depth - 1) for key, item in value.items()}
    return [_redacted(item, depth - 1) for item in value]


@functools.lru_cache(maxsize=1024)
def _sensitive(key: str) -> bool:
    """Whether a field's name looks like a secret's. Field names are few and fixed in the
    code: asked once each, not at every event (docs/performance.md)."""
    return _SENSITIVE.search(key) is not None


_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


class SyslogPrefixed:
    """Renderer wrapper: ``<N>`` before each line, so journald files it at the right priority
    (``SyslogLevelPrefix=`` is on by default, and journald strips the prefix)."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: object, method: str, event_dict: MutableMapping[str, Any]) -> str:
        priority = _PRIORITY.get(str(event_dict.get("level", "info")), 6)
        return f"<{priority}>{self._renderer(logger, method, event_dict)}"


def to_journal(stream: TextIO) -> bool:
    """True when ``stream`` is journald's stdout/stderr stream ($JOURNAL_STREAM = dev:ino)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class StdlibToEvents(logging.Handler):
    """Records of the standard ``logging`` module (asyncio's event loop, libraries) as
    ``library.log`` events: the stream stays one JSON event per line. Unconfigured, Python
    printed them as bare tracebacks (8,286 lines in 20 s when the probe listener ran out of
    file descriptors: docs/reliability.md, "Hostile input")."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            exc = record.exc_info[1] if record.exc_info else None
            structlog.get_logger("reconciler").log(
                record.levelno, "library.log", logger=record.name,
                message=(record.getMessage().splitlines() or [""])[0],
                error=f"{type(exc).__name__}: {exc}" if exc is not None else None)
        except Exception:  # a log record must never take the daemon down
            pass


def configure(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Configure structlog once, at the edge of the program (``main``)."""
    out = stream or sys.stderr
    json_lines = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    if to_journal(out):
        renderer = SyslogPrefixed(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redact(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StdlibToEvents)]:
        root.removeHandler(handler)
    root.addHandler(StdlibToEvents(logging.WARNING))
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
