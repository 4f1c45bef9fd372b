"""Sealed segments: round trips, every tamper case, crash tails, key files, HPKE conformance.

The spec-level helpers at the top (`_spec_*`, `_ref_hpke_*`) are a second, independent reading of
docs/sealed-segment.md and RFC 9180 / X-Wing, written from the documents rather than from the
module, so the module is tested against the spec and not only against itself.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import select
import stat
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.bindings._rust import openssl as rust_openssl
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sitelink.sealed_segment import (
    DEFAULT_SUITE,
    MAGIC,
    MAX_CHUNK_SIZE,
    ChunkCorruptedError,
    ChunkDroppedError,
    ChunkDuplicatedError,
    ChunkError,
    ChunkReorderedError,
    ChunkTooLargeError,
    ForeignChunkError,
    HeaderError,
    HeaderTamperedError,
    InvalidHeaderError,
    KeyFileError,
    MalformedHeaderError,
    NotARecipientError,
    NotASealedSegmentError,
    RecipientPrivateKey,
    RecipientPublicKey,
    SealedSegmentError,
    SealerClosedError,
    SealSuite,
    SegmentHeader,
    SegmentSealer,
    TrailingDataError,
    UnfinishedSegmentError,
    UnsupportedVersionError,
    generate_private_key,
    load_private_key,
    load_public_key,
    open_segment,
    read_header,
    scan_segment,
    unseal_to,
    write_private_key,
    write_public_key,
)

CHUNKS = [b"ftyp-init-segment" * 3, b"moof+mdat fragment 1" * 20, b"", b"fragment 3" * 7]
START = 1_623_456_789.123456  # 2021-06-12, the rollout's month


@dataclass(frozen=True)
class Keys:
    hybrid_a: RecipientPrivateKey
    hybrid_b: RecipientPrivateKey
    classic: RecipientPrivateKey
    outsider: RecipientPrivateKey
    outsider_classic: RecipientPrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        generate_private_key(),
        generate_private_key(SealSuite.MLKEM768_X25519),
        generate_private_key(SealSuite.X25519),
        generate_private_key(),
        generate_private_key(SealSuite.X25519),
    )


def _header(seq: int = 7, camera: str = "cam-03", start: float = START) -> SegmentHeader:
    return SegmentHeader("hcm-q7-cachly-001", camera, seq, start)


def _seal(
    chunks: list[bytes],
    recipients: list[RecipientPrivateKey],
    header: SegmentHeader | None = None,
    *,
    close: bool = True,
) -> bytes:
    buf = io.BytesIO()
    sealer = SegmentSealer(buf, header or _header(), [k.public_key() for k in recipients])
    for chunk in chunks:
        sealer.write_chunk(chunk)
    if close:
        sealer.close()
    return buf.getvalue()


def _open_all(data: bytes, key: RecipientPrivateKey) -> tuple[list[bytes], bool, int]:
    with open_segment(io.BytesIO(data), key) as seg:
        chunks = list(seg)
        return chunks, seg.finished, seg.tail_bytes


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


# ---------------------------------------------------------------------------------------------
# A spec-level reader (docs/sealed-segment.md), independent of the module's code


def _spec_uvarint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _spec_read_uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


@dataclass
class SpecRecipient:
    key_id_at: int
    suite_ids: tuple[int, int, int]
    wrapped_at: int
    wrapped: bytes


@dataclass
class SpecFrame:
    start: int
    end: int
    ct_len_at: int
    position_at: int
    ct_at: int
    counter: int
    last: bool


@dataclass
class SpecSegment:
    header_end: int
    identity: bytes
    site_at: int
    seq_at: int
    start_at: int
    nonce_prefix: bytes
    recipients: list[SpecRecipient]
    header_digest: bytes
    frames: list[SpecFrame]


def _spec_parse(data: bytes) -> SpecSegment:
    assert data[:8] == MAGIC
    version, pos = _spec_read_uvarint(data, 8)
    assert version == 1
    body_len, body_at = _spec_read_uvarint(data, pos)
    pos = body_at
    site_len, site_at = _spec_read_uvarint(data, pos)
    cam_len, pos = _spec_read_uvarint(data, site_at + site_len)
    seq_at = pos + cam_len
    _, start_at = _spec_read_uvarint(data, seq_at)
    _, pos = _spec_read_uvarint(data, start_at)
    nonce_prefix = data[pos : pos + 7]
    pos += 7
    identity = data[:8] + _spec_uvarint(version) + data[body_at:pos]
    count, pos = _spec_read_uvarint(data, pos)
    recipients = []
    for _ in range(count):
        key_id_at = pos
        pos += 8
        kem, pos = _spec_read_uvarint(data, pos)
        kdf, pos = _spec_read_uvarint(data, pos)
        aead, pos = _spec_read_uvarint(data, pos)
        size, pos = _spec_read_uvarint(data, pos)
        recipients.append(SpecRecipient(key_id_at, (kem, kdf, aead), pos, data[pos : pos + size]))
        pos += size
    assert pos == body_at + body_len
    header_end = pos + 16
    digest = hashlib.sha256(data[:header_end]).digest()
    frames = []
    pos = header_end
    while pos < len(data):
        assert data[pos : pos + 8] == digest[:8]
        ct_len, position_at = _spec_read_uvarint(data, pos + 8)
        position, ct_at = _spec_read_uvarint(data, position_at)
        frames.append(
            SpecFrame(
                pos, ct_at + ct_len, pos + 8, position_at, ct_at, position >> 1, bool(position & 1)
            )
        )
        pos = ct_at + ct_len
    return SpecSegment(
        header_end, identity, site_at, seq_at, start_at, nonce_prefix, recipients, digest, frames
    )


# ---------------------------------------------------------------------------------------------
# A reference RFC 9180 base mode (HKDF-SHA256) and X-Wing, built from the RFCs on primitives


def _hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    return hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def _labeled_extract(suite_id: bytes, salt: bytes, label: bytes, ikm: bytes) -> bytes:
    return _hkdf_extract(salt, b"HPKE-v1" + suite_id + label + ikm)


def _labeled_expand(suite_id: bytes, prk: bytes, label: bytes, info: bytes, length: int) -> bytes:
    return _hkdf_expand(
        prk, length.to_bytes(2, "big") + b"HPKE-v1" + suite_id + label + info, length
    )


def _ref_key_schedule(
    kem_id: int, aead_id: int, shared_secret: bytes, info: bytes
) -> tuple[bytes, bytes]:
    """RFC 9180 §5.1, mode_base, KDF HKDF-SHA256: (key, base_nonce)."""
    suite_id = (
        b"HPKE" + kem_id.to_bytes(2, "big") + (1).to_bytes(2, "big") + aead_id.to_bytes(2, "big")
    )
    context = (
        b"\x00"
        + _labeled_extract(suite_id, b"", b"psk_id_hash", b"")
        + _labeled_extract(suite_id, b"", b"info_hash", info)
    )
    secret = _labeled_extract(suite_id, shared_secret, b"secret", b"")
    nk = 16 if aead_id == 1 else 32
    return (
        _labeled_expand(suite_id, secret, b"key", context, nk),
        _labeled_expand(suite_id, secret, b"base_nonce", context, 12),
    )


def _ref_dhkem_x25519_shared(dh: bytes, enc: bytes, pk_r: bytes) -> bytes:
    """RFC 9180 §4.1 ExtractAndExpand for DHKEM(X25519, HKDF-SHA256)."""
    kem_suite = b"KEM" + (0x0020).to_bytes(2, "big")
    prk = _labeled_extract(kem_suite, b"", b"eae_prk", dh)
    return _labeled_expand(kem_suite, prk, b"shared_secret", enc + pk_r, 32)


def _ref_x25519_seal(
    pk_r: x25519.X25519PublicKey,
    sk_e: x25519.X25519PrivateKey,
    info: bytes,
    aad: bytes,
    pt: bytes,
    aead_id: int,
) -> tuple[bytes, bytes, bytes, bytes]:
    enc = sk_e.public_key().public_bytes_raw()
    shared = _ref_dhkem_x25519_shared(sk_e.exchange(pk_r), enc, pk_r.public_bytes_raw())
    key, nonce = _ref_key_schedule(0x0020, aead_id, shared, info)
    return enc, key, nonce, AESGCM(key).encrypt(nonce, pt, aad)


def _ref_x25519_open(sk_r: x25519.X25519PrivateKey, blob: bytes, info: bytes) -> bytes:
    enc, ct = blob[:32], blob[32:]
    dh = sk_r.exchange(x25519.X25519PublicKey.from_public_bytes(enc))
    shared = _ref_dhkem_x25519_shared(dh, enc, sk_r.public_key().public_bytes_raw())
    key, nonce = _ref_key_schedule(0x0020, 2, shared, info)
    return AESGCM(key).decrypt(nonce, ct, b"")


XWING_LABEL = b"\\.//^\\"  # draft-connolly-cfrg-xwing-kem §5.3


def _xwing_keys(seed: bytes) -> tuple[mlkem.MLKEM768PrivateKey, x25519.X25519PrivateKey]:
    expanded = hashlib.shake_256(seed).digest(96)
    return (
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:]),
    )


def _ref_xwing_decaps(seed: bytes, ct: bytes) -> bytes:
    sk_m, sk_x = _xwing_keys(seed)
    ss_m = sk_m.decapsulate(ct[:1088])
    ct_x = ct[1088:]
    ss_x = sk_x.exchange(x25519.X25519PublicKey.from_public_bytes(ct_x))
    pk_x = sk_x.public_key().public_bytes_raw()
    return hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()


def _ref_xwing_seal(public_raw: bytes, info: bytes, pt: bytes) -> bytes:
    pk_m = mlkem.MLKEM768PublicKey.from_public_bytes(public_raw[:1184])
    pk_x = public_raw[1184:]
    ss_m, ct_m = pk_m.encapsulate()
    eph = x25519.X25519PrivateKey.generate()
    ct_x = eph.public_key().public_bytes_raw()
    ss_x = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk_x))
    shared = hashlib.sha3_256(ss_m + ss_x + ct_x + pk_x + XWING_LABEL).digest()
    key, nonce = _ref_key_schedule(0x647A, 2, shared, info)
    return ct_m + ct_x + AESGCM(key).encrypt(nonce, pt, b"")


def _ref_xwing_open(seed: bytes, blob: bytes, info: bytes) -> bytes:
    shared = _ref_xwing_decaps(seed, blob[:1120])
    key, nonce = _ref_key_schedule(0x647A, 2, shared, info)
    return AESGCM(key).decrypt(nonce, blob[1120:], b"")


# ---------------------------------------------------------------------------------------------
# Round trips


def test_every_recipient_opens_the_segment_with_either_suite(keys: Keys) -> None:
    recipients = [keys.hybrid_a, keys.classic, keys.hybrid_b]
    data = _seal(CHUNKS, recipients)
    for key in recipients:
        with open_segment(io.BytesIO(data), key) as seg:
            assert list(seg) == CHUNKS
            assert seg.finished is True
            assert seg.key_id == key.key_id
            assert seg.chunk_count == len(CHUNKS)
            assert (seg.header.site_id, seg.header.camera_id, seg.header.seq) == (
                "hcm-q7-cachly-001",
                "cam-03",
                7,
            )
            assert [r.key_id for r in seg.header.recipients] == [k.key_id for k in recipients]


def test_default_suite_is_the_hybrid_post_quantum_kem_with_the_measured_sizes(keys: Keys) -> None:
    assert DEFAULT_SUITE is SealSuite.MLKEM768_X25519
    assert generate_private_key().suite is SealSuite.MLKEM768_X25519
    header = read_header(io.BytesIO(_seal([b"x"], [keys.hybrid_a, keys.classic])))
    sizes = {r.suite: len(r.wrapped_key) for r in header.recipients}
    # FIELD-NOTES: wrapping a 32-byte key is 1,168 bytes hybrid and 80 bytes X25519.
    assert sizes == {SealSuite.MLKEM768_X25519: 1168, SealSuite.X25519: 80}


def test_any_of_several_keys_opens_a_segment_as_during_key_rotation(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.hybrid_b])
    with open_segment(io.BytesIO(data), [keys.outsider, keys.hybrid_b]) as seg:
        assert list(seg) == CHUNKS
        assert seg.key_id == keys.hybrid_b.key_id


def test_header_and_scan_read_without_a_key_from_a_path_or_a_stream(
    keys: Keys, tmp_path: Path
) -> None:
    data = _seal(CHUNKS, [keys.hybrid_a, keys.classic])
    path = tmp_path / "seg.isg"
    path.write_bytes(data)
    header = read_header(path)
    assert header == read_header(io.BytesIO(data))
    assert header.start_time == START
    assert {r.suite for r in header.recipients} == {SealSuite.MLKEM768_X25519, SealSuite.X25519}
    scan = scan_segment(path)
    assert (scan.chunk_count, scan.finished, scan.tail_bytes) == (len(CHUNKS), True, 0)
    assert scan.complete_size == len(data)
    assert scan.header_size == _spec_parse(data).header_end


def test_start_time_round_trips_to_the_microsecond(keys: Keys) -> None:
    header = SegmentHeader("s", "c", 0, 1_700_000_000.1234567)
    assert header.start_time == 1_700_000_000.123457
    data = _seal([b"x"], [keys.classic], header)
    assert read_header(io.BytesIO(data)).start_time == header.start_time
    assert read_header(io.BytesIO(data)).start_us == 1_700_000_000_123_457


def test_unseal_to_writes_the_plaintext_0600_and_leaves_nothing_on_error(
    keys: Keys, tmp_path: Path
) -> None:
    src = tmp_path / "seg.isg"
    src.write_bytes(_seal(CHUNKS, [keys.hybrid_a]))
    key_file = tmp_path / "view.key"
    write_private_key(keys.hybrid_a, key_file)
    out = tmp_path / "out.mp4"
    seg = unseal_to(src, key_file, out)
    assert out.read_bytes() == b"".join(CHUNKS)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert (seg.finished, seg.chunk_count) == (True, len(CHUNKS))

    spec = _spec_parse(src.read_bytes())
    src.write_bytes(_flip(src.read_bytes(), spec.frames[1].ct_at))
    bad = tmp_path / "bad.mp4"
    with pytest.raises(ChunkCorruptedError):
        unseal_to(src, keys.hybrid_a, bad)
    assert list(tmp_path.glob("*bad*")) == []


def test_sealer_sha256_and_size_match_the_written_file(keys: Keys) -> None:
    buf = io.BytesIO()
    with SegmentSealer(buf, _header(), [keys.classic.public_key()]) as sealer:
        for chunk in CHUNKS:
            sealer.write_chunk(chunk)
    assert sealer.sha256 == hashlib.sha256(buf.getvalue()).hexdigest()
    assert sealer.bytes_written == len(buf.getvalue())
    assert sealer.chunk_count == len(CHUNKS)
    assert sealer.header.recipients[0].key_id == keys.classic.key_id


# ---------------------------------------------------------------------------------------------
# Wrong keys and key files


def test_wrong_key_is_refused_as_not_a_recipient(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.hybrid_a, keys.classic])
    for wrong in (keys.outsider, keys.outsider_classic):
        with pytest.raises(NotARecipientError, match="wrong key"):
            open_segment(io.BytesIO(data), wrong)


def test_key_files_round_trip_and_the_private_key_file_is_0600(keys: Keys, tmp_path: Path) -> None:
    for key in (keys.hybrid_a, keys.classic):
        priv, pub = tmp_path / f"{key.key_id}.key", tmp_path / f"{key.key_id}.pub"
        write_private_key(key, priv)
        write_public_key(key.public_key(), pub)
        assert stat.S_IMODE(priv.stat().st_mode) == 0o600
        assert load_private_key(priv) == key
        assert load_public_key(pub) == key.public_key()
        text = pub.read_text()
        assert text.startswith("-----BEGIN ISOCAM SEGMENT PUBLIC KEY-----\n")
        assert f"Suite: {key.suite.value}\nKey-Id: {key.key_id}\n\n" in text
    assert list(tmp_path.glob(".*tmp")) == []


def test_hybrid_keys_use_the_standard_xwing_encodings(keys: Keys) -> None:
    key = keys.hybrid_a
    assert len(key.raw) == 32  # the X-Wing seed
    sk_m, sk_x = _xwing_keys(key.raw)
    assert key.public_key().raw == (
        sk_m.public_key().public_bytes_raw() + sk_x.public_key().public_bytes_raw()
    )
    assert len(keys.classic.public_key().raw) == 32


def test_loading_a_private_key_that_others_can_read_is_refused(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "view.key"
    write_private_key(keys.classic, path)
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)


def test_a_key_file_whose_key_id_does_not_match_is_refused(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "view.pub"
    text = keys.hybrid_a.public_key().to_pem()
    path.write_text(text.replace(keys.hybrid_a.key_id, keys.hybrid_b.key_id))
    with pytest.raises(KeyFileError, match="does not match"):
        load_public_key(path)


def test_a_public_key_file_is_refused_where_a_private_key_is_needed(
    keys: Keys, tmp_path: Path
) -> None:
    path = tmp_path / "view.key"
    write_public_key(keys.classic.public_key(), path)
    path.chmod(0o600)
    with pytest.raises(KeyFileError, match="public key"):
        load_private_key(path)
    with pytest.raises(KeyFileError, match="unknown or missing Suite"):
        RecipientPublicKey.from_pem(
            keys.classic.public_key().to_pem().replace("Suite: ", "Suite: X")
        )


def test_writing_a_key_file_never_overwrites_unless_asked(keys: Keys, tmp_path: Path) -> None:
    path = tmp_path / "view.key"
    write_private_key(keys.classic, path)
    with pytest.raises(FileExistsError):
        write_private_key(keys.hybrid_a, path)
    assert load_private_key(path) == keys.classic
    write_private_key(keys.hybrid_a, path, overwrite=True)
    assert load_private_key(path) == keys.hybrid_a


def test_private_key_repr_shows_no_key_material(keys: Keys) -> None:
    assert keys.classic.raw.hex() not in repr(keys.classic)
    assert "raw" not in repr(keys.classic)


# ---------------------------------------------------------------------------------------------
# Header tampering


def test_every_header_byte_edit_fails_with_a_header_error(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic, keys.hybrid_a])
    spec = _spec_parse(data)
    # Bytes whose edit cannot change the header's structure must read as tampering.
    payload = set(range(spec.site_at, spec.site_at + len("hcm-q7-cachly-001")))
    payload |= set(range(spec.header_end - 16, spec.header_end))
    for r in spec.recipients:
        payload |= set(range(r.key_id_at, r.key_id_at + 8))
        payload |= set(range(r.wrapped_at, r.wrapped_at + len(r.wrapped)))
    for offset in range(spec.header_end):
        for key in (keys.classic, keys.hybrid_a):
            with pytest.raises(HeaderError) as info:
                open_segment(io.BytesIO(_flip(data, offset)), key)
            if offset < 8:
                assert info.type is NotASealedSegmentError
            elif offset == 8:
                assert info.type is UnsupportedVersionError
            elif offset in payload:
                assert info.type is HeaderTamperedError, (offset, info.value)


def test_editing_the_identity_fields_is_detected_as_header_tampering(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.hybrid_a], _header(seq=123_456_789))
    original = read_header(io.BytesIO(data))
    spec = _spec_parse(data)
    assert data[spec.seq_at : spec.seq_at + 4] == _spec_uvarint(123_456_789)
    prefix_at = data.index(spec.nonce_prefix, spec.start_at)
    edits = {
        "seq": (spec.seq_at, "seq", 123_456_788),
        "start time": (spec.start_at, "start_us", original.start_us ^ 1),
        "site id": (spec.site_at, "site_id", "icm-q7-cachly-001"),
    }
    for offset, attr, value in edits.values():
        tampered = _flip(data, offset)
        assert getattr(read_header(io.BytesIO(tampered)), attr) == value  # a plausible header
        with pytest.raises(HeaderTamperedError, match="does not open"):
            open_segment(io.BytesIO(tampered), keys.hybrid_a)
    with pytest.raises(HeaderTamperedError, match="does not open"):
        open_segment(io.BytesIO(_flip(data, prefix_at)), keys.hybrid_a)


def test_a_file_cut_inside_the_header_is_malformed_and_garbage_is_not_a_segment(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    end = _spec_parse(data).header_end
    for cut in range(1, end, 7):
        with pytest.raises(MalformedHeaderError, match="ends inside"):
            read_header(io.BytesIO(data[:cut]))
    with pytest.raises(NotASealedSegmentError, match="empty"):
        read_header(io.BytesIO(b""))
    with pytest.raises(NotASealedSegmentError):
        read_header(io.BytesIO(b"\x00\x00\x00\x20ftypisom" + bytes(100)))


# ---------------------------------------------------------------------------------------------
# Chunk tampering


def test_flipping_any_ciphertext_byte_raises_chunk_corrupted_at_that_chunk(keys: Keys) -> None:
    data = _seal([b"init", b"fragment-1" * 3, b"f2"], [keys.classic])
    for index, frame in enumerate(_spec_parse(data).frames):
        for offset in range(frame.ct_at, frame.end):
            with pytest.raises(ChunkCorruptedError, match="altered") as info:
                _open_all(_flip(data, offset), keys.classic)
            assert info.value.index == index


def test_editing_a_chunk_position_or_final_flag_raises_chunk_corrupted(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    for frame in _spec_parse(data).frames:
        for mask in (0x01, 0x02, 0x04):  # final flag, counter bit 0, counter bit 1
            with pytest.raises(ChunkCorruptedError):
                _open_all(_flip(data, frame.position_at, mask), keys.classic)


def test_editing_a_chunk_reference_raises_foreign_chunk(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    for frame in _spec_parse(data).frames:
        for offset in range(frame.start, frame.start + 8):
            with pytest.raises(ForeignChunkError):
                _open_all(_flip(data, offset, 0x80), keys.classic)


def test_length_edits_never_yield_wrong_data_or_a_finished_segment(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    for frame in _spec_parse(data).frames:
        for offset in range(frame.ct_len_at, frame.position_at):
            for mask in (0x01, 0x10, 0x40, 0x80):
                try:
                    chunks, finished, _ = _open_all(_flip(data, offset, mask), keys.classic)
                except ChunkError:
                    continue
                # A longer length that runs past the end of the file reads like a torn tail.
                assert not finished
                assert chunks == CHUNKS[: len(chunks)]


def _splice(data: bytes, order: list[int]) -> bytes:
    spec = _spec_parse(data)
    return data[: spec.header_end] + b"".join(
        data[spec.frames[i].start : spec.frames[i].end] for i in order
    )


def test_reordered_chunks_raise_chunk_reordered(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])  # frames 0..3 data, 4 final
    for order in ([0, 2, 1, 3, 4], [1, 0, 2, 3, 4], [0, 2, 3, 1, 4], [3, 0, 1, 2, 4]):
        with pytest.raises(ChunkReorderedError, match="out of order"):
            _open_all(_splice(data, order), keys.classic)


def test_a_dropped_chunk_raises_chunk_dropped(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    for order, missing in (
        ([0, 2, 3, 4], "chunk 1 missing"),
        ([0, 1, 2, 4], "chunk 3 missing"),
        ([0, 3, 4], "chunks 1..2 missing"),
        ([1, 2, 3, 4], "chunk 0 missing"),
    ):
        with pytest.raises(ChunkDroppedError, match=missing):
            _open_all(_splice(data, order), keys.classic)


def test_a_duplicated_chunk_raises_chunk_duplicated(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    for order in ([0, 1, 1, 2, 3, 4], [0, 1, 2, 3, 0, 4]):
        with pytest.raises(ChunkDuplicatedError, match="appears again"):
            _open_all(_splice(data, order), keys.classic)


def test_a_chunk_swapped_in_from_another_segment_of_the_same_camera_raises_foreign_chunk(
    keys: Keys,
) -> None:
    mine = _seal(CHUNKS, [keys.classic], _header(seq=7))
    for other_header in (_header(seq=8), _header(seq=7)):  # next segment; identical fields
        other = _seal(CHUNKS, [keys.classic], other_header)
        a, b = _spec_parse(mine).frames[1], _spec_parse(other).frames[1]
        swapped = mine[: a.start] + other[b.start : b.end] + mine[a.end :]
        with pytest.raises(ForeignChunkError, match="another segment") as info:
            _open_all(swapped, keys.classic)
        assert info.value.index == 1


def test_data_after_the_final_chunk_raises_trailing_data(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    final = _spec_parse(data).frames[-1]
    for extra in (b"\x00", b"ftyp", data[final.start : final.end]):
        with pytest.raises(TrailingDataError, match="after the final chunk"):
            _open_all(data + extra, keys.classic)
        with pytest.raises(TrailingDataError):
            scan_segment(io.BytesIO(data + extra))


# ---------------------------------------------------------------------------------------------
# Crashes and truncation


def test_a_cut_at_every_offset_of_the_last_chunks_opens_complete_chunks_as_unfinished(
    keys: Keys,
) -> None:
    data = _seal(CHUNKS, [keys.hybrid_a])
    frames = _spec_parse(data).frames
    last_data = frames[-2]
    boundaries = [f.end for f in frames]
    for cut in range(last_data.start, len(data) + 1):
        chunks, finished, tail = _open_all(data[:cut], keys.hybrid_a)
        complete = max(b for b in [frames[0].start, *boundaries] if b <= cut)
        expected = sum(1 for b in boundaries[:-1] if b <= cut)
        assert chunks == CHUNKS[:expected], cut
        assert finished is (cut == len(data))
        assert tail == cut - complete
        scan = scan_segment(io.BytesIO(data[:cut]))
        assert (scan.chunk_count, scan.finished) == (expected, finished)
        assert (scan.complete_size, scan.tail_bytes) == (complete, cut - complete)


def test_an_unfinished_segment_is_an_error_only_when_a_finished_one_is_required(
    keys: Keys, tmp_path: Path
) -> None:
    data = _seal(CHUNKS, [keys.classic], close=False)
    chunks, finished, _ = _open_all(data, keys.classic)
    assert (chunks, finished) == (CHUNKS, False)
    with pytest.raises(UnfinishedSegmentError, match="no final chunk"):
        unseal_to(io.BytesIO(data), keys.classic, tmp_path / "out.mp4", require_finished=True)
    assert list(tmp_path.iterdir()) == []


def test_a_zero_filled_tail_left_by_a_power_cut_opens_as_unfinished(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    frames = _spec_parse(data).frames
    f1, f2 = frames[1], frames[2]  # chunk 1 is 400 bytes, chunk 2 is empty
    cases = {
        "zeros from a frame boundary": (f2, data[: f2.start] + bytes(4096)),
        "zeros from inside a frame header": (f2, data[: f2.start + 5] + bytes(4096)),
        "zeros from inside a ciphertext": (f1, data[: f1.ct_at + 100] + bytes(4096)),
    }
    for what, (torn, damaged) in cases.items():
        chunks, finished, tail = _open_all(damaged, keys.classic)
        assert chunks == CHUNKS[: frames.index(torn)], what
        assert not finished
        assert tail == len(damaged) - torn.start


def test_a_zero_run_that_does_not_cover_a_whole_gcm_tag_is_corruption(keys: Keys) -> None:
    data = _seal(CHUNKS, [keys.classic])
    f2 = _spec_parse(data).frames[2]
    with pytest.raises(ChunkCorruptedError):
        _open_all(data[: f2.ct_at + 1] + bytes(4096), keys.classic)


def test_an_exception_inside_the_sealer_block_leaves_the_segment_unfinished(keys: Keys) -> None:
    buf = io.BytesIO()
    with (
        pytest.raises(RuntimeError),
        SegmentSealer(buf, _header(), [keys.classic.public_key()]) as s,
    ):
        s.write_chunk(b"init")
        raise RuntimeError("camera went away")
    assert s.closed
    assert _open_all(buf.getvalue(), keys.classic)[:2] == ([b"init"], False)
    with pytest.raises(SealerClosedError):
        s.write_chunk(b"late")


class _DiskFullAfter(io.BytesIO):
    """A real in-memory file that fails like a full disk once it holds `limit` bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: bytes, /) -> int:  # type: ignore[override]
        room = self.limit - self.tell()
        if len(data) > room:
            super().write(bytes(data)[: max(room, 0)])
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_a_failed_write_stops_the_sealer_and_leaves_an_openable_unfinished_segment(
    keys: Keys,
) -> None:
    buf = _DiskFullAfter(limit=10**9)
    sealer = SegmentSealer(buf, _header(), [keys.classic.public_key()])
    sealer.write_chunk(b"init")
    buf.limit = buf.tell() + 30  # the next frame is cut short
    with pytest.raises(OSError, match="No space"):
        sealer.write_chunk(b"fragment" * 10)
    buf.limit = 10**9
    with pytest.raises(SealerClosedError, match="write to it failed"):
        sealer.write_chunk(b"more")
    chunks, finished, tail = _open_all(buf.getvalue(), keys.classic)
    assert (chunks, finished, tail) == ([b"init"], False, 30)


