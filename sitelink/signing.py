"""Ed25519 signatures over canonical JSON: what the edge's device key signs and the hub checks.

Both sides import this module, so the bytes signed at the edge and rebuilt at the hub cannot
drift apart: canonical JSON is sorted keys, no whitespace, ASCII only, no NaN.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningKeyError(ValueError):
    """A key given as PEM is not an Ed25519 public key."""


def canonical_json(payload: dict[str, Any]) -> bytes:
    """The exact bytes that are hashed or signed: sorted keys, no whitespace, ASCII only."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def sign_payload(key: Ed25519PrivateKey, payload: dict[str, Any]) -> str:
    """Ed25519 signature over `canonical_json(payload)`, base64 (standard alphabet)."""
    return base64.b64encode(key.sign(canonical_json(payload))).decode("ascii")


def verify_payload(public: Ed25519PublicKey, payload: dict[str, Any], signature: str) -> bool:
    """True if `signature` is the key's signature over `canonical_json(payload)`."""
    try:
        public.verify(base64.b64decode(signature, validate=True), canonical_json(payload))
    except (InvalidSignature, ValueError):
        return False
    return True


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as PEM (SubjectPublicKeyInfo), for enrolment at the hub."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def load_public_key_pem(pem: str | bytes) -> Ed25519PublicKey:
    """Parse a PEM public key as exported by `public_key_pem`."""
    data = pem.encode("ascii") if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError("public key is not an Ed25519 key")
    return key


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Short stable name of a key: the first 16 hex digits of SHA-256 over the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]
