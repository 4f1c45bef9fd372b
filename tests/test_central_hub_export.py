"""Footage export end to end over real HTTP with a real edge behind the tunnel: a request with
its legal basis, refusal of self-approval, approval by another person, the bundle streamed to
the requester, and offline verification — where a one-byte change anywhere fails."""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import av
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from central_hub.accounts import cli_actor
from central_hub.export import (
    COMMENT_LEN,
    EXPORTS,
    ExportState,
    generate_signing_key,
    load_signing_key,
    verify_bundle,
)
from central_hub.export_cli import export
from central_hub.policy import Principal, Scope
from sitelink.signing import public_key_pem
from tests.test_central_hub_viewing import FAST_SEGMENTS, SITE, Rig, poll, start_rig

ICT = timezone(timedelta(hours=7))


def _local(ts: float) -> str:
    return datetime.fromtimestamp(ts, ICT).strftime("%Y-%m-%dT%H:%M:%S")


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = await start_rig(tmp_path)
    yield r
    await r.stop()


def _cli(*args: str) -> Any:
    return CliRunner().invoke(export, list(args), catch_exceptions=False)


async def test_request_approve_by_another_download_and_verify_offline(
    simulator_factory: Callable[..., Any], rig: Rig, tmp_path: Path
) -> None:
    sim = simulator_factory(cameras=1)
    cam = sim.cameras[0]["id"]
    await rig.record(sim.cameras, FAST_SEGMENTS)
    store = rig.box.segment_store
    await poll(lambda: len([s for s in store.segments(cam) if s.finished]) >= 2, 40, "segments")
    segments = [s for s in store.segments(cam) if s.finished][:2]
    # Whole seconds (the form's resolution) that cover both segments.
    start, end = float(int(segments[0].start) - 1), float(int(segments[1].end) + 1)

    requester, _ = rig.user("yeucau@hanoi.gov.vn", "export_requester", "province=Hà Nội")
    # The requester also holds the approver role: it still may not approve its own request.
    rig.store.add_grant(requester, "export_approver", Scope.parse("province=Hà Nội"), cli_actor())
    approver, _ = rig.user("pheduyet@hanoi.gov.vn", "export_approver", "province=Hà Nội")
    outsider, _ = rig.user("pheduyet@caobang.gov.vn", "export_approver", "province=Cao Bằng")
    req, appr, out = rig.client(requester), rig.client(approver), rig.client(outsider)
    try:
        # 1. The request, with its legal basis (a missing basis is refused).
        form = {"site": SITE, "camera": cam, "start": _local(start), "end": _local(end),
                "document_number": "123/QĐ-CAHN", "authority": "Công an TP Hà Nội",
                "note": "Điều tra vụ việc ngày 12"}  # fmt: skip
        bad = await req.post("/export", {**form, "document_number": ""})
        assert bad.status == 400
        resp = await req.post("/export", form)
        assert resp.status == 303, await resp.text()
        detail = resp.headers["Location"]
        export_id = int(re.fullmatch(r"/export/(\d+)", detail).group(1))  # type: ignore[union-attr]

        # 2. Self-approval is refused; an approver of another province is refused too.
        own = await req.post(f"{detail}/approve", {"note": "tự duyệt"})
        assert own.status == 403
        assert (await out.post(f"{detail}/approve", {})).status == 403
        assert (await out.get(detail)).status == 403
        # Nothing to download before approval.
        assert (await req.get(f"{detail}/bundle")).status == 409

        # 3. Another approver of the site approves.
        page = await appr.get(detail)
        assert page.status == 200 and 'id="approve"' in await page.text()
        ok = await appr.post(f"{detail}/approve", {"note": "Đồng ý theo văn bản 123"})
        assert ok.status == 303
        again = await appr.post(f"{detail}/reject", {})
        assert again.status == 409, "decided once"
        found = rig.app[EXPORTS].store.get(export_id)
        assert found is not None and found.state is ExportState.APPROVED

        # 4. Only the requester downloads; the bundle streams from the edge's sealed segments.
        assert (await appr.get(f"{detail}/bundle")).status == 403
        bundle_resp = await req.get(f"{detail}/bundle")
        assert bundle_resp.status == 200, await bundle_resp.text()
        assert bundle_resp.headers["Content-Type"] == "application/zip"
        bundle = await bundle_resp.read()
    finally:
        for c in (req, appr, out):
            await c.close()

    path = tmp_path / "bundle.zip"
    path.write_bytes(bundle)
    pub = tmp_path / "hub-signing.pub"
    pub.write_text(public_key_pem(rig.signing_key))

    # 5. It verifies offline, with the hub's public key (and with the key inside it).
    report = verify_bundle(path, rig.signing_key.public_key())
    assert report.ok, report.problems
    result = _cli("verify", str(path), "--key", str(pub))
    assert result.exit_code == 0, result.output
    assert result.output.startswith("OK:") and "123/QĐ-CAHN" in result.output
    assert _cli("verify", str(path)).exit_code == 0

    # The manifest says what it must.
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        manifest = json.loads(z.read("manifest.json"))
        mp4 = z.read("footage-01.mp4")
    assert names == ["footage-01.mp4", "manifest.json", "manifest.sig", "README.txt"]
    assert manifest["site"]["site_id"] == SITE and manifest["camera"] == cam
    assert (manifest["range"]["start"], manifest["range"]["end"]) == (start, end)
    assert [(s["seq"], s["sha256"], s["chain_position"]) for s in manifest["segments"]] == [
        (s.seq, s.file_sha256, s.seq) for s in segments
    ]
    # each segment's link in the camera's hash chain, as the edge's index holds it
    assert [(s["row_hash"], s["prev_hash"]) for s in manifest["segments"]] == [
        (s.row_hash, s.prev_hash) for s in segments
    ]
    assert manifest["legal_basis"]["document_number"] == "123/QĐ-CAHN"
    assert manifest["requested"]["email"] == "yeucau@hanoi.gov.vn"
    assert manifest["approved"]["email"] == "pheduyet@hanoi.gov.vn"
    assert manifest["approved"]["at"] >= manifest["requested"]["at"]
    assert manifest["files"][0]["sha256"] == hashlib.sha256(mp4).hexdigest()
    # The footage is the segments' video, remuxed (not transcoded): every frame, in order.
    with av.open(io.BytesIO(mp4)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.time for f in container.decode(video=0)]
    assert len(frames) >= 25 * 6 and frames == sorted(frames)
    covered = segments[1].end - segments[0].start
    assert abs((frames[-1] - frames[0]) - covered) < 1.5

    # 6. Any one changed byte fails: footage, manifest, ZIP headers, the signature itself.
    data = path.read_bytes()
    positions = {
        "footage": data.index(mp4[1000:1032]) + 7,
        "manifest": data.index(b'"camera"') + 3,
        "local header": 10,  # the first member's modification time
        "central directory": data.rindex(b"PK\x01\x02") + 12,
        "signature": len(data) - 5,
    }
    for where, pos in positions.items():
        changed = bytearray(data)
        changed[pos] ^= 0x01
        bad_path = tmp_path / f"changed-{where.replace(' ', '-')}.zip"
        bad_path.write_bytes(bytes(changed))
        assert not verify_bundle(bad_path, rig.signing_key.public_key()).ok, where
        result = _cli("verify", str(bad_path), "--key", str(pub))
        assert result.exit_code == 1, where
        assert "FAILED" in result.output, where
    # Another key does not verify it; a truncated file is no bundle.
    assert not verify_bundle(path, Ed25519PrivateKey.generate().public_key()).ok
    (tmp_path / "cut.zip").write_bytes(data[: -COMMENT_LEN - 1])
    assert not verify_bundle(tmp_path / "cut.zip").ok

    # 7. Every step is in the audit log, with the legal basis and the bundle's hash.
    rows = rig.rows("export_request", "export_requested", "export_decision_refused",
                    "export_approve", "export_approved", "export_bundle")  # fmt: skip
    steps = [(r["action"], r["user_id"], r["allowed"]) for r in rows]
    assert ("export_request", requester, True) in steps
    assert ("export_requested", requester, None) in steps
    assert ("export_decision_refused", requester, False) in steps
    assert ("export_approve", outsider, False) in steps
    assert ("export_approved", approver, None) in steps
    assert ("export_request", approver, False) in steps, "the approver's download attempt"
    requested = next(r for r in rows if r["action"] == "export_requested")
    assert "123/QĐ-CAHN" in requested["reason"] and requested["camera_id"] == cam
    refused = next(r for r in rows if r["action"] == "export_decision_refused")
    assert refused["reason"] == "same_person"
    built = next(r for r in rows if r["action"] == "export_bundle")
    assert json.loads(built["detail"])["sha256"] == hashlib.sha256(bundle).hexdigest()
    assert rig.audit.verify().ok


