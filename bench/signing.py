"""Signing speed: signatures per second on one core, RSA-2048 and Ed25519.

Usage: python -m bench.signing
"""

from __future__ import annotations

import time

from bench.common import key, scratch, table
from reconciler.backends.signing import load_signer, payload_bytes

PAYLOAD = payload_bytes({"APIVersion": "V1beta1", "ClientID": "0" * 64, "Spec": {
    "Engine": "Docker", "Docker": {"Image": "ubuntu:22.04"}, "Deal": {"Concurrency": 1},
    "PublisherSpec": {"Type": "Ipfs"},
    "Annotations": ["reconciler", "reconciler-uid:" + "0" * 32]}})


def rate(key_type: str, seconds: float = 2.0) -> float:
    signer = load_signer(key(scratch(), key_type))
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(100):
            signer.sign(PAYLOAD)
        count += 100
    return count / (time.perf_counter() - started)


def main() -> None:
    rows: list[list[object]] = [[k, f"{rate(k):,.0f}"] for k in ("rsa", "ed25519")]
    print(f"Signatures per second, one core, {len(PAYLOAD)}-byte payload")
    print(table(["key", "signatures/s"], rows))


if __name__ == "__main__":
    main()
