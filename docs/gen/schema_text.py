"""How a JSON Schema node reads in a reference table: its type, its rules (bounds, choices,
patterns), its default, and description text made safe for a Markdown table cell. Shared by the
run-spec page and the API page, so both say a bound the same way."""

import json
import re
from collections.abc import Callable

# A schema's name -> Markdown for it (a link to where it is described).
Linker = Callable[[str], str]

_CODE_SPAN = re.compile(r"(`[^`]*`)")


def ref_name(ref: str) -> str:
    """`#/$defs/ModelSpec` or `#/components/schemas/RunRead` -> `ModelSpec`, `RunRead`."""
    return ref.rsplit("/", 1)[-1]


def prose(text: str | None) -> str:
    """Description text as Markdown. Descriptions are Markdown already (OpenAPI's convention),
    but text such as `reward/<label>/mean` outside a code span would be read as an HTML tag."""
    if not text:
        return ""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "".join(parts)


def cell(text: str | None) -> str:
    """Description text for one table cell: one line, and a `|` does not end the cell."""
    parts = _CODE_SPAN.split(prose(" ".join((text or "").split())))
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|")
    return "".join(parts)


def code(value: object) -> str:
    """A JSON value as inline code: `null`, `"auto"`, `[]`."""
    text = json.dumps(value, ensure_ascii=False)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def alternatives(node: dict) -> list[dict]:
    """The non-null choices of a node: `T | None` reads as T (nullable is said apart)."""
    choices = node.get("anyOf") or node.get("oneOf") or [node]
    flat = []  # a nullable union (`environment`) nests the union's choices one level down
    for c in choices:
        flat += alternatives(c) if c is not node and ("oneOf" in c or "anyOf" in c) else [c]
    return [c for c in flat if c.get("type") != "null"]


def nullable(node: dict) -> bool:
    return any(c.get("type") == "null" for c in node.get("anyOf") or node.get("oneOf") or [])


def type_text(node: dict, link: Linker) -> str:
    """`integer`, `list of string`, `string or list of string`, a link to a named schema."""
    if "$ref" in node:
        return link(ref_name(node["$ref"]))
    if "anyOf" in node or "oneOf" in node:
        text = " or ".join(type_text(c, link) for c in alternatives(node))
        return f"{text} or null" if nullable(node) else text
    kind = node.get("type")
    if kind == "array":
        items = node.get("items")
        return f"list of {type_text(items, link)}" if items else "list"
    if kind == "object" and node.get("properties"):  # described in place, not by name
        return "object with " + ", ".join(f"`{name}`" for name in node["properties"])
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of string to {type_text(node['additionalProperties'], link)}"
    if isinstance(kind, list):
        return " or ".join(kind)
    if node.get("format") == "password":
        return f"{kind} (secret)"
    if node.get("format"):
        return f"{kind} ({node['format']})"
    return kind or "any"


def _number(value: float) -> str:
    """1,000,000 and 10,000 (a float bound that is whole), 0.95 and 1e-06 as they are."""
    whole = isinstance(value, int) or (value.is_integer() and abs(value) < 1e15)
    return f"{int(value):,}" if whole else f"{value:g}"


def _bounds(node: dict) -> list[str]:
    """One node's own rules, in the order a reader checks them."""
    said = []
    if "const" in node:
        said.append(f"always {code(node['const'])}")
    if "enum" in node:
        said.append("one of " + ", ".join(code(v) for v in node["enum"]))
    for key, sign in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("exclusiveMaximum", "<"),
    ):
        if key in node:
            said.append(f"{sign} {_number(node[key])}")
    for lo, hi, unit in (
        ("minLength", "maxLength", "characters"),
        ("minItems", "maxItems", "items"),
    ):
        if lo in node and hi in node:
            said.append(f"{_number(node[lo])}–{_number(node[hi])} {unit}")
        elif hi in node:
            said.append(f"at most {_number(node[hi])} {unit}")
        elif lo in node:
            said.append(f"at least {_number(node[lo])} {unit}")
    if "pattern" in node:
        said.append(f"matches `{node['pattern']}`")
    return said


def rules_text(node: dict) -> str:
    """Every rule the schema states for a value: its bounds, and those of a list's items."""
    # A bound beside a union's choices (pydantic puts a Field's max_length there) holds too.
    said = _bounds(node) if "anyOf" in node or "oneOf" in node else []
    for choice in alternatives(node):
        said += _bounds(choice)
        items = choice.get("items")
        if choice.get("type") == "array" and items and "$ref" not in items:
            said += [f"each {rule}" for choice in alternatives(items) for rule in _bounds(choice)]
    return "; ".join(dict.fromkeys(said))  # in order, once each


def default_text(node: dict, required: bool) -> str:
    """`**required**`, the default as JSON, or what a whole section defaults to."""
    if required:
        return "**required**"
    if "default" not in node:
        return ""
    default = node["default"]
    if isinstance(default, dict) and default:
        return "each field's default"
    return code(default)


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def table(header: tuple[str, ...], rows: list[str]) -> list[str]:
    return [row(*header), row(*("---" for _ in header)), *rows, ""]
