"""Generate the reference parts of docs/protocol.md from the models and tables in sitelink.

The prose of the document is written by hand; the topic table, reject reasons, type glossary
and every message's field table sit between `<!-- generated:NAME -->` and
`<!-- /generated:NAME -->` markers and are produced here, so a field cannot be added to a model
without appearing in the document. `python -m sitelink.protocol_doc docs/protocol.md` rewrites
the blocks; with `--check` it only says whether they are current (the tests do the same).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from sitelink import messages
from sitelink.topics import POLICIES, ROOT, Kind

#: For each topic kind, the top-level models its payload may be, in document order.
MODELS_BY_KIND: dict[Kind, tuple[type[messages.Message], ...]] = {
    Kind.STATE: (messages.StateBirth, messages.StateDeath),
    Kind.INVENTORY: (messages.Inventory,),
    Kind.HEALTH: (messages.Health,),
    Kind.EVENT: tuple(messages.EVENT_KINDS.values()),
    Kind.CMD: tuple(messages.COMMANDS.values()),
    Kind.CMD_REPLY: (messages.CommandReply,),
}

_TAG_FIELDS = frozenset({"kind", "command"})
_BLOCK_RE = re.compile(
    r"(<!-- generated:(?P<name>[a-z]+) -->\n)(?P<body>.*?)(<!-- /generated:(?P=name) -->)",
    re.DOTALL,
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def models_of(kind: Kind) -> list[type[BaseModel]]:
    """The top-level models of `kind` followed by every nested model they use, depth first."""
    seen: list[type[BaseModel]] = []

    def visit(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.append(model)
        for field in model.model_fields.values():
            for nested in _nested_models(field.annotation):
                visit(nested)

    for top in MODELS_BY_KIND[kind]:
        visit(top)
    return seen


def _nested_models(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in getattr(annotation, "__args__", ()) or ():
        yield from _nested_models(arg)


def _type_text(prop: dict[str, Any]) -> str:
    if "x-isocam-type" in prop:
        return str(prop["x-isocam-type"])
    if "anyOf" in prop:
        parts = [_type_text(p) for p in prop["anyOf"] if p.get("type") != "null"]
        return " or ".join(parts)
    if "$ref" in prop:
        name = prop["$ref"].rsplit("/", 1)[-1]
        return "any JSON" if name == "JsonValue" else f"[{name}](#{name.lower()})"
    if "const" in prop:
        return f'`"{prop["const"]}"`' if isinstance(prop["const"], str) else f"`{prop['const']}`"
    if "enum" in prop:
        return " | ".join(f'`"{v}"`' for v in prop["enum"])
    kind = prop.get("type")
    if kind in ("integer", "number") and prop.get("minimum", 0.5) == prop.get("maximum"):
        return f"`{prop['minimum']}`"
    if kind in ("integer", "number"):
        return ("integer" if kind == "integer" else "number") + _range_text(prop)
    if kind == "array":
        bound = f", ≤ {prop['maxItems']}" if "maxItems" in prop else ""
        return f"list of {_type_text(prop.get('items', {}))}{bound}"
    if kind == "object":
        key, value = "string", prop.get("additionalProperties", {})
        if prop.get("patternProperties"):
            ((pattern, value),) = prop["patternProperties"].items()
            key = f"`{pattern.strip('^$')}`"
        bound = f", ≤ {prop['maxProperties']} entries" if "maxProperties" in prop else ""
        return f"object: {key} → {_type_text(value)}{bound}"
    if kind in ("boolean", "string"):
        return str(kind)
    return "any JSON"


def _range_text(prop: dict[str, Any]) -> str:
    def num(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    low = f"{num(prop['minimum'])} ≤ " if "minimum" in prop else ""
    high = ""
    if "maximum" in prop:
        high = f" ≤ {num(prop['maximum'])}"
    elif "exclusiveMaximum" in prop:
        high = f" < {num(prop['exclusiveMaximum'])}"
    return f" ({low}n{high})" if low or high else ""


def _required_text(name: str, prop: dict[str, Any], required: set[str]) -> str:
    # Tags (`kind`, `command`) have a default for Python callers but must be on the wire.
    if name in required or name == "v" or (name in _TAG_FIELDS and "const" in prop):
        return "yes"
    default = prop.get("default")
    if default is None or default in ([], {}):
        return "no"
    shown = str(default).lower() if isinstance(default, bool) else str(default)
    return f"no (default `{shown}`)"


def model_table(model: type[BaseModel]) -> str:
    """One model's fields as a markdown table: field, type, required, meaning."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    rows = ["| field | type | required | meaning |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        rows.append(
            f"| `{name}` | {_cell(_type_text(prop))} | {_required_text(name, prop, required)} "
            f"| {_cell(prop.get('description', ''))} |"
        )
    return "\n".join(rows)


