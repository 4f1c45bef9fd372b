"""The settings table: well-formed, self-consistent, and the docs generated from it are current."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.settings import (
    LEGAL_MINIMUM_RETENTION_DAYS,
    REQUIRED,
    SECTIONS,
    SETTINGS,
    SETTINGS_BY_NAME,
    host_port,
    render_settings_markdown,
    split_host_port,
    url,
)

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "configuration.md"


def test_setting_names_are_unique_dotted_and_lowercase() -> None:
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z0-9_]+(\[\])?(\.[a-z0-9_]+(\[\])?)+", name), name


def test_every_setting_has_help_text_and_a_documented_section() -> None:
    for setting in SETTINGS:
        assert setting.help.strip().endswith("."), setting.name
        assert setting.section in SECTIONS, setting.name
    for section in SECTIONS:
        assert any(s.section == section for s in SETTINGS), f"empty section {section}"


def test_every_list_item_field_belongs_to_a_declared_table_list() -> None:
    for setting in SETTINGS:
        if setting.is_list_item:
            owner = SETTINGS_BY_NAME[setting.name.split("[]")[0]]
            assert owner.type == "table list"


def test_literal_defaults_satisfy_their_own_constraints() -> None:
    for setting in SETTINGS:
        if setting.default is REQUIRED or setting.default is None:
            continue
        for constraint in setting.constraints:
            assert constraint.problem(setting.default) is None, setting.name


def test_brief_defaults_are_the_documented_numbers() -> None:
    expected = {
        "storage.retention_days": LEGAL_MINIMUM_RETENTION_DAYS,
        "recording.segment_seconds": 60,
        "recording.fragment_seconds": 1.0,
        "cameras.max_clock_offset_seconds": 5.0,
        "metrics.listen": "127.0.0.1:9108",
        "storage.allow_below_legal_minimum": False,
        "discovery.enabled": True,
    }
    for name, value in expected.items():
        assert SETTINGS_BY_NAME[name].default == value, name
    assert LEGAL_MINIMUM_RETENTION_DAYS == 30


def test_required_settings_are_the_ones_a_box_cannot_guess() -> None:
    required = {s.name for s in SETTINGS if s.required and not s.is_list_item}
    assert required == {
        "site.id",
        "site.province",
        "site.district",
        "site.kind",
        "site.authority",
        "site.operator",
        "mqtt.url",
        "keys.recipient_files",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("192.168.1.64", ("192.168.1.64", 80)),
        ("192.168.1.64:8000", ("192.168.1.64", 8000)),
        ("cam-1.lan", ("cam-1.lan", 80)),
        ("[fe80::1]:8080", ("fe80::1", 8080)),
        ("fe80::1", ("fe80::1", 80)),
        ("192.168.1.64:0", None),
        ("192.168.1.64:65536", None),
        ("192.168.1.64:", None),
        ("192.168.1.64:http", None),
        ("http://192.168.1.64", None),
        ("host/path", None),
        ("", None),
        ("999.1.1.1", None),
        ("bad_host", None),
        ("[fe80::1", None),
    ],
)
def test_split_host_port_accepts_only_host_and_optional_port(
    text: str, expected: tuple[str, int] | None
) -> None:
    assert split_host_port(text, 80) == expected


def test_host_port_without_default_port_needs_a_port_and_may_allow_off() -> None:
    listen = host_port(None, allow_empty=True)
    assert listen.problem("127.0.0.1:9108") is None
    assert listen.problem("[::1]:9108") is None
    assert listen.problem("") is None
    assert listen.problem("127.0.0.1") is not None
    assert host_port(None).problem("") is not None


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("rtsp://10.0.0.5:554/Streaming/Channels/101", True),
        ("rtsps://cam.lan/main", True),
        ("http://10.0.0.5/main", False),
        ("rtsp://admin:secret@10.0.0.5/main", False),
        ("rtsp:///main", False),
        ("rtsp://10.0.0.5:99999/main", False),
        ("not a url", False),
    ],
)
def test_rtsp_url_constraint(value: str, ok: bool) -> None:
    constraint = url(("rtsp", "rtsps"), path_allowed=True)
    assert (constraint.problem(value) is None) is ok


def test_url_constraint_never_echoes_embedded_credentials() -> None:
    problem = url(("mqtts",), path_allowed=False).problem("mqtts://site:hunter2@broker")
    assert problem is not None
    assert "hunter2" not in problem


def test_rendered_docs_list_every_setting_with_its_default() -> None:
    text = render_settings_markdown()
    for setting in SETTINGS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{setting.name}` |"))
        if setting.required:
            assert "**required**" in row
    assert "`[site]`" in text and "LoadCredential" in text


def test_committed_docs_match_the_settings_table() -> None:
    # a setting added to the table but not to docs/configuration.md fails here
    assert DOCS.read_text(encoding="utf-8") == render_settings_markdown(), (
        "docs/configuration.md is out of date: "
        ".venv/bin/python -m edge_agent.settings > docs/configuration.md"
    )


def test_module_entry_point_prints_the_docs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.settings"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == render_settings_markdown()
