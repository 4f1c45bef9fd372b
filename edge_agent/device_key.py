"""The box's Ed25519 device key: made at first start, kept 0600, signs what must stay provable.

The device key signs segment-chain heads and retention tombstones (ARCHITECTURE decision 3).
Its public half is registered at the hub, so a head or tombstone the hub has received proves
what the box held at that time even if someone later rewrites the box's disk. Signed payloads are
canonical JSON (sorted keys, no spaces, ASCII) so the hub can rebuild and check the exact bytes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sitelink.signing import (
    SigningKeyError,
    canonical_json,
    key_id,
    public_key_pem,
    sign_payload,
    verify_payload,
)
from sitelink.signing import load_public_key_pem as _load_public_key_pem

__all__ = [
    "DeviceKeyError",
    "canonical_json",
    "key_id",
    "load_device_key",
    "load_or_create_device_key",
    "load_public_key_pem",
    "public_key_pem",
    "sign_payload",
    "verify_payload",
]


class DeviceKeyError(Exception):
    """The device key file cannot be used; the message says what to do."""


def load_or_create_device_key(path: Path) -> Ed25519PrivateKey:
    """Load the device key, or make one (mode 0600) if the file does not exist yet.

    Refuses a key file that group or others can read: a copied device key lets anyone sign
    chain heads and tombstones in this box's name.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_device_key(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        os.fchmod(fd, 0o600)  # the umask may have been stricter; never looser than 0600
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def load_device_key(path: Path) -> Ed25519PrivateKey:
    """Load an existing device key, checking its permissions first."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DeviceKeyError(f"device key {path} does not exist") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise DeviceKeyError(
            f"device key {path} is accessible by group or others "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise DeviceKeyError(f"device key {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceKeyError(f"device key {path} is not an Ed25519 key")
    return key


def load_public_key_pem(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM public key as exported by `public_key_pem`."""
    try:
        return _load_public_key_pem(pem)
    except SigningKeyError as exc:
        raise DeviceKeyError(str(exc)) from None
