"""Loading and validating the edge configuration: every rule, all errors in one message."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from edge_agent.config import (
    ConfigError,
    Credentials,
    EdgeConfig,
    Secret,
    check_config,
    config_warnings,
    load_config,
)
from edge_agent.settings import REQUIRED, SETTINGS

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "edge.example.toml"

SITE = """\
[site]
id = "hcm-q7-01"
province = "Hồ Chí Minh"
district = "Quận 7"
kind = "facility"
authority = "health"
operator = "vnpt"
"""
MQTT = """\
[mqtt]
url = "mqtts://broker.test:8883"
cert_file = "tls/site.crt"
key_file = "tls/site.key"
"""
KEYS = """\
[keys]
recipient_files = ["keys/hub.pub.pem"]
"""
MINIMAL = SITE + MQTT + KEYS


def _public_pem() -> bytes:
    return (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    """A directory with the files a minimal config refers to (relative paths)."""
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "site.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "tls" / "site.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "hub.pub.pem").write_bytes(_public_pem())
    (tmp_path / "keys" / "escrow.pub.pem").write_bytes(_public_pem())
    return tmp_path


def write(site_dir: Path, text: str, name: str = "edge.toml") -> Path:
    path = site_dir / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    path.chmod(0o640)
    return path


def load(site_dir: Path, text: str) -> EdgeConfig:
    return load_config(write(site_dir, text))


def errors_of(site_dir: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(site_dir, text)
    return caught.value.errors


def only_error(site_dir: Path, text: str) -> str:
    errors = errors_of(site_dir, text)
    assert len(errors) == 1, errors
    return errors[0]


def replace_line(text: str, key: str, new: str) -> str:
    """Replace the line `key = ...` of `text` with `new` (one line, or "" to drop it)."""
    out, hits = re.subn(rf"(?m)^{re.escape(key)} = .*$", new, text)
    assert hits == 1, key
    return out


# --- the happy path --------------------------------------------------------------------------


def test_minimal_config_loads_with_the_table_defaults(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL)
    assert cfg.site.id == "hcm-q7-01"
    assert cfg.site.province == "Hồ Chí Minh"
    for setting in SETTINGS:
        if setting.is_list_item or setting.default in (REQUIRED, None):
            continue
        section, key = setting.name.split(".", 1)
        value = getattr(getattr(cfg, section), key)
        assert value == setting.default, setting.name
    assert cfg.storage.retention_days == 30
    assert cfg.recording.segment_seconds == 60
    assert cfg.mqtt.client_id == "edge-hcm-q7-01"
    assert cfg.keys.device_key_file == Path("/var/lib/isocam/device-key.pem")
    assert cfg.credentials.password is None
    assert cfg.cameras.onvif == () and cfg.cameras.rtsp == ()
    assert cfg.mqtt.tls and cfg.mqtt.host == "broker.test" and cfg.mqtt.port == 8883
    assert check_config(site_dir / "edge.toml") == []


def test_every_setting_reaches_the_typed_config(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL)
    item_types = {"cameras.onvif": "OnvifCamera", "cameras.rtsp": "RtspCamera"}
    import edge_agent.config as config_module

    for setting in SETTINGS:
        if setting.is_list_item:
            owner, key = setting.name.split("[].")
            cls = getattr(config_module, item_types[owner])
            assert key in {f.name for f in dataclasses.fields(cls)}, setting.name
        else:
            section, key = setting.name.split(".", 1)
            assert hasattr(getattr(cfg, section), key), setting.name


def test_relative_paths_are_taken_from_the_config_files_directory(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL + '[storage]\ndata_dir = "data"\n')
    assert cfg.mqtt.cert_file == site_dir / "tls" / "site.crt"
    assert cfg.keys.recipient_files == (site_dir / "keys" / "hub.pub.pem",)
    assert cfg.storage.data_dir == site_dir / "data"
    assert cfg.keys.device_key_file == site_dir / "data" / "device-key.pem"


def test_config_is_frozen(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.site.id = "other"  # type: ignore[misc]


def test_full_config_with_cameras_and_overrides(site_dir: Path) -> None:
    cfg = load(
        site_dir,
        MINIMAL
        + """
        [credentials]
        user = "operator"
        password = "default-pw"

        [[cameras.onvif]]
        address = "192.168.10.64"
        name = "Cổng chính"
        password = "gate-pw"

        [[cameras.onvif]]
        address = "192.168.10.65:8000"

        [[cameras.rtsp]]
        id = "cam-kho"
        name = "Kho"
        rtsp_main = "rtsp://192.168.10.80:554/101"
        user = "viewer"
        """,
    )
    gate, corridor = cfg.cameras.onvif
    assert gate.address == "192.168.10.64:80" and gate.host == "192.168.10.64"
    assert gate.user == "operator" and gate.password == Secret("gate-pw")
    assert corridor.port == 8000 and corridor.password == Secret("default-pw")
    (kho,) = cfg.cameras.rtsp
    assert kho.rtsp_sub is None
    assert kho.credentials == Credentials("viewer", Secret("default-pw"))
    assert cfg.credentials_for("192.168.10.64").password == Secret("gate-pw")
    assert cfg.credentials_for("192.168.10.64:80").password == Secret("gate-pw")
    assert cfg.credentials_for("192.168.10.64", 80).password == Secret("gate-pw")
    assert cfg.credentials_for("192.168.10.65", 80).password == Secret("default-pw")
    assert cfg.credentials_for("10.9.9.9").user == "operator"
    assert cfg.pinned_onvif_addresses() == [("192.168.10.64", 80), ("192.168.10.65", 8000)]


# --- all errors at once ----------------------------------------------------------------------


def test_every_problem_is_reported_in_one_error_naming_each_key(site_dir: Path) -> None:
    text = (
        MINIMAL.replace('id = "hcm-q7-01"', 'id = "HCM 01"')
        .replace('kind = "facility"', 'kind = "camp"')
        .replace("mqtts://broker.test:8883", "http://broker.test")
        + "[storage]\nretention_days = 7\n"
        + "[recording]\nsegment_seconds = '60'\n"
        + "[metrics]\nlisten = 9108\n"
    )
    with pytest.raises(ConfigError) as caught:
        load(site_dir, text)
    error = caught.value
    keys = [e.split(":", 1)[0] for e in error.errors]
    # file order first, then the rules that involve several settings
    assert keys == [
        "site.id",
        "site.kind",
        "mqtt.url",
        "recording.segment_seconds",
        "metrics.listen",
        "storage.retention_days",
    ]
    message = str(error)
    assert message.startswith(f"{site_dir / 'edge.toml'}: 6 problems:")
    for key in keys:
        assert f"  - {key}:" in message
    assert "expected one of facility, checkpoint, got 'camp'" in message
    assert "expected an integer" in message


def test_empty_file_lists_every_required_setting(site_dir: Path) -> None:
    errors = errors_of(site_dir, "")
    required = [s.name for s in SETTINGS if s.required and not s.is_list_item]
    assert [e.split(":", 1)[0] for e in errors] == required
    assert all("missing; expected" in e for e in errors)


def test_a_single_problem_reads_as_one_line(site_dir: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(site_dir, MINIMAL.replace('operator = "vnpt"', 'operator = "fpt"'))
    assert str(caught.value) == (
        f"{site_dir / 'edge.toml'}: site.operator: expected one of vnpt, viettel, got 'fpt'"
    )


# --- file-level problems --------------------------------------------------------------------


def test_missing_file_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"config file not found \(give another one with --config\)"
    ):
        load_config(tmp_path / "nope.toml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_unreadable_file_says_permission_denied(site_dir: Path) -> None:
    path = write(site_dir, MINIMAL)
    path.chmod(0)
    # root reads anything: run the loader without the capabilities that bypass file modes
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-dac_override,-dac_read_search",
            sys.executable,
            "-c",
            "import sys\nfrom edge_agent.config import load_config, ConfigError\n"
            "try:\n    load_config(sys.argv[1])\nexcept ConfigError as e:\n    print(e)\n",
            str(path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == f"{path}: cannot read the config file: permission denied"


def test_toml_syntax_error_names_line_and_column(site_dir: Path) -> None:
    text = MINIMAL.replace('district = "Quận 7"', 'district = "Quận 7')
    error = only_error(site_dir, text)
    assert error.startswith("line 4, column ")
    assert "TOML syntax error" in error
    assert 'in: district = "Quận 7' in error


def test_toml_syntax_error_for_a_missing_equals_sign(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL.replace('kind = "facility"', 'kind "facility"'))
    assert error.startswith("line 5, column ")


def test_non_utf8_file_is_refused_with_its_line(site_dir: Path) -> None:
    path = site_dir / "edge.toml"
    path.write_bytes(MINIMAL.encode() + b'name = "\xff"\n')
    with pytest.raises(ConfigError, match="line 14: not UTF-8 text"):
        load_config(path)


# --- unknown keys ---------------------------------------------------------------------------


def test_misspelt_key_is_an_error_with_a_suggestion(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL.replace("province =", "provnce ="))
    assert error.startswith("site.provnce: unknown key (did you mean site.province?)")


def test_misspelt_required_key_is_not_reported_missing_as_well(site_dir: Path) -> None:
    errors = errors_of(site_dir, MINIMAL.replace("province =", "provnce ="))
    assert errors == ["site.provnce: unknown key (did you mean site.province?)"]


def test_misspelt_section_is_an_error_with_a_suggestion(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + "[strorage]\nretention_days = 30\n")
    assert error == "strorage: unknown section (did you mean storage?)"


def test_key_in_the_wrong_section_points_to_where_it_lives(site_dir: Path) -> None:
    error = only_error(site_dir, SITE + "retention_days = 40\n" + MQTT + KEYS)
    assert error == "site.retention_days: unknown key (did you mean storage.retention_days?)"


def test_key_before_any_section_points_to_where_it_lives(site_dir: Path) -> None:
    error = only_error(site_dir, "retention_days = 40\n" + MINIMAL)
    assert error == "retention_days: unknown key (did you mean storage.retention_days?)"


def test_unknown_key_without_anything_close(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + "[logging]\nzzz = 1\n")
    assert error == "logging.zzz: unknown key"


def test_unknown_key_inside_a_camera_entry(site_dir: Path) -> None:
    errors = errors_of(site_dir, MINIMAL + '[[cameras.onvif]]\nadress = "10.0.0.5"\n')
    assert errors == ["cameras.onvif[1].adress: unknown key (did you mean address?)"]
    # a second entry without the typo is still told what it lacks
    errors = errors_of(
        site_dir,
        MINIMAL + '[[cameras.onvif]]\nadress = "10.0.0.5"\n[[cameras.onvif]]\nname = "x"\n',
    )
    assert errors == [
        "cameras.onvif[1].adress: unknown key (did you mean address?)",
        "cameras.onvif[2].address: missing; expected a string, HOST or HOST:PORT "
        "(port 80 when left out)",
    ]


def test_section_given_as_a_value_is_an_error(site_dir: Path) -> None:
    error = only_error(site_dir, "logging = 3\n" + MINIMAL)
    assert error == "logging: expected a table [logging], got an integer"


# --- types ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "line", "expected"),
    [
        ("storage", 'retention_days = "30"', "expected an integer"),
        ("storage", "retention_days = true", "expected an integer"),
        ("storage", "retention_days = 30.5", "expected an integer"),
        ("storage", 'allow_below_legal_minimum = "yes"', "expected true or false"),
        ("storage", "data_dir = 5", "expected a file path"),
        ("storage", 'data_dir = ""', "expected a file path"),
        ("recording", 'fragment_seconds = "1"', "expected a number"),
        ("recording", "fragment_seconds = false", "expected a number"),
        ("discovery", 'interfaces = "eth1"', "expected a list of strings"),
        ("discovery", "interfaces = [1, 2]", "expected a list of strings"),
        ("logging", "level = 2024-01-01", "got a date/time"),
    ],
)
def test_values_of_the_wrong_type_are_refused(
    site_dir: Path, section: str, line: str, expected: str
) -> None:
    error = only_error(site_dir, MINIMAL + f"[{section}]\n{line}\n")
    assert error.startswith(f"{section}.{line.split(' =')[0]}: ")
    assert expected in error


def test_integers_are_accepted_where_numbers_are_expected(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL + "[recording]\nfragment_seconds = 2\n")
    assert cfg.recording.fragment_seconds == 2.0
    assert isinstance(cfg.recording.fragment_seconds, float)


# --- site -----------------------------------------------------------------------------------


@pytest.mark.parametrize("site_id", ["abc", "hcm-q7-01", "a" * 64, "0-9", "a--b"])
def test_site_id_accepts_lowercase_letters_digits_and_dashes(site_dir: Path, site_id: str) -> None:
    cfg = load(site_dir, MINIMAL.replace('"hcm-q7-01"', f'"{site_id}"'))
    assert cfg.site.id == site_id


@pytest.mark.parametrize(
    "site_id", ["ab", "a" * 65, "HCM-01", "hcm_01", "hcm 01", "hcm.01", "", "-hcm", "hcm-", "---"]
)
def test_site_id_refuses_anything_else(site_dir: Path, site_id: str) -> None:
    error = only_error(site_dir, MINIMAL.replace('"hcm-q7-01"', f'"{site_id}"'))
    assert error.startswith(
        "site.id: expected 3–64 characters of a-z, 0-9 and '-', not starting or ending "
        "with '-', got '"
    )


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("kind", ["facility", "checkpoint"], ["Facility", "hospital"]),
        ("authority", ["health", "district", "military", "police", "other"], ["army", ""]),
        ("operator", ["vnpt", "viettel"], ["VNPT", "mobifone"]),
    ],
)
def test_site_attributes_take_only_their_listed_values(
    site_dir: Path, key: str, good: list[str], bad: list[str]
) -> None:
    for value in good:
        cfg = load(site_dir, replace_line(MINIMAL, key, f'{key} = "{value}"'))
        assert getattr(cfg.site, key) == value
    for value in bad:
        error = only_error(site_dir, replace_line(MINIMAL, key, f'{key} = "{value}"'))
        assert error.startswith(f"site.{key}: expected one of ")


def test_district_must_be_given_but_may_be_empty(site_dir: Path) -> None:
    assert load(site_dir, replace_line(MINIMAL, "district", 'district = ""')).site.district == ""
    error = only_error(site_dir, replace_line(MINIMAL, "district", ""))
    assert error.startswith("site.district: missing; expected a string")


def test_names_may_not_hold_control_characters(site_dir: Path) -> None:
    error = only_error(
        site_dir, MINIMAL + '[[cameras.onvif]]\naddress = "a.lan"\nname = "x\\u001b[2J"\n'
    )
    assert error == "cameras.onvif[1].name: expected no control characters, got 'x\\x1b[2J'"


def test_empty_province_is_refused(site_dir: Path) -> None:
    error = only_error(site_dir, replace_line(MINIMAL, "province", 'province = ""'))
    assert error == "site.province: expected 1–100 characters, got ''"


# --- retention ------------------------------------------------------------------------------


def test_retention_below_the_legal_minimum_is_refused_without_the_flag(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + "[storage]\nretention_days = 29\n")
    assert error == (
        "storage.retention_days: expected at least 30 (the legal minimum), got 29; to keep "
        "less on a test bench set storage.allow_below_legal_minimum = true"
    )


def test_retention_below_the_minimum_with_the_flag_loads_and_warns(site_dir: Path) -> None:
    path = write(
        site_dir, MINIMAL + "[storage]\nretention_days = 7\nallow_below_legal_minimum = true\n"
    )
    cfg = load_config(path)
    assert cfg.storage.retention_days == 7
    warnings = check_config(path)
    assert warnings == [
        "storage.retention_days = 7 is below the legal minimum of 30 days "
        "(allowed by storage.allow_below_legal_minimum)"
    ]
    assert config_warnings(cfg) == warnings  # what the daemon logs at every start


def test_retention_above_the_minimum_needs_no_flag(site_dir: Path) -> None:
    assert load(site_dir, MINIMAL + "[storage]\nretention_days = 90\n").storage.retention_days == 90


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_retention_out_of_range(site_dir: Path, days: int) -> None:
    error = only_error(
        site_dir,
        MINIMAL + f"[storage]\nretention_days = {days}\nallow_below_legal_minimum = true\n",
    )
    assert error.startswith("storage.retention_days: expected between 1 and 3650")


# --- recording ------------------------------------------------------------------------------


def test_fragment_must_be_shorter_than_segment(site_dir: Path) -> None:
    error = only_error(
        site_dir, MINIMAL + "[recording]\nsegment_seconds = 10\nfragment_seconds = 10\n"
    )
    assert error == (
        "recording.fragment_seconds: expected less than recording.segment_seconds (10), got 10"
    )


@pytest.mark.parametrize(("key", "value"), [("segment_seconds", 5), ("fragment_seconds", 0.05)])
def test_recording_lengths_have_bounds(site_dir: Path, key: str, value: float) -> None:
    error = only_error(site_dir, MINIMAL + f"[recording]\n{key} = {value}\n")
    assert error.startswith(f"recording.{key}: expected between")


# --- mqtt -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("http://broker.test", "expected mqtts://HOST[:PORT] or mqtt://HOST[:PORT]"),
        ("mqtts://", "expected mqtts://"),
        ("mqtts://broker.test:0", "expected mqtts://"),
        ("mqtts://broker.test:70000", "expected mqtts://"),
        ("mqtts://broker.test/isocam", "no path, query or fragment"),
        ("mqtts://site:hunter2@broker.test", "credentials do not belong in the URL"),
    ],
)
def test_mqtt_url_must_be_a_bare_broker_address(site_dir: Path, url: str, fragment: str) -> None:
    error = only_error(site_dir, MINIMAL.replace("mqtts://broker.test:8883", url))
    assert error.startswith("mqtt.url: ")
    assert fragment in error
    assert "hunter2" not in error


def test_mqtts_needs_the_site_certificate_and_key(site_dir: Path) -> None:
    text = replace_line(replace_line(MINIMAL, "cert_file", ""), "key_file", "")
    assert errors_of(site_dir, text) == [
        "mqtt.cert_file: missing; mqtts:// needs this site's client certificate and key",
        "mqtt.key_file: missing; mqtts:// needs this site's client certificate and key",
    ]


def test_plaintext_mqtt_with_tls_files_is_refused(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL.replace("mqtts://broker.test:8883", "mqtt://broker.test"))
    assert error == (
        "mqtt.url: expected mqtts:// because mqtt.cert_file, mqtt.key_file is given "
        "(TLS files would be ignored with plaintext mqtt://)"
    )


def test_plaintext_mqtt_loads_with_a_warning(site_dir: Path) -> None:
    text = SITE + '[mqtt]\nurl = "mqtt://127.0.0.1"\n' + KEYS
    path = write(site_dir, text)
    cfg = load_config(path)
    assert not cfg.mqtt.tls and cfg.mqtt.port == 1883
    assert any(w.startswith("mqtt.url is plaintext mqtt://") for w in check_config(path))


def test_tls_files_must_exist(site_dir: Path) -> None:
    (site_dir / "tls" / "site.key").unlink()
    error = only_error(site_dir, MINIMAL)
    assert error == f"mqtt.key_file: file not found: {site_dir / 'tls' / 'site.key'}"


def test_tls_file_must_be_a_regular_file(site_dir: Path) -> None:
    text = MINIMAL.replace(
        'key_file = "tls/site.key"', 'key_file = "tls/site.key"\nca_file = "tls"'
    )
    assert only_error(site_dir, text) == f"mqtt.ca_file: not a regular file: {site_dir / 'tls'}"


def test_will_delay_may_not_exceed_session_expiry(site_dir: Path) -> None:
    text = MINIMAL.replace(
        'key_file = "tls/site.key"',
        'key_file = "tls/site.key"\nsession_expiry_seconds = 5\nwill_delay_seconds = 6',
    )
    assert only_error(site_dir, text) == (
        "mqtt.will_delay_seconds: expected at most mqtt.session_expiry_seconds (5), got 6"
    )


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("keepalive_seconds = 1", "expected between 5 and 3600"),
        ("health_interval_seconds = 0", "expected between 5 and 3600"),
        ("spool_max_bytes = 1000", "expected between 1048576 and 1099511627776"),
        ("session_expiry_seconds = -1", "expected between 0 and 4294967295"),
        ('client_id = "has space"', "expected 1–128 characters"),
    ],
)
def test_mqtt_numbers_and_client_id_have_bounds(site_dir: Path, line: str, fragment: str) -> None:
    text = MINIMAL.replace('key_file = "tls/site.key"', f'key_file = "tls/site.key"\n{line}')
    error = only_error(site_dir, text)
    assert error.startswith(f"mqtt.{line.split(' =')[0]}: {fragment}")


def test_client_id_can_be_set(site_dir: Path) -> None:
    text = MINIMAL.replace(
        'key_file = "tls/site.key"', 'key_file = "tls/site.key"\nclient_id = "x.y_z-1"'
    )
    assert load(site_dir, text).mqtt.client_id == "x.y_z-1"


# --- keys -----------------------------------------------------------------------------------


def test_at_least_one_recipient_key_is_required(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL.replace('["keys/hub.pub.pem"]', "[]"))
    assert error == "keys.recipient_files: expected at least 1 item, got []"


def test_recipient_key_files_must_exist(site_dir: Path) -> None:
    text = MINIMAL.replace('["keys/hub.pub.pem"]', '["keys/hub.pub.pem", "keys/missing.pem"]')
    error = only_error(site_dir, text)
    assert error == f"keys.recipient_files: file not found: {site_dir / 'keys' / 'missing.pem'}"


def test_recipient_keys_may_not_repeat(site_dir: Path) -> None:
    text = MINIMAL.replace('["keys/hub.pub.pem"]', '["keys/hub.pub.pem", "keys/hub.pub.pem"]')
    assert only_error(site_dir, text).startswith("keys.recipient_files: ")
    assert "is listed twice" in only_error(site_dir, text)


def test_several_recipients_and_a_device_key_path(site_dir: Path) -> None:
    text = MINIMAL.replace(
        '["keys/hub.pub.pem"]',
        '["keys/hub.pub.pem", "keys/escrow.pub.pem"]\ndevice_key_file = "/srv/dev.pem"',
    )
    cfg = load(site_dir, text)
    assert len(cfg.keys.recipient_files) == 2
    assert cfg.keys.device_key_file == Path("/srv/dev.pem")


# --- secrets --------------------------------------------------------------------------------


def test_password_from_a_file_drops_the_final_newline(site_dir: Path) -> None:
    secret_file = site_dir / "camera.pass"
    secret_file.write_text("s3cret pass\n")
    secret_file.chmod(0o600)
    cfg = load(site_dir, MINIMAL + '[credentials]\npassword = { file = "camera.pass" }\n')
    assert cfg.credentials.password is not None
    assert cfg.credentials.password.reveal() == "s3cret pass"
    assert cfg.credentials.password.source == f"file:{secret_file}"
    assert check_config(site_dir / "edge.toml") == []


def test_password_from_an_environment_variable(
    site_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ISOCAM_TEST_CAMERA_PASSWORD", "from-env")
    cfg = load(
        site_dir, MINIMAL + '[credentials]\npassword = { env = "ISOCAM_TEST_CAMERA_PASSWORD" }\n'
    )
    assert cfg.credentials.password == Secret("from-env")
    assert cfg.credentials.password is not None
    assert cfg.credentials.password.source == "env:ISOCAM_TEST_CAMERA_PASSWORD"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            '{ env = "ISOCAM_SURELY_UNSET_VARIABLE" }',
            "environment variable ISOCAM_SURELY_UNSET_VARIABLE is not set",
        ),
        ('{ env = "not a name" }', "'not a name' is not an environment variable name"),
        ('{ file = "nope.pass" }', "secret file not found: {dir}/nope.pass"),
        ('{ file = "empty.pass" }', "secret file {dir}/empty.pass is empty"),
        ('{ file = "tls" }', "cannot read secret file {dir}/tls: Is a directory"),
        (
            '{ file = "a", env = "B" }',
            'expected a secret: "literal", { file = "PATH" } or { env = "VARIABLE" }, got a table',
        ),
        ('{ path = "a" }', "expected a secret"),
        ("{ file = 3 }", "expected a secret"),
        ("12345", "expected a secret"),
    ],
)
def test_secret_problems(site_dir: Path, value: str, expected: str) -> None:
    os.environ.pop("ISOCAM_SURELY_UNSET_VARIABLE", None)
    (site_dir / "empty.pass").write_text("\n")
    error = only_error(site_dir, MINIMAL + f"[credentials]\npassword = {value}\n")
    assert error.startswith("credentials.password: ")
    assert expected.replace("{dir}", str(site_dir)) in error


def test_secrets_never_show_in_repr_str_or_format() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret)
    assert str(secret) == "***"
    assert f"{secret}" == "***" and f"{secret:>20}" == "***"
    assert secret.reveal() == "hunter2"
    assert secret == Secret("hunter2") and secret != Secret("other")
    assert hash(secret) == hash(Secret("hunter2"))


def test_loaded_config_repr_masks_every_password(site_dir: Path) -> None:
    cfg = load(
        site_dir,
        MINIMAL
        + """
        [credentials]
        password = "default-hunter2"
        [[cameras.onvif]]
        address = "10.0.0.5"
        password = "onvif-hunter2"
        [[cameras.rtsp]]
        id = "c1"
        name = "C1"
        rtsp_main = "rtsp://10.0.0.6/main"
        password = "rtsp-hunter2"
        """,
    )
    assert "hunter2" not in repr(cfg)
    assert "hunter2" not in str(cfg)


def test_wrongly_typed_password_is_not_echoed_in_the_error(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + '[credentials]\npassword = ["hunter2"]\n')
    assert "hunter2" not in error


def test_world_readable_file_with_a_literal_password_is_warned_about(site_dir: Path) -> None:
    path = write(site_dir, MINIMAL + '[credentials]\npassword = "pw"\n')
    path.chmod(0o644)
    assert check_config(path) == [
        f"{path} holds a camera password and is readable by every user (chmod o-r {path})"
    ]
    path.chmod(0o640)
    assert check_config(path) == []


def test_world_readable_password_file_is_warned_about(site_dir: Path) -> None:
    secret_file = site_dir / "camera.pass"
    secret_file.write_text("pw")
    secret_file.chmod(0o644)
    path = write(site_dir, MINIMAL + '[credentials]\npassword = { file = "camera.pass" }\n')
    assert check_config(path) == [
        f"{secret_file} holds a camera password and is readable by every user "
        f"(chmod o-r {secret_file})"
    ]


# --- cameras --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("http://10.0.0.5", "without a scheme such as http://"),
        ("10.0.0.5:99999", "expected HOST or HOST:PORT"),
        ("10.0.0.5/onvif", "expected HOST or HOST:PORT"),
        ("", "expected HOST or HOST:PORT"),
    ],
)
def test_onvif_address_must_be_host_and_optional_port(
    site_dir: Path, address: str, fragment: str
) -> None:
    error = only_error(site_dir, MINIMAL + f'[[cameras.onvif]]\naddress = "{address}"\n')
    assert error.startswith("cameras.onvif[1].address: ")
    assert fragment in error


def test_the_same_camera_may_not_be_pinned_twice(site_dir: Path) -> None:
    text = (
        MINIMAL
        + '[[cameras.onvif]]\naddress = "10.0.0.5"\n[[cameras.onvif]]\naddress = "10.0.0.5:80"\n'
    )
    assert only_error(site_dir, text) == (
        "cameras.onvif[2].address: '10.0.0.5:80' is already given in cameras.onvif[1]"
    )


def test_ipv6_camera_address_is_normalised(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL + '[[cameras.onvif]]\naddress = "[fe80::10]:8080"\n')
    (cam,) = cfg.cameras.onvif
    assert cam.address == "[fe80::10]:8080" and cam.host == "fe80::10" and cam.port == 8080


def test_cameras_onvif_must_be_an_array_of_tables(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + '[cameras.onvif]\naddress = "10.0.0.5"\n')
    assert error.startswith(
        "cameras.onvif: expected an array of tables ([[...]] entries), written [[cameras.onvif]]"
    )


def test_rtsp_camera_needs_id_name_and_main_url(site_dir: Path) -> None:
    errors = errors_of(site_dir, MINIMAL + '[[cameras.rtsp]]\nrtsp_sub = "rtsp://10.0.0.6/sub"\n')
    assert [e.split(":", 1)[0] for e in errors] == [
        "cameras.rtsp[1].id",
        "cameras.rtsp[1].name",
        "cameras.rtsp[1].rtsp_main",
    ]


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ('rtsp_main = "http://10.0.0.6/main"', "cameras.rtsp[1].rtsp_main: expected rtsp://"),
        (
            'rtsp_main = "rtsp://admin:pw@10.0.0.6/main"',
            "cameras.rtsp[1].rtsp_main: credentials do not belong in the URL "
            "(URLs end up in logs): use user and password",
        ),
        ('rtsp_sub = "rtsp:/bad"', "cameras.rtsp[1].rtsp_sub: expected rtsp://"),
        ('id = "Cam 1"', "cameras.rtsp[1].id: expected 1–64 characters of a-z, 0-9 and '-'"),
        ('name = ""', "cameras.rtsp[1].name: expected 1–200 characters"),
    ],
)
def test_rtsp_camera_fields_are_validated(site_dir: Path, line: str, fragment: str) -> None:
    entry = {"id": '"c1"', "name": '"Kho"', "rtsp_main": '"rtsp://10.0.0.6/main"'}
    key, _, value = line.partition(" = ")
    entry[key] = value
    text = MINIMAL + "[[cameras.rtsp]]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items())
    error = only_error(site_dir, text)
    assert error.startswith(fragment)
    assert "admin:pw" not in error


def test_rtsp_camera_ids_are_unique(site_dir: Path) -> None:
    entry = '[[cameras.rtsp]]\nid = "c1"\nname = "A"\nrtsp_main = "rtsp://10.0.0.6/main"\n'
    assert only_error(site_dir, MINIMAL + entry + entry) == (
        "cameras.rtsp[2].id: 'c1' is already given in cameras.rtsp[1]"
    )


def test_errors_in_several_camera_entries_are_all_reported(site_dir: Path) -> None:
    text = MINIMAL + (
        '[[cameras.onvif]]\naddress = "ok.lan"\n'
        '[[cameras.onvif]]\naddress = "bad host"\n'
        '[[cameras.onvif]]\naddress = "10.0.0.1:0"\nname = 5\n'
    )
    keys = [e.split(":", 1)[0] for e in errors_of(site_dir, text)]
    assert keys == [
        "cameras.onvif[2].address",
        "cameras.onvif[3].address",
        "cameras.onvif[3].name",
    ]


@pytest.mark.parametrize("value", [0.0, 5000])
def test_max_clock_offset_has_bounds(site_dir: Path, value: float) -> None:
    error = only_error(site_dir, MINIMAL + f"[cameras]\nmax_clock_offset_seconds = {value}\n")
    assert error.startswith("cameras.max_clock_offset_seconds: expected between 0.1 and 3600")


def test_h265_can_be_refused(site_dir: Path) -> None:
    assert load(site_dir, MINIMAL + "[cameras]\naccept_h265 = false\n").cameras.accept_h265 is False


def test_no_cameras_and_no_discovery_is_warned_about(site_dir: Path) -> None:
    path = write(site_dir, MINIMAL + "[discovery]\nenabled = false\n")
    assert check_config(path) == [
        "no cameras: discovery.enabled is false and no [[cameras.onvif]] or [[cameras.rtsp]] "
        "entry is given"
    ]
    assert load_config(path).discovery_interfaces() == []


# --- discovery ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["0.0.0.0", "239.255.255.250", "255.255.255.255", "bad name!", "x" * 16]
)
def test_discovery_interfaces_refuse_non_interfaces(site_dir: Path, spec: str) -> None:
    error = only_error(site_dir, MINIMAL + f'[discovery]\ninterfaces = ["{spec}"]\n')
    assert error.startswith(f"discovery.interfaces: '{spec}': expected an IPv4 address of this box")


def test_discovery_interfaces_may_not_repeat(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + '[discovery]\ninterfaces = ["lo", "lo"]\n')
    assert error == "discovery.interfaces: 'lo' is listed twice"


def test_named_interfaces_resolve_to_addresses_and_unknown_names_warn(site_dir: Path) -> None:
    path = write(site_dir, MINIMAL + '[discovery]\ninterfaces = ["lo", "127.0.0.1", "cam-lan9"]\n')
    cfg = load_config(path)
    assert cfg.discovery.interfaces == ("lo", "127.0.0.1", "cam-lan9")
    assert check_config(path) == [
        "discovery.interfaces: no interface named 'cam-lan9' on this host"
    ]
    cfg = load(site_dir, MINIMAL + '[discovery]\ninterfaces = ["lo", "127.0.0.2"]\n')
    assert cfg.discovery_interfaces() == ["127.0.0.1", "127.0.0.2"]


def test_discovery_timeout_has_bounds(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + "[discovery]\ntimeout_seconds = 0.1\n")
    assert error.startswith("discovery.timeout_seconds: expected between 0.5 and 30")


# --- health, metrics, status, logging -------------------------------------------------------


def test_black_threshold_must_be_below_covered(site_dir: Path) -> None:
    error = only_error(site_dir, MINIMAL + "[health]\nblack_max_luma = 70\n")
    assert error == "health.black_max_luma: expected less than health.covered_max_luma (60), got 70"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("black_max_luma = 300", "expected between 0 and 255"),
        ("blurred_max_sharpness = -1", "expected at least 0"),
        ("moved_max_similarity = 1.5", "expected between 0 and 1"),
        ("confirm_checks = 0", "expected between 1 and 100"),
        ("check_interval_seconds = 0.5", "expected between 1 and 3600"),
    ],
)
def test_health_thresholds_have_bounds(site_dir: Path, line: str, fragment: str) -> None:
    error = only_error(site_dir, MINIMAL + f"[health]\n{line}\n")
    assert error.startswith(f"health.{line.split(' =')[0]}: {fragment}")


def test_health_thresholds_can_be_tuned(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL + "[health]\nfrozen_max_diff = 0.05\nconfirm_checks = 5\n")
    assert cfg.health.frozen_max_diff == 0.05 and cfg.health.confirm_checks == 5


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("", True),
        ("0.0.0.0:9108", True),
        ("[::1]:9", True),
        ("127.0.0.1", False),
        ("localhost:x", False),
    ],
)
def test_metrics_listen_address(site_dir: Path, value: str, ok: bool) -> None:
    text = MINIMAL + f'[metrics]\nlisten = "{value}"\n'
    if ok:
        assert load(site_dir, text).metrics.listen == value
    else:
        assert only_error(site_dir, text).startswith("metrics.listen: expected HOST:PORT")


def test_status_socket_and_log_level(site_dir: Path) -> None:
    cfg = load(site_dir, MINIMAL + '[status]\nsocket = "/run/x.sock"\n[logging]\nlevel = "debug"\n')
    assert cfg.status.socket == Path("/run/x.sock") and cfg.logging.level == "debug"
    error = only_error(site_dir, MINIMAL + '[logging]\nlevel = "verbose"\n')
    assert error == "logging.level: expected one of debug, info, warning, error, got 'verbose'"


# --- the shipped example --------------------------------------------------------------------


def test_example_file_loads_once_its_files_exist(tmp_path: Path) -> None:
    # the example names /etc/isocam/... and /var/lib/isocam: move both under tmp_path
    etc, var = tmp_path / "etc", tmp_path / "var"
    text = EXAMPLE.read_text(encoding="utf-8")
    text = text.replace("/etc/isocam/", f"{etc}/").replace("/var/lib/isocam", str(var))
    for name in ("tls/hub-ca.pem", "tls/site.crt", "tls/site.key"):
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_text("-----BEGIN PEM-----\n")
    for name in ("keys/hub-viewing.pub.pem", "keys/escrow.pub.pem"):
        (etc / name).parent.mkdir(parents=True, exist_ok=True)
        (etc / name).write_bytes(_public_pem())
    (etc / "camera-password").write_text("camera-pw\n")
    (etc / "camera-password").chmod(0o600)
    path = tmp_path / "edge.toml"
    path.write_text(text, encoding="utf-8")
    path.chmod(0o640)
    cfg = load_config(path)
    assert cfg.site.kind == "facility" and cfg.site.operator == "vnpt"
    assert cfg.mqtt.tls and len(cfg.keys.recipient_files) == 2
    assert [c.address for c in cfg.cameras.onvif] == ["192.168.10.64:80", "192.168.10.65:8000"]
    assert cfg.cameras.rtsp[0].user == "viewer"
    assert cfg.credentials.password == Secret("camera-pw")
    assert cfg.storage.data_dir == var
    assert check_config(path) == []


def test_example_file_mentions_every_setting() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for setting in SETTINGS:
        if setting.type == "table list":
            assert f"[[{setting.name}]]" in text, setting.name
        else:
            assert re.search(rf"(?m)^#?\s*{re.escape(setting.key)} = ", text), setting.name
