"""MQTT topic names of the edge ↔ hub contract: build them, parse them, subscribe to them.

Every topic is `isocam/v1/{site_id}/{kind}`. The site id is the second level from the top so the
broker ACL `pattern readwrite isocam/v1/%u/#` (CN of the site's certificate = site id) confines a
site to its own prefix. `POLICIES` is the one table of QoS, retain flag and direction per kind;
docs/protocol.md is checked against it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Literal, NamedTuple

#: Topic root; the `v1` moves to `v2` only with an incompatible change (docs/protocol.md).
ROOT = "isocam/v1"

#: Site ids: lowercase letters, digits and hyphens, 3–64 characters, no hyphen at either end.
#: They are the CN of the site's certificate, a directory name and a CLI argument (a leading
#: hyphen would read as an option), so they stay in the DNS-label alphabet.
SITE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{1,62}[a-z0-9]")

#: MQTT 5 §4.8.2: a share name must not contain "/", "+" or "#"; we keep it to a plain word.
SHARE_GROUP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")

TopicErrorReason = Literal["bad_topic", "unknown_kind"]


class Kind(StrEnum):
    """What a topic carries; the value is the topic suffix after the site id."""

    STATE = "state"
    INVENTORY = "inventory"
    HEALTH = "health"
    EVENT = "event"
    CMD = "cmd"
    CMD_REPLY = "cmd/reply"


Publisher = Literal["edge", "hub"]


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """How messages of one kind are published: who publishes, QoS, retained or not."""

    publisher: Publisher
    qos: Literal[0, 1]
    retain: bool


#: The delivery table. State and inventory are retained so a hub (re)starting learns every site
#: at once; commands are never retained (a retained `open_tunnel` would replay at every
#: reconnect). Health is QoS 1 because the edge spools it and drops it only on the broker's ack.
POLICIES: dict[Kind, TopicPolicy] = {
    Kind.STATE: TopicPolicy(publisher="edge", qos=1, retain=True),
    Kind.INVENTORY: TopicPolicy(publisher="edge", qos=1, retain=True),
    Kind.HEALTH: TopicPolicy(publisher="edge", qos=1, retain=False),
    Kind.EVENT: TopicPolicy(publisher="edge", qos=1, retain=False),
    Kind.CMD: TopicPolicy(publisher="hub", qos=1, retain=False),
    Kind.CMD_REPLY: TopicPolicy(publisher="edge", qos=1, retain=False),
}

_KIND_BY_SUFFIX: dict[str, Kind] = {k.value: k for k in Kind}
_ROOT_PREFIX = ROOT + "/"


class TopicError(ValueError):
    """A topic that is not part of the contract; `reason` is a short machine code."""

    def __init__(self, reason: TopicErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: TopicErrorReason = reason


class Topic(NamedTuple):
    """A parsed topic: which site, which kind. `str(topic)` gives the topic name back."""

    # A NamedTuple, not a frozen dataclass: built once per received message, and a tuple is
    # several times cheaper to construct.
    site_id: str
    kind: Kind

    def __str__(self) -> str:
        return f"{ROOT}/{self.site_id}/{self.kind.value}"

    @property
    def policy(self) -> TopicPolicy:
        """QoS, retain flag and publisher for this topic."""
        return POLICIES[self.kind]


def is_valid_site_id(site_id: str) -> bool:
    """True when `site_id` may appear in a topic (see `SITE_ID_RE`)."""
    return isinstance(site_id, str) and SITE_ID_RE.fullmatch(site_id) is not None


def check_site_id(site_id: str) -> str:
    """Return `site_id` unchanged, or raise TopicError saying what is wrong with it."""
    if not isinstance(site_id, str) or SITE_ID_RE.fullmatch(site_id) is None:
        raise TopicError("bad_topic", _site_id_problem(site_id))
    return site_id


def _site_id_problem(site_id: object) -> str:
    if not isinstance(site_id, str):
        return f"site id must be a string, not {type(site_id).__name__}"
    shown = repr(site_id[:70])
    if not 3 <= len(site_id) <= 64:
        return f"site id {shown} must be 3-64 characters long, not {len(site_id)}"
    if site_id.startswith("-") or site_id.endswith("-"):
        return f"site id {shown} must not start or end with a hyphen"
    return f"site id {shown} may contain only lowercase letters a-z, digits and hyphens"


def topic(site_id: str, kind: Kind | str) -> str:
    """The topic name on which `site_id` publishes (or receives) messages of `kind`."""
    check_site_id(site_id)
    k = _KIND_BY_SUFFIX.get(kind) if isinstance(kind, str) else None
    if k is None:
        raise TopicError("unknown_kind", f"unknown topic kind {kind!r}; one of {_kinds_text()}")
    return f"{ROOT}/{site_id}/{k.value}"


def parse_topic(name: str) -> Topic:
    """Split a received topic name into site id and kind, or raise TopicError with the reason."""
    if not isinstance(name, str):
        raise TopicError("bad_topic", f"topic must be a string, not {type(name).__name__}")
    return _parse_topic_cached(name)


# Hot path of the hub's ingest, and a small set of names (sites × 6 kinds) seen over and over:
# a cache hit costs a dict lookup. Only valid names are cached (exceptions are not); 2**16
# entries hold 10,000 sites' topics, and the LRU bound caps the memory at ~16 MB.
@lru_cache(maxsize=2**16)
def _parse_topic_cached(name: str) -> Topic:
    if not name.startswith(_ROOT_PREFIX):
        raise TopicError("bad_topic", f"topic {name[:100]!r} does not start with {ROOT}/")
    site_id, sep, suffix = name[len(_ROOT_PREFIX) :].partition("/")
    if not sep:
        raise TopicError("bad_topic", f"topic {name[:100]!r} has no kind after the site id")
    if SITE_ID_RE.fullmatch(site_id) is None:
        raise TopicError("bad_topic", f"topic {name[:100]!r}: {_site_id_problem(site_id)}")
    kind = _KIND_BY_SUFFIX.get(suffix)
    if kind is None:
        raise TopicError(
            "unknown_kind",
            f"topic {name[:100]!r}: unknown kind {suffix[:40]!r}; one of {_kinds_text()}",
        )
    return Topic(site_id, kind)


def _kinds_text() -> str:
    return ", ".join(k.value for k in Kind)


def subscription(kind: Kind | str, *, share_group: str | None = None) -> str:
    """Filter for `kind` from every site, e.g. `isocam/v1/+/event`.

    With `share_group`, the MQTT 5 shared form `$share/{group}/isocam/v1/+/event`, so several
    hub instances split the messages between them (each message goes to one member).
    """
    k = _KIND_BY_SUFFIX.get(kind) if isinstance(kind, str) else None
    if k is None:
        raise TopicError("unknown_kind", f"unknown topic kind {kind!r}; one of {_kinds_text()}")
    filt = f"{ROOT}/+/{k.value}"
    if share_group is None:
        return filt
    if not isinstance(share_group, str) or SHARE_GROUP_RE.fullmatch(share_group) is None:
        raise TopicError(
            "bad_topic",
            f"share group {share_group!r} must be 1-64 letters, digits, '_' or '-'",
        )
    return f"$share/{share_group}/{filt}"


def hub_subscriptions(share_group: str | None = None) -> list[tuple[str, int]]:
    """(filter, QoS) pairs the hub subscribes to: every kind an edge publishes, from every site.

    Mosquitto 2.0.11 hands the retained state and inventory of every site to each `$share/`
    member as it subscribes (measured), so every instance learns all sites at start; brokers
    that withhold retained messages from shared subscriptions need one plain subscription to
    `state` and `inventory` as well. Both kinds are idempotent, so duplicates are harmless.
    """
    return [
        (subscription(k, share_group=share_group), p.qos)
        for k, p in POLICIES.items()
        if p.publisher == "edge"
    ]


def edge_subscriptions(site_id: str) -> list[tuple[str, int]]:
    """(filter, QoS) pairs an edge subscribes to: its own command topic, nothing else."""
    return [(topic(site_id, k), p.qos) for k, p in POLICIES.items() if p.publisher == "hub"]


def will_topic(site_id: str) -> str:
    """Topic of the edge's MQTT will: its `state` topic, where the will is a retained death."""
    return topic(site_id, Kind.STATE)
