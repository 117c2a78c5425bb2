"""Keys, client ids and signed envelopes, byte for byte as Bacalhau does them
(docs/wire-legacy.md, Signing).

Two key types, told apart by the key file itself:

* RSA (what Bacalhau uses; ``~/.bacalhau/user_id.pem`` is read as is): the public key on the
  wire is base64 of the DER PKCS#1 ``RSAPublicKey``; the client id is the hex SHA-256 of the
  modulus bytes; signatures are RSASSA-PKCS1-v1_5 with SHA-256.
* Ed25519 (through PyNaCl): the public key is base64 of the raw 32 bytes; the client id is the
  hex SHA-256 of those bytes. Only the dev requester accepts it.

A signature covers the exact bytes of the ``payload`` value in the body, so the payload is
serialized once, signed, and those same bytes are embedded (:func:`signed_body`).

Errors: :class:`KeyFileError` for unusable key files, :class:`EnvelopeError` for envelopes that
do not verify. Both derive from :class:`SigningError`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

KeyType = Literal["rsa", "ed25519"]


class SigningError(Exception):
    """Base of this module's errors."""


class KeyFileError(SigningError):
    """A key file is missing, unreadable, too open, or not a key we can use."""


class EnvelopeError(SigningError):
    """A signed envelope is malformed or its signature does not verify."""


class Signer(Protocol):
    @property
    def key_type(self) -> KeyType: ...
    @property
    def public_key_b64(self) -> str: ...
    @property
    def client_id(self) -> str: ...
    def sign(self, data: bytes) -> str:
        """Base64 signature over ``data``."""
        ...


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rsa_client_id(public_key: rsa.RSAPublicKey) -> str:
    """Hex SHA-256 of the modulus as unsigned big-endian bytes (Go's ``N.Bytes()``)."""
    n = public_key.public_numbers().n
    return _sha256_hex(n.to_bytes((n.bit_length() + 7) // 8, "big"))


class RsaSigner:
    key_type: KeyType = "rsa"

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self._key = key
        public = key.public_key()
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        self.public_key_b64 = _b64(der)
        self.client_id = rsa_client_id(public)

    def sign(self, data: bytes) -> str:
        return _b64(self._key.sign(data, padding.PKCS1v15(), hashes.SHA256()))


class Ed25519Signer:
    key_type: KeyType = "ed25519"

    def __init__(self, seed: bytes) -> None:
        self._key = nacl.signing.SigningKey(seed)
        raw = bytes(self._key.verify_key)
        self.public_key_b64 = _b64(raw)
        self.client_id = _sha256_hex(raw)

    def sign(self, data: bytes) -> str:
        return _b64(self._key.sign(data).signature)


# --- key files -------------------------------------------------------------------------------


def check_key_permissions(path: Path) -> None:
    """Refuse a key file that group or others may read or write.

    A 0400/0600 file is fine, which includes what systemd's ``LoadCredential=`` hands over.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise KeyFileError(
            f"{path}: no signing key here; create one with `reconciler keygen --out {path}`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the signing key ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path}: the signing key is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path}: the signing key is readable or writable by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run `chmod 600 {path}`"
        )


def load_signer(path: Path) -> Signer:
    """Read an RSA (PKCS#1 or PKCS#8 PEM) or Ed25519 (PKCS#8 PEM) key file."""
    check_key_permissions(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the signing key ({exc.strerror})") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        # The message of these errors can quote key material: never pass it on.
        raise KeyFileError(
            f"{path}: not an unencrypted PEM private key (RSA or Ed25519)"
        ) from None
    if isinstance(key, rsa.RSAPrivateKey):
        return RsaSigner(key)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return Ed25519Signer(seed)
    raise KeyFileError(f"{path}: unsupported key type {type(key).__name__}; use RSA or Ed25519")


def generate_key_pem(key_type: KeyType) -> bytes:
    """A new private key as PEM: RSA-2048 in PKCS#1 (as Bacalhau writes it), Ed25519 in PKCS#8."""
    if key_type == "rsa":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    ed_key = ed25519.Ed25519PrivateKey.generate()
    return ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_new_key(path: Path, key_type: KeyType) -> Signer:
    """Write a new key with mode 0600; never overwrites an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = generate_key_pem(key_type)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; refusing to overwrite a key") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return load_signer(path)


# --- envelopes -------------------------------------------------------------------------------


def payload_bytes(payload: Mapping[str, Any]) -> bytes:
    """The one serialization of a payload that is both signed and sent."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def signed_body(signer: Signer, payload: Mapping[str, Any]) -> bytes:
    """``{client_public_key, payload, signature}`` with the signed bytes embedded verbatim."""
    raw = payload_bytes(payload)
    return b"".join(
        (
            b'{"client_public_key":',
            json.dumps(signer.public_key_b64).encode(),
            b',"payload":',
            raw,
            b',"signature":',
            json.dumps(signer.sign(raw)).encode(),
            b"}",
        )
    )


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
