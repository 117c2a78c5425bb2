"""Signing: the fixture vectors, our own envelopes, checked by an independent verifier."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.backends.signing import KeyFileError, load_signer, signed_body, write_new_key
from reconciler.devnet.envelope import EnvelopeError, raw_members, verify_envelope

VECTORS = sorted((Path(__file__).parent / "fixtures/vectors").glob("*.json"))


# --- an independent verifier: docs/wire-legacy.md "Signing", from first principles ---------


def _der_read(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end of content) of the DER element at ``pos``."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    return tag, pos, pos + length


def _pkcs1_public(der: bytes) -> tuple[int, int]:
    tag, start, _ = _der_read(der, 0)
    assert tag == 0x30, "PKCS#1 RSAPublicKey is a SEQUENCE"
    tag, n_start, n_end = _der_read(der, start)
    assert tag == 0x02
    tag, e_start, e_end = _der_read(der, n_end)
    assert tag == 0x02
    return int.from_bytes(der[n_start:n_end], "big"), int.from_bytes(der[e_start:e_end], "big")


SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


def independent_verify(public_b64: str, signature_b64: str, payload: bytes) -> str:
    """RSASSA-PKCS1-v1_5/SHA-256 by modular exponentiation; returns the client id."""
    n, e = _pkcs1_public(base64.b64decode(public_b64))
    k = (n.bit_length() + 7) // 8
    em = pow(int.from_bytes(base64.b64decode(signature_b64), "big"), e, n).to_bytes(k, "big")
    digest = SHA256_DIGEST_INFO + hashlib.sha256(payload).digest()
    expected = b"\x00\x01" + b"\xff" * (k - 3 - len(digest)) + b"\x00" + digest
    assert em == expected, "signature does not verify"
    return hashlib.sha256(n.to_bytes(k, "big").lstrip(b"\x00")).hexdigest()


def _payload_span(body: bytes) -> bytes:
    """The payload's raw bytes, found without our own parser: the text between the
    `"payload":` member and the `,"signature"` member of a compact envelope."""
    start = body.index(b'"payload":') + len(b'"payload":')
    end = body.rindex(b',"signature"')
    return body[start:end]


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS, ids=lambda p: p.name)
def test_fixture_vectors_verify(vector: Path) -> None:
    data = json.loads(vector.read_text())
    verified = verify_envelope(data["http_body"].encode())
    assert verified.client_id == data["client_id"]
    assert verified.payload_raw == data["payload_utf8"].encode()
    assert independent_verify(data["client_public_key"], data["signature"],
                              data["payload_utf8"].encode()) == data["client_id"]


def test_vectors_are_present() -> None:
    assert len(VECTORS) == 3


def test_our_envelope_passes_the_independent_verifier(rsa_key: Path) -> None:
    signer = load_signer(rsa_key)
    payload = {"ClientID": signer.client_id, "JobID": "j", "Reason": "é <&> \u2603"}
    body = signed_body(signer, payload)
    envelope = json.loads(body)
    raw = _payload_span(body)
    assert json.loads(raw) == payload
    assert independent_verify(envelope["client_public_key"], envelope["signature"], raw) == (
        signer.client_id
    )
    assert verify_envelope(body).client_id == signer.client_id


def test_reformatted_envelope_still_verifies_but_reserialized_payload_does_not(
    rsa_key: Path,
) -> None:
    signer = load_signer(rsa_key)
    body = signed_body(signer, {"ClientID": signer.client_id, "JobID": "x"})
    members = raw_members(body)
    reordered = (b'{ "signature" : ' + members["signature"] + b',\n "payload":'
                 + members["payload"] + b', "client_public_key":'
                 + members["client_public_key"] + b"}")
    assert verify_envelope(reordered).client_id == signer.client_id
    spaced = body.replace(b'"JobID":"x"', b'"JobID": "x"')
    with pytest.raises(EnvelopeError, match="signature is invalid"):
        verify_envelope(spaced)


def test_ed25519_envelope(ed_key: Path) -> None:
    signer = load_signer(ed_key)
    assert signer.key_type == "ed25519"
    raw_public = base64.b64decode(signer.public_key_b64)
    assert len(raw_public) == 32
    assert signer.client_id == hashlib.sha256(raw_public).hexdigest()
    body = signed_body(signer, {"ClientID": signer.client_id, "JobID": "x"})
    assert verify_envelope(body).key_type == "ed25519"
    with pytest.raises(EnvelopeError):
        verify_envelope(body.replace(b'"x"', b'"y"'))


def test_client_id_must_match_key(rsa_key: Path, other_rsa_key: Path) -> None:
    signer, other = load_signer(rsa_key), load_signer(other_rsa_key)
    body = signed_body(signer, {"ClientID": other.client_id, "JobID": "x"})
    with pytest.raises(EnvelopeError, match="does not match client ID"):
        verify_envelope(body)


def test_missing_payload_and_garbage() -> None:
    with pytest.raises(EnvelopeError, match="no payload"):
        verify_envelope(b'{"client_public_key":"AA==","signature":"AA=="}')
    with pytest.raises(EnvelopeError, match="unmarshalling envelope"):
        verify_envelope(b"not json")


def test_bacalhau_cli_key_is_read_as_is(tmp_path: Path) -> None:
    # ~/.bacalhau/user_id.pem is PEM "RSA PRIVATE KEY" (PKCS#1), mode 0600.
    path = tmp_path / "user_id.pem"
    write_new_key(path, "rsa")
    assert path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert load_signer(path).key_type == "rsa"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.pem"
    write_new_key(path, "rsa")
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="readable or writable by others"):
        load_signer(path)


def test_read_only_credential_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "signing-key"
    write_new_key(path, "ed25519")
    os.chmod(path, 0o400)
    assert load_signer(path).client_id


def test_not_a_key_does_not_echo_content(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    path.write_text("SECRET-MATERIAL-123")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as info:
        load_signer(path)
    assert "SECRET-MATERIAL" not in str(info.value)


def test_keygen_cli_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "new.pem"
    run = [sys.executable, "-m", "reconciler", "keygen", "--type", "ed25519", "--out", str(out)]
    first = subprocess.run(run, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == load_signer(out).client_id
    assert (out.stat().st_mode & 0o777) == 0o600
    before = out.read_bytes()
    second = subprocess.run(run, capture_output=True, text=True)
    assert second.returncode != 0
    assert "refusing to overwrite" in second.stderr
    assert out.read_bytes() == before
