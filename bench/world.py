"""A managed world of N manifests, built directly: the files, the store records a finished sync
leaves, and the same N jobs in a dev requester's journal. Lets memory and idle benchmarks start
from steady state without submitting N jobs first."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from reconciler.app.wiring import open_store
from reconciler.backends.legacy_jobs import job_annotations
from reconciler.backends.signing import Signer
from reconciler.devnet.jobs import apply_transforms
from reconciler.domain.manifest import load_file
from reconciler.domain.records import Phase, Record
from tests.reliability.common import manifest


def build(directory: Path, count: int, signer: Signer) -> tuple[Path, Path, Path]:
    root, state, journal = directory / "manifests", directory / "state.db", directory / "jobs"
    root.mkdir(parents=True)
    records, lines, now = [], [], time.time()
    for index in range(count):
        name = f"w-{index:06d}"
        text = manifest(name, f"img:{index}")
        (root / f"{name}.yaml").write_text(text)
        [item] = load_file(f"{name}.yaml", text.encode()).manifests
        uid, job_id = f"{index:032x}", str(uuid.uuid4())
        spec = item.wire()
        spec["Annotations"] = job_annotations(item, uid)
        records.append(Record(name, Phase.ACTIVE, item.spec_hash, f"{name}.yaml",
                              job_id=job_id, uid=uid, job_state="New", attempts=1))
        lines.append(json.dumps({"job_id": job_id, "client_id": signer.client_id,
                                 "spec": apply_transforms(spec), "created": now,
                                 "state": "New", "execution": "BidAccepted", "started": now,
                                 "ended": None, "comment": "", "version": 1}))
    with open_store(state) as store:
        store.commit_intents(records)
    journal.write_text("\n".join(lines) + "\n")
    return root, state, journal
