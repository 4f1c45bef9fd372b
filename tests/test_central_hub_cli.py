"""`central-hub keygen` and `central-hub unseal`, run as an operator would."""

from __future__ import annotations

import stat
import subprocess
import sys
import time
from pathlib import Path

from sitelink.sealed_segment import SegmentHeader, SegmentSealer, load_public_key

BIN = Path(sys.executable).parent


def _hub(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "central-hub"), *args], capture_output=True, text=True, timeout=60
    )


def _sealed(tmp_path: Path, pub: Path, chunks: list[bytes]) -> Path:
    seg = tmp_path / "cam-01-00000001.seg"
    with (
        seg.open("wb") as f,
        SegmentSealer(
            f, SegmentHeader("site-01", "cam-01", 1, time.time()), [load_public_key(pub)]
        ) as sealer,
    ):
        for chunk in chunks:
            sealer.write_chunk(chunk)
    return seg


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    done = _hub("keygen", str(tmp_path / "viewing"))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "viewing.key").stat().st_mode) == 0o600
    assert (tmp_path / "viewing.pub").exists()
    again = _hub("keygen", str(tmp_path / "viewing"))
    assert again.returncode != 0 and "--force" in again.stderr


def test_unseal_restores_exactly_what_was_sealed(tmp_path: Path) -> None:
    assert _hub("keygen", str(tmp_path / "viewing")).returncode == 0
    chunks = [b"ftypisom-init" * 50, b"moof-fragment-1" * 900, b"moof-fragment-2" * 700]
    seg = _sealed(tmp_path, tmp_path / "viewing.pub", chunks)
    out = tmp_path / "out.mp4"
    done = _hub("unseal", "--key", str(tmp_path / "viewing.key"), str(seg), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == b"".join(chunks)
    assert "finished" in done.stderr


def test_unseal_of_a_tampered_segment_fails_and_writes_nothing(tmp_path: Path) -> None:
    assert _hub("keygen", str(tmp_path / "viewing")).returncode == 0
    seg = _sealed(tmp_path, tmp_path / "viewing.pub", [b"a" * 4000, b"b" * 4000])
    data = bytearray(seg.read_bytes())
    data[-100] ^= 0x01
    seg.write_bytes(bytes(data))
    out = tmp_path / "out.mp4"
    done = _hub("unseal", "--key", str(tmp_path / "viewing.key"), str(seg), "-o", str(out))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and str(seg) in done.stderr
    assert not out.exists()


def test_unseal_with_someone_elses_key_is_refused(tmp_path: Path) -> None:
    assert _hub("keygen", str(tmp_path / "viewing")).returncode == 0
    assert _hub("keygen", "--suite", "x25519", str(tmp_path / "other")).returncode == 0
    seg = _sealed(tmp_path, tmp_path / "viewing.pub", [b"x" * 100])
    done = _hub(
        "unseal", "--key", str(tmp_path / "other.key"), str(seg), "-o", str(tmp_path / "o.mp4")
    )
    assert done.returncode != 0
    assert "wrong key" in done.stderr