class _Trickle(io.RawIOBase):
    """A raw file that accepts at most 7 bytes per write call, as raw files and sockets may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes, /) -> int:  # type: ignore[override]
        self.data += bytes(b[:7])
        return min(len(b), 7)


def test_short_writes_of_a_raw_file_are_completed(keys: Keys) -> None:
    raw = _Trickle()
    with SegmentSealer(raw, _header(), [keys.classic.public_key()]) as sealer:
        for chunk in CHUNKS:
            sealer.write_chunk(chunk)
    assert sealer.sha256 == hashlib.sha256(raw.data).hexdigest()
    assert _open_all(bytes(raw.data), keys.classic)[:2] == (CHUNKS, True)


def test_a_chunk_above_the_limit_is_refused_and_one_at_the_limit_seals(keys: Keys) -> None:
    buf = io.BytesIO()
    sealer = SegmentSealer(buf, _header(), [keys.classic.public_key()])
    big = os.urandom(MAX_CHUNK_SIZE)
    sealer.write_chunk(big)
    with pytest.raises(ChunkTooLargeError, match="limit"):
        sealer.write_chunk(bytes(MAX_CHUNK_SIZE + 1))
    sealer.close()
    assert _open_all(buf.getvalue(), keys.classic)[:2] == ([big], True)


def test_bad_header_fields_and_recipient_lists_are_refused(keys: Keys) -> None:
    for args in [
        ("", "c", 0, 0.0),
        ("s", "x" * 256, 0, 0.0),
        ("s", "c", -1, 0.0),
        ("s", "c", 2**64, 0.0),
        ("s", "c", 0, -1.0),
        ("s", "c", 0, float("nan")),
    ]:
        with pytest.raises(InvalidHeaderError):
            SegmentHeader(*args)
    pub = keys.classic.public_key()
    for recipients in ([], [pub, pub], [pub] * 17):
        with pytest.raises(InvalidHeaderError):
            SegmentSealer(io.BytesIO(), _header(), recipients)


# ---------------------------------------------------------------------------------------------
# No plaintext, streaming, bounded memory


def test_plaintext_markers_never_appear_in_the_sealed_bytes(keys: Keys) -> None:
    markers = [b"ftyp", b"moof", b"mdat", b"\x00\x00\x00\x01"]
    chunk = b"".join(markers) * 100 + b"\x00\x00\x01\x65" * 50  # ~2 KiB, 8 per file
    for seq in (0, 1, 256):
        data = _seal([chunk] * 8 + [b""] * 3, [keys.hybrid_a, keys.classic], _header(seq=seq))
        for marker in markers:
            assert marker not in data, (seq, marker)


def _read_available(fd: int, want: int, deadline: float) -> bytes:
    got = b""
    while len(got) < want:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"only {len(got)} of {want} bytes arrived"
        got += os.read(fd, want - len(got))
    return got


def test_each_chunk_reaches_a_pipe_before_write_chunk_returns(keys: Keys) -> None:
    r, w = os.pipe()
    with open(w, "wb") as writer:  # a buffered, non-seekable file object
        sealer = SegmentSealer(writer, _header(), [keys.classic.public_key()])
        received = _read_available(r, sealer.bytes_written, time.monotonic() + 10)
        for chunk in CHUNKS:
            before = sealer.bytes_written
            sealer.write_chunk(chunk)
            received += _read_available(r, sealer.bytes_written - before, time.monotonic() + 10)
        sealer.close()
    with open(r, "rb") as reader:
        received += reader.read()
    assert _open_all(received, keys.classic)[:2] == (CHUNKS, True)


def test_open_segment_streams_from_a_non_seekable_pipe(keys: Keys) -> None:
    data = _seal(CHUNKS * 20, [keys.hybrid_a])
    r, w = os.pipe()

    def feed() -> None:
        with open(w, "wb") as writer:
            writer.write(data)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    with open(r, "rb", buffering=0) as raw, open_segment(raw, keys.hybrid_a) as seg:
        assert list(seg) == CHUNKS * 20
        assert seg.finished
    feeder.join(timeout=10)


def test_opening_keeps_memory_bounded_by_one_chunk(keys: Keys, tmp_path: Path) -> None:
    chunk_size, count = 4 * 1024 * 1024, 12
    path = tmp_path / "big.isg"
    with open(path, "wb") as f, SegmentSealer(f, _header(), [keys.classic.public_key()]) as s:
        for i in range(count):
            s.write_chunk(bytes([i]) * chunk_size)
    tracemalloc.start()
    try:
        with open_segment(path, keys.classic) as seg:
            n = sum(1 for chunk in seg if chunk == bytes([chunk[0]]) * chunk_size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == count
    assert peak < 4 * chunk_size, f"peak {peak} bytes for a {count * chunk_size}-byte segment"


# ---------------------------------------------------------------------------------------------
# Property tests


_chunk_lists = st.lists(st.binary(max_size=3000), max_size=12)
_fast = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fast
@given(chunks=_chunk_lists)
def test_random_chunk_lists_round_trip(keys: Keys, chunks: list[bytes]) -> None:
    data = _seal(chunks, [keys.classic])
    assert _open_all(data, keys.classic)[:2] == (chunks, True)


@_fast
@given(chunks=_chunk_lists, cut=st.floats(min_value=0, max_value=1))
def test_random_truncation_yields_a_prefix_and_never_finished(
    keys: Keys, chunks: list[bytes], cut: float
) -> None:
    data = _seal(chunks, [keys.classic])
    header_end = _spec_parse(data).header_end
    at = header_end + int(cut * (len(data) - header_end - 1))
    got, finished, _ = _open_all(data[:at], keys.classic)
    assert got == chunks[: len(got)]
    assert not finished


@_fast
@given(chunks=_chunk_lists, where=st.floats(min_value=0, max_value=1), mask=st.integers(1, 255))
def test_random_byte_edits_are_always_detected(
    keys: Keys, chunks: list[bytes], where: float, mask: int
) -> None:
    data = _seal(chunks, [keys.classic])
    tampered = _flip(data, int(where * (len(data) - 1)), mask)
    try:
        got, finished, _ = _open_all(tampered, keys.classic)
    except SealedSegmentError:
        return
    assert not finished  # only a length edit that runs past the end gets here
    assert got == chunks[: len(got)]


# ---------------------------------------------------------------------------------------------
# HPKE conformance: RFC 9180 vectors, X-Wing vectors, interoperability

# RFC 9180 Appendix A.1.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode.
A1 = {
    "info": "4f6465206f6e2061204772656369616e2055726e",
    "skRm": "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
    "pkRm": "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
    "skEm": "52c4a758a802cd8b936eceea314432798d5baf2d7e9235dc084ab1b9cfa2f736",
    "enc": "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
    "key": "4531685d41d65f03dc48f6b8302c05b0",
    "base_nonce": "56d890e5accaaf011cff4b7d",
    "aad": "436f756e742d30",  # "Count-0": not empty, so the public single-shot API cannot use it
    "pt": "4265617574792069732074727574682c20747275746820626561757479",
    "ct": "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a9"
    "6d8770ac83d07bea87e13c512a",
}


def test_reference_hpke_reproduces_the_rfc9180_a1_vector() -> None:
    v = {k: bytes.fromhex(x) for k, x in A1.items()}
    sk_r = x25519.X25519PrivateKey.from_private_bytes(v["skRm"])
    assert sk_r.public_key().public_bytes_raw() == v["pkRm"]
    enc, key, nonce, ct = _ref_x25519_seal(
        sk_r.public_key(),
        x25519.X25519PrivateKey.from_private_bytes(v["skEm"]),
        v["info"],
        v["aad"],
        v["pt"],
        aead_id=1,
    )
    assert (enc, key, nonce, ct) == (v["enc"], v["key"], v["base_nonce"], v["ct"])


def test_cryptography_hpke_decrypts_the_rfc9180_a1_vector() -> None:
    # The vector's AAD is "Count-0" and cryptography 50's public single-shot API takes no AAD,
    # so this goes through the module-private helper cryptography's own test suite uses.
    v = {k: bytes.fromhex(x) for k, x in A1.items()}
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)
    sk_r = x25519.X25519PrivateKey.from_private_bytes(v["skRm"])
    pt = rust_openssl.hpke._decrypt_with_aad(
        suite, v["enc"] + v["ct"], sk_r, info=v["info"], aad=v["aad"]
    )
    assert pt == v["pt"]


def test_x25519_suite_interoperates_with_the_reference_hpke_both_ways() -> None:
    suite = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    sk_r = x25519.X25519PrivateKey.generate()
    data_key, info = os.urandom(32), b"isocam test info"
    enc, _, _, ct = _ref_x25519_seal(
        sk_r.public_key(), x25519.X25519PrivateKey.generate(), info, b"", data_key, aead_id=2
    )
    assert suite.decrypt(enc + ct, sk_r, info=info) == data_key
    assert (
        _ref_x25519_open(sk_r, suite.encrypt(data_key, sk_r.public_key(), info=info), info)
        == data_key
    )


# draft-connolly-cfrg-xwing-kem-08 Appendix C, first vector (seed, start of pk, ct, ss).
XWING_SEED = "7f9c2ba4e88f827d616045507605853ed73b8093f6efbc88eb1a6eacfa66ef26"
XWING_PK_START = "e2236b35a8c24b39b10aa1323a96a919a2ced88400633a7b07131713fc14b2b5"
XWING_SS = "d2df0522128f09dd8e2c92b1e905c793d8f57a54c3da25861f10bf4ca613e384"
XWING_CT = (
    "b83aa828d4d62b9a83ceffe1d3d3bb1ef31264643c070c5798927e41fb07914a273f8f96"
    "e7826cd5375a283d7da885304c5de0516a0f0654243dc5b97f8bfeb831f68251219aabdd"
    "723bc6512041acbaef8af44265524942b902e68ffd23221cda70b1b55d776a92d1143ea3"
    "a0c475f63ee6890157c7116dae3f62bf72f60acd2bb8cc31ce2ba0de364f52b8ed38c79d"
    "719715963a5dd3842d8e8b43ab704e4759b5327bf027c63c8fa857c4908d5a8a7b88ac7f"
    "2be394d93c3706ddd4e698cc6ce370101f4d0213254238b4a2e8821b6e414a1cf20f6c12"
    "44b699046f5a01caa0a1a55516300b40d2048c77cc73afba79afeea9d2c0118bdf2adb88"
    "70dc328c5516cc45b1a2058141039e2c90a110a9e16b318dfb53bd49a126d6b73f215787"
    "517b8917cc01cabd107d06859854ee8b4f9861c226d3764c87339ab16c3667d2f49384e5"
    "5456dd40414b70a6af841585f4c90c68725d57704ee8ee7ce6e2f9be582dbee985e038ff"
    "c346ebfb4e22158b6c84374a9ab4a44e1f91de5aac5197f89bc5e5442f51f9a5937b102b"
    "a3beaebf6e1c58380a4a5fedce4a4e5026f88f528f59ffd2db41752b3a3d90efabe46389"
    "9b7d40870c530c8841e8712b733668ed033adbfafb2d49d37a44d4064e5863eb0af0a08d"
    "47b3cc888373bc05f7a33b841bc2587c57eb69554e8a3767b7506917b6b70498727f16ea"
    "c1a36ec8d8cfaf751549f2277db277e8a55a9a5106b23a0206b4721fa9b3048552c5bd5b"
    "594d6e247f38c18c591aea7f56249c72ce7b117afcc3a8621582f9cf71787e183dee0936"
    "7976e98409ad9217a497df888042384d7707a6b78f5f7fb8409e3b535175373461b77600"
    "2d799cbad62860be70573ecbe13b246e0da7e93a52168e0fb6a9756b895ef7f0147a0dc8"
    "1bfa644b088a9228160c0f9acf1379a2941cd28c06ebc80e44e17aa2f8177010afd78a97"
    "ce0868d1629ebb294c5151812c583daeb88685220f4da9118112e07041fcc24d5564a99f"
    "dbde28869fe0722387d7a9a4d16e1cc8555917e09944aa5ebaaaec2cf62693afad42a3f5"
    "18fce67d273cc6c9fb5472b380e8573ec7de06a3ba2fd5f931d725b493026cb0acbd3fe6"
    "2d00e4c790d965d7a03a3c0b4222ba8c2a9a16e2ac658f572ae0e746eafc4feba023576f"
    "08942278a041fb82a70a595d5bacbf297ce2029898a71e5c3b0d1c6228b485b1ade509b3"
    "5fbca7eca97b2132e7cb6bc465375146b7dceac969308ac0c2ac89e7863eb8943015b243"
    "14cafb9c7c0e85fe543d56658c213632599efabfc1ec49dd8c88547bb2cc40c9d38cbd30"
    "99b4547840560531d0188cd1e9c23a0ebee0a03d5577d66b1d2bcb4baaf21cc7fef1e038"
    "06ca96299df0dfbc56e1b2b43e4fc20c37f834c4af62127e7dae86c3c25a2f696ac8b589"
    "dec71d595bfbe94b5ed4bc07d800b330796fda89edb77be0294136139354eb8cd3759157"
    "8f9c600dd9be8ec6219fdd507adf3397ed4d68707b8d13b24ce4cd8fb22851bfe9d63240"
    "7f31ed6f7cb1600de56f17576740ce2a32fc5145030145cfb97e63e0e41d354274a079d3"
    "e6fb2e15"
)


def test_xwing_keys_and_reference_decapsulation_match_the_draft_vector() -> None:
    seed = bytes.fromhex(XWING_SEED)
    key = RecipientPrivateKey(SealSuite.MLKEM768_X25519, seed)
    assert key.public_key().raw.hex().startswith(XWING_PK_START)
    assert _ref_xwing_decaps(seed, bytes.fromhex(XWING_CT)).hex() == XWING_SS


def test_hybrid_suite_interoperates_with_the_reference_xwing_hpke_both_ways(keys: Keys) -> None:
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    m, x = _xwing_keys(keys.hybrid_a.raw)
    sk = hpke.MLKEM768X25519PrivateKey(m, x)
    data_key, info = os.urandom(32), b"isocam test info"
    blob = _ref_xwing_seal(keys.hybrid_a.public_key().raw, info, data_key)
    assert suite.decrypt(blob, sk, info=info) == data_key
    pk = sk.public_key()
    assert (
        _ref_xwing_open(keys.hybrid_a.raw, suite.encrypt(data_key, pk, info=info), info) == data_key
    )


def test_a_segment_opens_with_a_reader_written_from_the_spec(keys: Keys) -> None:
    """docs/sealed-segment.md is enough to read a segment: HPKE info, STREAM nonces, AAD."""
    data = _seal(CHUNKS, [keys.classic, keys.hybrid_a])
    spec = _spec_parse(data)
    info = b"isocam sealed-segment v1 data key\x00" + hashlib.sha256(spec.identity).digest()
    sk = x25519.X25519PrivateKey.from_private_bytes(keys.classic.raw)
    by_kem = {r.suite_ids[0]: r for r in spec.recipients}
    assert {r.suite_ids for r in spec.recipients} == {(0x20, 1, 2), (0x647A, 1, 2)}
    data_key = _ref_x25519_open(sk, by_kem[0x20].wrapped, info)
    assert _ref_xwing_open(keys.hybrid_a.raw, by_kem[0x647A].wrapped, info) == data_key
    tag_nonce = spec.nonce_prefix + b"\xff\xff\xff\xff\x02"
    AESGCM(data_key).decrypt(
        tag_nonce, data[spec.header_end - 16 : spec.header_end], data[: spec.header_end - 16]
    )
    plain = []
    for i, frame in enumerate(spec.frames):
        assert (frame.counter, frame.last) == (i, i == len(CHUNKS))
        nonce = spec.nonce_prefix + i.to_bytes(4, "big") + bytes([frame.last])
        plain.append(
            AESGCM(data_key).decrypt(nonce, data[frame.ct_at : frame.end], spec.header_digest)
        )
    assert plain == [*CHUNKS, b""]
