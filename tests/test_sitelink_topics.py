"""sitelink.topics: building, parsing and subscribing to `isocam/v1/{site_id}/{kind}` topics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sitelink.topics import (
    POLICIES,
    ROOT,
    SITE_ID_RE,
    Kind,
    Topic,
    TopicError,
    check_site_id,
    edge_subscriptions,
    hub_subscriptions,
    is_valid_site_id,
    parse_topic,
    subscription,
    topic,
    will_topic,
)

site_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{1,62}[a-z0-9]\Z")


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_builds_and_parses_back(kind: Kind) -> None:
    name = topic("hcm-q7-001", kind)
    assert name == f"isocam/v1/hcm-q7-001/{kind.value}"
    parsed = parse_topic(name)
    assert parsed == Topic("hcm-q7-001", kind)
    assert str(parsed) == name
    assert parsed.policy is POLICIES[kind]


def test_kind_may_be_given_as_its_string() -> None:
    assert topic("site-a", "cmd/reply") == "isocam/v1/site-a/cmd/reply"


@pytest.mark.parametrize("site_id", ["abc", "a-b", "0ab", "x" * 64, "hcm-q7-001", "a1-" + "b" * 61])
def test_site_ids_of_3_to_64_lowercase_alnum_and_inner_hyphens_are_valid(site_id: str) -> None:
    assert is_valid_site_id(site_id)
    assert check_site_id(site_id) == site_id
    assert parse_topic(f"isocam/v1/{site_id}/event").site_id == site_id


@pytest.mark.parametrize(
    ("site_id", "why"),
    [
        ("ab", "3-64 characters"),
        ("x" * 65, "3-64 characters"),
        ("", "3-64 characters"),
        ("-abc", "hyphen"),
        ("abc-", "hyphen"),
        ("Site-A", "lowercase"),
        ("site_a", "lowercase"),
        ("site.a", "lowercase"),
        ("sité", "lowercase"),
        ("site+", "lowercase"),
        ("si#te", "lowercase"),
        ("a b c", "lowercase"),
    ],
)
def test_malformed_site_ids_are_refused_with_the_reason(site_id: str, why: str) -> None:
    assert not is_valid_site_id(site_id)
    with pytest.raises(TopicError, match=why) as info:
        check_site_id(site_id)
    assert info.value.reason == "bad_topic"
    with pytest.raises(TopicError, match=why):
        topic(site_id, Kind.STATE)
    with pytest.raises(TopicError, match=why) as info:
        parse_topic(f"isocam/v1/{site_id}/state")
    assert info.value.reason == "bad_topic"


@pytest.mark.parametrize(
    ("name", "reason", "why"),
    [
        ("isocam/v2/site-a/event", "bad_topic", "does not start with isocam/v1/"),
        ("other/v1/site-a/event", "bad_topic", "does not start with isocam/v1/"),
        ("/isocam/v1/site-a/event", "bad_topic", "does not start with"),
        ("isocam/v1/site-a", "bad_topic", "no kind"),
        ("isocam/v1/", "bad_topic", "no kind"),
        ("isocam/v1/site-a/", "unknown_kind", "unknown kind ''"),
        ("isocam/v1/site-a/telemetry", "unknown_kind", "unknown kind 'telemetry'"),
        ("isocam/v1/site-a/event/extra", "unknown_kind", "unknown kind 'event/extra'"),
        ("isocam/v1/site-a/cmd/reply/x", "unknown_kind", "unknown kind"),
        ("isocam/v1/site-a/Event", "unknown_kind", "unknown kind"),
        ("isocam/v1/+/event", "bad_topic", "site id"),
        ("isocam/v1/#", "bad_topic", "no kind"),
        ("$share/hub/isocam/v1/site-a/event", "bad_topic", "does not start with"),
    ],
)
def test_topics_outside_the_contract_are_refused_with_a_reason(
    name: str, reason: str, why: str
) -> None:
    with pytest.raises(TopicError, match=why) as info:
        parse_topic(name)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_a_non_string_topic_is_a_topic_error() -> None:
    with pytest.raises(TopicError, match="must be a string") as info:
        parse_topic(b"isocam/v1/site-a/event")  # type: ignore[arg-type]
    assert info.value.reason == "bad_topic"


def test_a_refused_topic_is_refused_again_not_served_from_the_parse_cache() -> None:
    for _ in range(3):
        with pytest.raises(TopicError):
            parse_topic("isocam/v1/site-a/nope")


def test_unknown_kinds_are_refused_when_building() -> None:
    with pytest.raises(TopicError, match="unknown topic kind 'telemetry'") as info:
        topic("site-a", "telemetry")
    assert info.value.reason == "unknown_kind"
    with pytest.raises(TopicError, match="unknown topic kind"):
        subscription("telemetry")


def test_subscriptions_cover_every_site_and_optionally_a_share_group() -> None:
    assert subscription(Kind.EVENT) == "isocam/v1/+/event"
    assert subscription("cmd/reply") == "isocam/v1/+/cmd/reply"
    assert subscription(Kind.STATE, share_group="hub") == "$share/hub/isocam/v1/+/state"


@pytest.mark.parametrize("group", ["", "a/b", "a+", "a#", "x" * 65, "hub group"])
def test_share_groups_that_mqtt_forbids_are_refused(group: str) -> None:
    with pytest.raises(TopicError, match="share group"):
        subscription(Kind.EVENT, share_group=group)


def test_the_hub_subscribes_to_everything_edges_publish_and_not_to_commands() -> None:
    subs = dict(hub_subscriptions())
    assert subs == {
        "isocam/v1/+/state": 1,
        "isocam/v1/+/inventory": 1,
        "isocam/v1/+/health": 1,
        "isocam/v1/+/event": 1,
        "isocam/v1/+/cmd/reply": 1,
    }
    shared = [f for f, _ in hub_subscriptions("hub")]
    assert all(f.startswith("$share/hub/isocam/v1/+/") for f in shared)
    assert len(shared) == len(subs)


def test_an_edge_subscribes_only_to_its_own_command_topic() -> None:
    assert edge_subscriptions("site-a") == [("isocam/v1/site-a/cmd", 1)]


def test_the_will_goes_to_the_retained_state_topic() -> None:
    assert will_topic("site-a") == "isocam/v1/site-a/state"
    assert POLICIES[Kind.STATE].retain and POLICIES[Kind.STATE].qos == 1


def test_policy_table_covers_every_kind_and_never_retains_commands() -> None:
    assert set(POLICIES) == set(Kind)
    assert POLICIES[Kind.INVENTORY].retain
    for kind in (Kind.HEALTH, Kind.EVENT, Kind.CMD, Kind.CMD_REPLY):
        assert not POLICIES[kind].retain
    assert POLICIES[Kind.CMD].publisher == "hub"
    assert all(p.publisher == "edge" for k, p in POLICIES.items() if k is not Kind.CMD)


@given(site_ids, st.sampled_from(list(Kind)))
def test_any_valid_site_and_kind_round_trips(site_id: str, kind: Kind) -> None:
    assert SITE_ID_RE.fullmatch(site_id)
    assert parse_topic(topic(site_id, kind)) == (site_id, kind)


@given(st.text(max_size=120))
def test_arbitrary_text_parses_or_raises_only_topic_error(name: str) -> None:
    try:
        parsed = parse_topic(name)
    except TopicError:
        return
    assert str(parsed) == name


@given(site_ids, st.text(max_size=30))
def test_arbitrary_text_after_a_valid_prefix_parses_only_to_a_known_kind(
    site_id: str, suffix: str
) -> None:
    try:
        parsed = parse_topic(f"{ROOT}/{site_id}/{suffix}")
    except TopicError as exc:
        assert exc.reason == "unknown_kind"
        return
    assert parsed.kind.value == suffix
