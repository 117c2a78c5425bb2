"""The repository stands alone: nothing in it reads or cites documents that live beside it.

A clone with nothing next to it must pass ``scripts/test``, and every comment must point at a
document a reader of the repository can open (docs/wire-legacy.md, docs/operations-notes.md).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces so this file does not match itself.
_SHARED = "sha" + "red"
FORBIDDEN = re.compile(
    "|".join(
        [
            r"\.\./" + _SHARED + r"\b",  # the folder beside the clone
            _SHARED + r"/(bacalhau|notes|seed|hooks)\b",
            # the wire notes, cited as a file or by section ("... 1.3", "... section 5"); the
            # word alone is also a constant's name (manifest forms)
            r"\b" + "CONT" + r"RACT(\.md\b|,? (section|§)? ?\d)",
            r"\b" + "ORCHES" + r"TRATOR(\.md\b|,? (section|§)? ?\d)",
            r"\b" + "DES" + r"IGN\.md\b",  # the original design brief
            r"\b" + "ops" + r"\.md\b",
            r"\b" + "anch" + r"ors(\.md\b| P\d| section)",
            r"\b" + "seed" + r"( SDK\b|/job-api)",
        ]
    )
)
SKIP_DIRS = {".git", ".venv", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache",
             ".hypothesis", "build", "dist"}


def _files() -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found += [Path(folder, name) for name in names]
    return found


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    offenders = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary (a database, a key): not a document
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_documents_cited_instead_exist() -> None:
    for name in ("docs/wire-legacy.md", "docs/operations-notes.md"):
        assert (ROOT / name).is_file(), name


def test_the_check_catches_each_kind_of_reference() -> None:
    cited = ["../" + _SHARED + "/x", "CONT" + "RACT 1.3", "ORCHES" + "TRATOR.md",
             "DES" + "IGN.md", "ops" + ".md 4.2", "anch" + "ors P15", "the seed" + " SDK's"]
    assert all(FORBIDDEN.search(text) for text in cited)
    assert not FORBIDDEN.search("the wire contract; shared jobs; RELIABILITY_SEED; --seed")