def test_signing_key_files_and_keygen_command(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "hub-signing.key")
    assert (tmp_path / "hub-signing.key").stat().st_mode & 0o777 == 0o600
    assert load_signing_key(tmp_path / "hub-signing.key").public_key() == key.public_key()
    assert (tmp_path / "hub-signing.key.pub").read_text() == public_key_pem(key)
    with pytest.raises(FileExistsError):
        generate_signing_key(tmp_path / "hub-signing.key")
    result = _cli("keygen", str(tmp_path / "other.key"))
    assert result.exit_code == 0 and "key id" in result.output
    assert _cli("keygen", str(tmp_path / "other.key")).exit_code == 1
    with pytest.raises(ValueError, match="not a readable PEM"):
        load_signing_key(tmp_path / "hub-signing.key.pub")


def test_the_export_workflow_store_on_sqlite_and_postgresql(hub_db_url: str) -> None:
    """The requests table and its rules on both backends (no video needed)."""
    from central_hub.accounts import AccountStore, AuthConfig
    from central_hub.audit import AuditLog
    from central_hub.db import Database
    from central_hub.export import ExportConfig, ExportError, ExportStore
    from central_hub.sites import get_site
    from tests.test_central_hub_viewing import add_sites

    db = Database.connect(hub_db_url)
    try:
        db.migrate()
        add_sites(db, Ed25519PrivateKey.generate())
        audit = AuditLog(db)
        accounts = AccountStore(db, audit, AuthConfig(argon2_memory_kib=19456, argon2_time_cost=1))
        password = "mật-khẩu-kiểm-thử-2025"
        ids = {
            name: accounts.create_user(
                f"{name}@hanoi.gov.vn", name, password, role, Scope.parse(scope)
            )
            for name, role, scope in (
                ("req", "export_requester", "province=Hà Nội"),
                ("appr", "export_approver", "province=Hà Nội"),
                ("cb", "export_approver", "province=Cao Bằng"),
            )
        }
        who: dict[str, Principal] = {}
        for name, uid in ids.items():
            principal = accounts.load_principal(uid)
            assert principal is not None
            who[name] = principal
        store = ExportStore(db, audit, ExportConfig(max_span_seconds=3600))
        with db.engine.connect() as conn:
            site = get_site(conn, SITE)
        assert site is not None
        kw: dict[str, Any] = {
            "site": site, "camera": "cam-01", "document_number": "9/QĐ",
            "authority": "Viện kiểm sát", "note": "", "source": "test",
        }  # fmt: skip
        with pytest.raises(ExportError, match="longer"):
            store.create(start=1.8e9, end=1.8e9 + 7200, requester=who["req"], **kw)
        export_id = store.create(start=1.8e9, end=1.8e9 + 600, requester=who["req"], **kw)
        with pytest.raises(ExportError) as same:
            store.decide(export_id, who["req"], True, "", "test")
        assert same.value.code == "same_person"
        decided = store.decide(export_id, who["appr"], True, "đồng ý", "test")
        assert decided.state is ExportState.APPROVED and decided.decided_by is not None
        assert decided.decided_by.email == "appr@hanoi.gov.vn"
        with pytest.raises(ExportError) as twice:
            store.decide(export_id, who["appr"], False, "", "test")
        assert twice.value.code == "bad_state"
        # Lists are filtered in SQL by scope: Cao Bằng's approver sees nothing of Hà Nội.
        now = 1.8e9
        assert [r.export_id for r in store.visible_to(who["appr"], now)] == [export_id]
        assert store.visible_to(who["cb"], now) == []
        assert audit.verify().ok
    finally:
        db.close()
