"""The device key: made once at 0600, refused when others can read it, signs canonical JSON."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.device_key import (
    DeviceKeyError,
    canonical_json,
    key_id,
    load_device_key,
    load_or_create_device_key,
    load_public_key_pem,
    public_key_pem,
    sign_payload,
    verify_payload,
)


def test_first_start_makes_a_key_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "device_key.pem"
    old_umask = os.umask(0)  # even a careless umask must not widen the mode
    try:
        key = load_or_create_device_key(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    again = load_or_create_device_key(path)
    assert key_id(again) == key_id(key)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_a_key_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "device_key.pem"
    load_or_create_device_key(path)
    path.chmod(mode)
    with pytest.raises(DeviceKeyError) as err:
        load_or_create_device_key(path)
    message = str(err.value)
    assert f"mode {mode:04o}" in message and message.endswith(f"run: chmod 600 {path}")
    assert "\n" not in message


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "device_key.pem"
    path.write_text("not a key")
    path.chmod(0o600)
    with pytest.raises(DeviceKeyError, match="not a PEM private key"):
        load_device_key(path)
    with pytest.raises(DeviceKeyError, match="does not exist"):
        load_device_key(tmp_path / "absent.pem")


def test_public_key_exports_as_pem_with_a_stable_key_id(tmp_path: Path) -> None:
    key = load_or_create_device_key(tmp_path / "device_key.pem")
    pem = public_key_pem(key)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    public = load_public_key_pem(pem)
    assert key_id(public) == key_id(key) and len(key_id(key)) == 16
    assert public_key_pem(public) == pem


def test_signatures_cover_the_canonical_payload_and_nothing_else() -> None:
    key = Ed25519PrivateKey.generate()
    payload = {"seq": 7, "camera": "cam-1", "time": 1.5, "note": "Đà Nẵng"}
    signature = sign_payload(key, payload)
    assert (
        canonical_json(payload)
        == b'{"camera":"cam-1","note":"\\u0110\\u00e0 N\\u1eb5ng","seq":7,"time":1.5}'
    )
    assert verify_payload(key.public_key(), dict(reversed(payload.items())), signature)
    assert not verify_payload(key.public_key(), {**payload, "seq": 8}, signature)
    assert not verify_payload(Ed25519PrivateKey.generate().public_key(), payload, signature)
    assert not verify_payload(key.public_key(), payload, "not base64!")
