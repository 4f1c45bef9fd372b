"""docs/protocol.md stays complete: every topic, flag, reason, message and field is in it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sitelink import messages, protocol_doc
from sitelink.topics import POLICIES, Kind

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _section(doc: str, model_name: str) -> str:
    """The text under a model's heading, up to the next heading."""
    match = re.search(rf"^#### {model_name}\b.*?(?=^#{{2,4}} |\Z)", doc, re.M | re.S)
    assert match, f"docs/protocol.md has no section for {model_name}"
    return match.group(0)


def test_generated_blocks_match_the_code(doc: str) -> None:
    assert protocol_doc.update(doc) == doc, (
        "docs/protocol.md is stale: run .venv/bin/python -m sitelink.protocol_doc docs/protocol.md"
    )


@pytest.mark.parametrize("kind", list(Kind))
def test_every_field_of_every_message_has_a_row_under_its_model(doc: str, kind: Kind) -> None:
    models = protocol_doc.models_of(kind)
    assert set(protocol_doc.MODELS_BY_KIND[kind]) <= set(models)
    for model in models:
        section = _section(doc, model.__name__)
        for name in model.model_fields:
            assert re.search(rf"^\| `{name}` \|", section, re.M), (
                f"field {model.__name__}.{name} is missing from docs/protocol.md"
            )


def test_every_topic_is_listed_with_its_qos_and_retain_flag(doc: str) -> None:
    for kind, policy in POLICIES.items():
        row = re.search(
            rf"^\| `{re.escape(kind.value)}` \| `isocam/v1/\{{site_id\}}/{re.escape(kind.value)}` "
            r"\| (\w+) \| (\d) \| (yes|no) \|",
            doc,
            re.M,
        )
        assert row, f"topic {kind.value} is missing from docs/protocol.md"
        assert row.groups() == (policy.publisher, str(policy.qos), "yes" if policy.retain else "no")


def test_every_event_kind_command_and_reject_reason_is_named(doc: str) -> None:
    for name in [*messages.EVENT_KINDS, *messages.COMMANDS, *messages.REASONS]:
        assert f"`{name}`" in doc, name
    for label in messages.TYPE_GLOSSARY:
        assert f"| {label} |" in doc, label


def test_the_rules_the_hub_relies_on_are_written_down(doc: str) -> None:
    for phrase in (
        "bdseq",
        "de-duplicates on (site, seq)",
        "persisted across restarts",
        "missing data",
        "65,536 bytes",
        "before* JSON",
        "## Versioning",
        "UNIX seconds, UTC",
    ):
        assert phrase in doc, phrase


def test_the_generator_cli_checks_and_rewrites_a_stale_document(tmp_path: Path, doc: str) -> None:
    stale = tmp_path / "protocol.md"
    stale.write_text(doc.replace("| `seq` |", "| `sequence` |"), encoding="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "sitelink.protocol_doc", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )

    assert run("--check", str(DOC)).returncode == 0
    checked = run("--check", str(stale))
    assert checked.returncode == 1 and "stale" in checked.stderr
    assert run(str(stale)).returncode == 0
    assert stale.read_text(encoding="utf-8") == doc


def test_a_document_without_the_generated_blocks_is_refused(tmp_path: Path) -> None:
    bare = tmp_path / "protocol.md"
    bare.write_text("# protocol\n<!-- generated:topics -->\n<!-- /generated:topics -->\n")
    with pytest.raises(ValueError, match="lacks generated block"):
        protocol_doc.update(bare.read_text())
    assert protocol_doc.main([str(bare)]) == 2
