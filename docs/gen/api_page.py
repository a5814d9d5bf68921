"""The REST API reference page, written from the app's own OpenAPI document at every build: each
operation (method and path, summary, description, parameters, request body, responses) under
its tag, then every schema the operations use. The run spec has a page of its own."""

import tempfile

from schema_text import (
    alternatives,
    cell,
    default_text,
    prose,
    ref_name,
    row,
    rules_text,
    table,
    type_text,
)

from service.config import Settings
from service.main import create_app

METHODS = ("get", "post", "put", "patch", "delete")
RUN_SPEC = "RunSpec"  # described field by field on its own page
RUN_SPEC_PAGE = "run-spec.md"

INTRO = """\
# REST API

Every operation of the REST API, generated from its OpenAPI document each time the site is
built; a running API serves the same document at `/openapi.json` and an interactive version at
`/docs`. For what the operations are for, with examples, see
[The API, CLI and client](../api.md).

- Each operation takes the project's API key as `Authorization: Bearer <key>`, except the health
  checks, `GET /v1/run-states`, reward callbacks (signed with the run's webhook secret instead)
  and checkpoint downloads through a signed link (`token`).
- Errors are `{"error": {"code", "message", "details"}}`: see
  [Endpoints available now](../api.md#endpoints-available-now).
"""


def openapi_document() -> dict:
    """The app's document. Building the app opens nothing: a throwaway SQLite data directory
    keeps it off any configured database."""
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            data_dir=data_dir,
            database_url=f"sqlite:///{data_dir}/gvpo.db",
            broker_url="filesystem://",
            grpc_port=0,
            reaper_interval_s=0,
        )
        return create_app(settings).openapi()


def operation_anchor(method: str, path: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in f"{method}-{path}".lower())
    return "-".join(part for part in slug.split("-") if part)


def schema_anchor(name: str) -> str:
    return f"schema-{name.lower()}"


def link(name: str) -> str:
    if name == RUN_SPEC:
        return f"[{name}]({RUN_SPEC_PAGE})"
    return f"[{name}](#{schema_anchor(name)})"


def refs_in(node: object) -> set[str]:
    """The schema names a node refers to, anywhere inside it."""
    found, pending = set(), [node]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                found.add(ref_name(item["$ref"]))
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return found


def used_schemas(doc: dict) -> list[str]:
    """The schemas the operations use, and those they use in turn; not the run spec's parts,
    which its own page describes."""
    schemas = doc["components"]["schemas"]
    pending, seen = refs_in(doc["paths"]), set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != RUN_SPEC:
            pending |= refs_in(schemas[name])
    return sorted(seen - {RUN_SPEC})


def fields_table(schema: dict) -> list[str]:
    required = set(schema.get("required", []))
    rows = [
        row(
            f"`{name}`",
            type_text(node, link),
            default_text(node, name in required),
            cell(rules_text(node)),
            cell(node.get("description")),
        )
        for name, node in schema.get("properties", {}).items()
    ]
    return table(("field", "type", "default", "rules", "description"), rows)


def body_text(schema: dict) -> str:
    """A body's schema in a few words: a link to a named schema, else its type."""
    if not schema:
        return "any"
    if "title" in schema and "properties" in schema:  # no schema of its own: its title
        return f"{schema['title']}, an object"
    return type_text(schema, link)


def parameters(op: dict) -> list[str]:
    rows = [
        row(
            f"`{p['name']}`",
            p["in"],
            type_text(p.get("schema", {}), link),
            default_text(p.get("schema", {}), p.get("required", False)),
            cell(rules_text(p.get("schema", {}))),
            cell(p.get("description")),
        )
        for p in op.get("parameters", [])
    ]
    header = ("parameter", "in", "type", "default", "rules", "description")
    return ["**Parameters**", "", *table(header, rows)] if rows else []


def request_body(op: dict) -> list[str]:
    body = op.get("requestBody")
    if not body:
        return []
    lines = ["**Request body**" + (" (required)" if body.get("required") else ""), ""]
    for media, content in body.get("content", {}).items():
        schema = content.get("schema", {})
        lines += [f"`{media}`: {body_text(schema)}", ""]
        if "properties" in schema:  # a body described in place, with no schema of its own
            lines += fields_table(schema)
    return lines


def responses(op: dict) -> list[str]:
    rows = []
    for status, answer in op.get("responses", {}).items():
        bodies = [
            f"`{media}`: {body_text(content.get('schema', {}))}"
            for media, content in answer.get("content", {}).items()
        ]
        rows.append(row(status, cell(answer.get("description")), "; ".join(bodies)))
    return ["**Responses**", "", *table(("status", "description", "body"), rows)]


def operation(method: str, path: str, op: dict) -> list[str]:
    lines = [f"### `{method.upper()} {path}` {{ #{operation_anchor(method, path)} }}", ""]
    lines += [f"**{op.get('summary', '')}**", ""]
    if op.get("description"):
        lines += [prose(op["description"]), ""]
    return lines + parameters(op) + request_body(op) + responses(op)


def schema_section(name: str, schema: dict) -> list[str]:
    lines = [f"### {name} {{ #{schema_anchor(name)} }}", ""]
    if schema.get("description"):
        lines += [prose(schema["description"]), ""]
    if "properties" in schema:
        return lines + fields_table(schema)
    choices = alternatives(schema)
    kind = type_text(schema, link) if "enum" not in schema else schema.get("type", "any")
    said = rules_text(schema) if "enum" in schema or len(choices) > 1 else ""
    return [*lines, f"{kind}" + (f": {said}" if said else ""), ""]


def api_markdown() -> str:
    doc = openapi_document()
    by_tag: dict[str, list[str]] = {}
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                tag = (item[method].get("tags") or ["other"])[0]
                by_tag.setdefault(tag, []).extend(operation(method, path, item[method]))
    lines = [INTRO]
    for tag, ops in by_tag.items():
        lines += [f"## {tag.capitalize()} {{ #tag-{tag} }}", "", *ops]
    lines += ["## Schemas { #schemas }", ""]
    schemas = doc["components"]["schemas"]
    for name in used_schemas(doc):
        lines += schema_section(name, schemas[name])
    return "\n".join(lines)