def _doc_line(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def render_messages() -> str:
    """Field tables of every message, grouped by topic kind."""
    out: list[str] = []
    for kind in Kind:
        out.append(f"### `{kind.value}`\n")
        for model in models_of(kind):
            tag = ""
            for field in _TAG_FIELDS & set(model.model_fields):
                default = model.model_fields[field].default
                if isinstance(default, str):
                    tag = f' — `{field}: "{default}"`'
            out.append(f'<a id="{model.__name__.lower()}"></a>\n')
            out.append(f"#### {model.__name__}{tag}\n")
            out.append(f"{_doc_line(model)}\n")
            out.append(model_table(model) + "\n")
    return "\n".join(out)


def render_topics() -> str:
    """The topic table: name, publisher, QoS, retained, payload models."""
    rows = [
        "| kind | topic | publisher | QoS | retained | payload |",
        "|---|---|---|---|---|---|",
    ]
    for kind, policy in POLICIES.items():
        payload = ", ".join(f"[{m.__name__}](#{m.__name__.lower()})" for m in MODELS_BY_KIND[kind])
        rows.append(
            f"| `{kind.value}` | `{ROOT}/{{site_id}}/{kind.value}` | {policy.publisher} "
            f"| {policy.qos} | {'yes' if policy.retain else 'no'} | {payload} |"
        )
    return "\n".join(rows) + "\n"


def render_reasons() -> str:
    """The reject reasons of `decode`."""
    rows = ["| reason | meaning |", "|---|---|"]
    rows += [f"| `{r}` | {_cell(text)} |" for r, text in messages.REASONS.items()]
    return "\n".join(rows) + "\n"


def render_types() -> str:
    """The glossary of named field types."""
    rows = ["| type | meaning |", "|---|---|"]
    rows += [f"| {label} | {_cell(text)} |" for label, text in messages.TYPE_GLOSSARY.items()]
    return "\n".join(rows) + "\n"


RENDERERS: dict[str, Callable[[], str]] = {
    "topics": render_topics,
    "reasons": render_reasons,
    "types": render_types,
    "messages": render_messages,
}


def update(text: str) -> str:
    """`text` with every generated block replaced by fresh output; unknown blocks are an error."""
    missing = set(RENDERERS)

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in RENDERERS:
            raise ValueError(f"unknown generated block {name!r}; known: {', '.join(RENDERERS)}")
        missing.discard(name)
        return f"{match[1]}{RENDERERS[name]()}{match[4]}"

    result = _BLOCK_RE.sub(replace, text)
    if missing:
        raise ValueError(f"document lacks generated block(s): {', '.join(sorted(missing))}")
    return result


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or `--check`) the generated blocks of a protocol document."""
    parser = argparse.ArgumentParser(prog="python -m sitelink.protocol_doc", description=__doc__)
    parser.add_argument("path", type=Path, help="the document, e.g. docs/protocol.md")
    parser.add_argument("--check", action="store_true", help="fail if the blocks are stale")
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    try:
        fresh = update(text)
    except ValueError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 2
    if fresh == text:
        return 0
    if args.check:
        print(
            f"{args.path}: generated blocks are stale; run python -m sitelink.protocol_doc "
            f"{args.path}",
            file=sys.stderr,
        )
        return 1
    args.path.write_text(fresh, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
