"""Desired state: what a snapshot of the source asks for, name by name.

Identity is the manifest's name, not its path. A name claimed by two manifests makes both
invalid (held). Every file that failed to read or parse is listed, so the planner can hold the
jobs that file produced before (the store remembers each name's path).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.domain.manifest import LoadError, Manifest, PolicyManifest
from reconciler.domain.snapshot import Snapshot


@dataclass(frozen=True)
class Desired:
    ready: bool
    reason: str = ""
    revision: str | None = None
    manifests: Mapping[str, Manifest] = field(default_factory=dict)
    #: name -> why it is held (claimed twice, or named by a broken document).
    held: Mapping[str, str] = field(default_factory=dict)
    #: Paths (files, or directories ending in "/") that could not be read or parsed.
    broken: frozenset[str] = frozenset()
    errors: tuple[LoadError, ...] = ()
    file_count: int = 0
    #: Approval policies by name, and those held (broken or claimed twice): a held policy's
    #: last valid version stays in force.
    policies: Mapping[str, PolicyManifest] = field(default_factory=dict)
    held_policies: Mapping[str, str] = field(default_factory=dict)
    #: Paths that changed moments ago and are still settling ("sub/" covers a folder, ""
    #: the whole tree): no effect is planned for them until they settle.
    settling: frozenset[str] = frozenset()

    def is_settling(self, path: str | None) -> bool:
        return path is not None and any(
            s == "" or s == path or (s.endswith("/") and path.startswith(s))
            for s in self.settling
        )

    def is_broken(self, path: str) -> bool:
        """Whether ``path`` is a broken file or lies below a broken directory."""
        return path in self.broken or any(
            b.endswith("/") and path.startswith(b) for b in self.broken
        )


def collect(snapshot: Snapshot) -> Desired:
    if not snapshot.ready:
        return Desired(False, snapshot.reason, snapshot.revision)
    claims: dict[str, list[Manifest]] = defaultdict(list)
    policy_claims: dict[str, list[PolicyManifest]] = defaultdict(list)
    held: dict[str, str] = {}
    held_policies: dict[str, str] = {}
    errors: list[LoadError] = []
    broken: set[str] = set()
    for path in sorted(snapshot.files):
        result = snapshot.files[path]
        for manifest in result.manifests:
            claims[manifest.name].append(manifest)
        for policy in result.policies:
            policy_claims[policy.name].append(policy)
        for error in result.errors:
            errors.append(error)
            broken.add(path)
            target = held_policies if error.kind == "ApprovalPolicy" else held
            for name in error.names:
                target[name] = f"{error.path}: {error.field}: {error.message}"
    manifests: dict[str, Manifest] = {}
    for name, claimants in claims.items():
        if len(claimants) > 1:
            paths = ", ".join(f"{m.path}:{m.line}" for m in claimants)
            held[name] = f"name claimed by more than one manifest: {paths}"
            errors.extend(
                LoadError(m.path, m.line, "metadata.name", f"name {name!r} is also claimed by "
                          + ", ".join(f"{o.path}:{o.line}" for o in claimants if o is not m))
                for m in claimants
            )
        elif name not in held:
            manifests[name] = claimants[0]
    policies: dict[str, PolicyManifest] = {}
    for name, claimants_ in policy_claims.items():
        if len(claimants_) > 1:
            held_policies[name] = "policy name claimed by more than one document: " + ", ".join(
                f"{p.path}:{p.line}" for p in claimants_)
            errors.extend(LoadError(p.path, p.line, "metadata.name",
                                    f"policy {name!r} is defined more than once")
                          for p in claimants_)
        elif name not in held_policies:
            policies[name] = claimants_[0]
    return Desired(
        ready=True,
        policies=policies,
        held_policies=held_policies,
        revision=snapshot.revision,
        manifests=manifests,
        held=held,
        broken=frozenset(broken),
        errors=tuple(errors),
        file_count=len(snapshot.files),
    )
