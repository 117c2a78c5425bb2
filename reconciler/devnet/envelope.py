"""Checking a signed envelope the way the requester does (docs/wire-legacy.md, Signing): the dev
requester's side of :mod:`reconciler.backends.signing`, which only signs.

It lives here, not beside the signer, so the daemon never carries server-side code; tests use
it as an independent check of the envelopes the client builds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from reconciler.backends.signing import KeyType, SigningError, rsa_client_id


class EnvelopeError(SigningError):
    """A signed envelope is malformed or its signature does not verify."""


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class VerifiedEnvelope:
    client_id: str
    key_type: KeyType
    payload_raw: bytes
    payload: dict[str, Any]


def raw_members(body: bytes) -> dict[str, bytes]:
    """The raw bytes of each top-level member of a JSON object, exactly as sent.

    Python's json module gives values, not spans; the signature covers a span, so walk the
    object ourselves and let ``raw_decode`` measure each value.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("error unmarshalling envelope: body is not UTF-8") from None
    decoder = json.JSONDecoder()
    members: dict[str, bytes] = {}
    pos = _skip_ws(text, 0)
    if not text.startswith("{", pos):
        raise EnvelopeError("error unmarshalling envelope: not a JSON object")
    pos = _skip_ws(text, pos + 1)
    if text.startswith("}", pos):
        return members
    while True:
        try:
            key, pos = decoder.raw_decode(text, pos)
            pos = _skip_ws(text, pos)
            if not isinstance(key, str) or not text.startswith(":", pos):
                raise ValueError("expected a key")
            start = _skip_ws(text, pos + 1)
            _, end = decoder.raw_decode(text, start)
        except ValueError as exc:
            raise EnvelopeError(f"error unmarshalling envelope: {exc}") from None
        members[key] = text[start:end].encode("utf-8")
        pos = _skip_ws(text, end)
        if text.startswith(",", pos):
            pos = _skip_ws(text, pos + 1)
            continue
        if text.startswith("}", pos) and not text[pos + 1 :].strip():
            return members
        raise EnvelopeError("error unmarshalling envelope: malformed object")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def verify_envelope(body: bytes) -> VerifiedEnvelope:
    """Check an envelope in the server's order (docs/wire-legacy.md, Signing): decode, require a
    payload, verify the signature over its raw bytes, decode it, match ClientID to the key."""
    members = raw_members(body)
    raw = members.get("payload")
    if raw is None or raw == b"null":
        raise EnvelopeError("no payload contained in signed message")
    public_b64 = _json_string(members.get("client_public_key"), "client_public_key")
    signature_b64 = _json_string(members.get("signature"), "signature")
    key_type, derived_id = _verify_signature(public_b64, signature_b64, raw)
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise EnvelopeError(f"error unmarshalling payload: {exc}") from None
    if not isinstance(payload, dict):
        raise EnvelopeError("error unmarshalling payload: payload is not a JSON object")
    client_id = _field_ci(payload, "ClientID")
    if not client_id:
        raise EnvelopeError("error validating request: ClientID is empty")
    if client_id != derived_id:
        raise EnvelopeError(
            "error validating request: client's public key does not match client ID"
        )
    return VerifiedEnvelope(client_id, key_type, raw, payload)


def _field_ci(payload: Mapping[str, Any], name: str) -> Any:
    # Go's decoder matches object keys to field names ignoring case.
    for key, value in payload.items():
        if key.lower() == name.lower():
            return value
    return None


def _json_string(raw: bytes | None, name: str) -> str:
    value = json.loads(raw) if raw is not None else None
    if not isinstance(value, str) or not value:
        raise EnvelopeError(f"error verifying request signature: {name} is missing")
    return value


def _verify_signature(public_b64: str, signature_b64: str, data: bytes) -> tuple[KeyType, str]:
    try:
        public = base64.b64decode(public_b64, validate=True)
        signature = base64.b64decode(signature_b64, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeError("error verifying request signature: bad base64") from None
    if len(public) == 32:
        try:
            nacl.signing.VerifyKey(public).verify(data, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
            raise EnvelopeError(
                "error verifying request signature: client's signature is invalid"
            ) from None
        return "ed25519", _sha256_hex(public)
    try:
        key = serialization.load_der_public_key(_pkcs1_to_spki(public))
    except (ValueError, TypeError):
        raise EnvelopeError(
            "error verifying request signature: x509: failed to parse public key"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EnvelopeError("error verifying request signature: not an RSA key")
    try:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        raise EnvelopeError(
            "error verifying request signature: client's signature is invalid: "
            "crypto/rsa: verification error"
        ) from None
    return "rsa", rsa_client_id(key)


# DER prefix that wraps a PKCS#1 RSAPublicKey into SubjectPublicKeyInfo (rsaEncryption OID).
_RSA_ALGORITHM_ID = bytes.fromhex("300d06092a864886f70d0101010500")


def _pkcs1_to_spki(pkcs1: bytes) -> bytes:
    """Wrap PKCS#1 DER so ``cryptography`` can load it; PKIX input is refused, as Go does."""
    if not pkcs1 or pkcs1[0] != 0x30:
        raise ValueError("not DER")
    if _looks_like_spki(pkcs1):
        raise ValueError("PKIX key; PKCS#1 expected")
    bit_string = b"\x03" + _der_length(len(pkcs1) + 1) + b"\x00" + pkcs1
    body = _RSA_ALGORITHM_ID + bit_string
    return b"\x30" + _der_length(len(body)) + body


def _looks_like_spki(der: bytes) -> bool:
    return _RSA_ALGORITHM_ID in der[:32]


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded
