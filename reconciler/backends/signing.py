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

Errors: :class:`KeyFileError` for unusable key files, derived from :class:`SigningError`.
Checking envelopes is the server's side: :mod:`reconciler.devnet.envelope`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

KeyType = Literal["rsa", "ed25519"]


class SigningError(Exception):
    """Base of this module's errors."""


class KeyFileError(SigningError):
    """A key file is missing, unreadable, too open, or not a key we can use."""


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


def check_key_permissions(path: Path, uid: int | None = None) -> None:
    """Refuse a key file that group or others may read or write, or that someone else could
    replace: as ssh's ``StrictModes`` does, the file and every folder above it must be owned
    by root or by us (``uid``, default the effective user), and no folder may be writable by
    group or others unless its sticky bit keeps them from renaming what they do not own (as in
    ``/tmp``).

    A 0400/0600 file is fine, which includes what systemd's ``LoadCredential=`` hands over.
    """
    uid = os.geteuid() if uid is None else uid
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
    if info.st_uid not in (0, uid):
        raise KeyFileError(f"{path}: the signing key is owned by another user "
                           f"(uid {info.st_uid}); it must belong to root or to uid {uid}")
    _check_key_folders(path, uid)


def _check_key_folders(path: Path, uid: int) -> None:
    """Every folder on the way to the key (as given, and after resolving links)."""
    folders = {*path.absolute().parents, *path.resolve().parents}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        try:
            info = folder.stat()
        except OSError as exc:
            raise KeyFileError(f"{path}: cannot check the folder {folder} ({exc.strerror})"
                               ) from None
        if info.st_uid not in (0, uid):
            raise KeyFileError(f"{path}: the folder {folder} is owned by another user "
                               f"(uid {info.st_uid}), who could replace the signing key")
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise KeyFileError(
                f"{path}: the folder {folder} is writable by others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}), who could replace the signing key; "
                f"run `chmod go-w {folder}`")


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
