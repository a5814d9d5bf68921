"""The run-spec reference page, written from RunSpec's JSON Schema at every build, so that it
always says what the API checks: one table per object of the spec (every field's path, type,
default, bounds and description), each choice of a discriminated union (`reward` by its `type`)
on its own, and the parameters of every built-in reward. It imports the contract package only."""

from dataclasses import dataclass

from pydantic.json_schema import GenerateJsonSchema
from schema_text import (
    alternatives,
    cell,
    default_text,
    nullable,
    prose,
    ref_name,
    row,
    rules_text,
    table,
    type_text,
)

from service.contract.environments import BUILTIN_ENVIRONMENTS
from service.contract.rewards import BUILTIN_REWARDS
from service.contract.spec import RunSpec

HEADER = ("field", "type", "default", "rules", "description")
BUILTIN_ANCHOR = "built-in-rewards"
ENV_ANCHOR = "built-in-environments"

INTRO = """\
# Run spec fields

Every field of the run spec, the body of `POST /v1/runs` (YAML or JSON for `gvpo submit`). This
page is generated from the spec's schema (`service/contract/spec.py` and
`service/contract/rewards.py`) each time the site is built, so it is what the API checks.

- `model`, `dataset` and `reward` are required; every other field has the default shown.
- Unknown fields are refused, numbers must be finite, and no text may hold the NUL character:
  each problem is a 422 that names the field.
- Rules between fields (`training.mini_batches` ≤ `training.prompts_per_step`, say) and what
  the service checks at submission (files, models, processes) are in
  [The run spec](../run-spec.md).
"""


class _FactoryDefaults(GenerateJsonSchema):
    """Pydantic leaves out of the schema a default made by a factory (`sampling.stop`'s `[]`, a
    section's own defaults); a reference should show it."""

    def get_default_value(self, schema):
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()
        return super().get_default_value(schema)


def schema_of(model) -> dict:
    return model.model_json_schema(schema_generator=_FactoryDefaults)


def anchor(path: str, variant: str | None = None) -> str:
    base = path.replace("[]", "-items").replace(".", "-")
    return f"{base}-{variant}" if variant else base


@dataclass
class _Object:
    """An object of the spec to describe in a section of its own."""

    path: str  # `model.lora`, `reward.components[]`
    schema: dict
    variant: str | None  # the discriminator's value, for a choice of a union

    @property
    def anchor(self) -> str:
        return anchor(self.path, self.variant)

    @property
    def heading(self) -> str:
        return f"`{self.path}`" + (f" with `type: {self.variant}`" if self.variant else "")


class RunSpecPage:
    def __init__(self) -> None:
        self.schema = schema_of(RunSpec)
        self.defs = self.schema["$defs"]

    def resolve(self, node: dict) -> dict:
        return self.defs[ref_name(node["$ref"])] if "$ref" in node else node

    def objects_in(self, path: str, node: dict) -> list[_Object]:
        """The objects a field holds, directly or as a list's items, one per union choice."""
        found = []
        for choice in alternatives(node):
            if choice.get("type") == "array" and "items" in choice:
                found += self.objects_in(f"{path}[]", choice["items"])
                continue
            target = self.resolve(choice)
            if "properties" in target:
                kind = target["properties"].get("type", {}).get("const")
                variant = kind if len(alternatives(node)) > 1 else None
                found.append(_Object(path, target, variant))
        return found

    def field_type(self, path: str, node: dict) -> str:
        """A field's type, with its objects as links to their sections."""
        objects = self.objects_in(path, node)
        if not objects:
            return type_text(node, str)
        kind = " or ".join(f"[{o.variant or 'object'}](#{o.anchor})" for o in objects)
        if any(c.get("type") == "array" for c in alternatives(node)):
            kind = f"list of {kind}"
        return f"{kind} or null" if nullable(node) else kind

    def rows(self, path: str, schema: dict) -> tuple[list[str], list[_Object]]:
        """A table row per field of an object, and the objects those fields hold."""
        rows, nested = [], []
        required = set(schema.get("required", []))
        for name, node in schema.get("properties", {}).items():
            field = f"{path}.{name}" if path else name
            rows.append(
                row(
                    f"`{field}`",
                    self.field_type(field, node),
                    default_text(node, name in required),
                    cell(rules_text(node)),
                    cell(node.get("description")),
                )
            )
            nested += self.objects_in(field, node)
        return rows, nested

    def sections(self, objects: list[_Object], level: int) -> list[str]:
        """Each object's section; the choices of a union under one heading for their field."""
        lines, said = [], set()
        for obj in objects:
            if obj.variant is None:
                lines += self.section(obj, level)
                continue
            if obj.path not in said:
                said.add(obj.path)
                lines += [
                    f"{'#' * level} `{obj.path}` {{ #{anchor(obj.path)} }}",
                    "",
                    "One of the following, chosen by its `type`.",
                    "",
                ]
            lines += self.section(obj, min(level + 1, 6))
        return lines

    def section(self, obj: _Object, level: int) -> list[str]:
        rows, nested = self.rows(obj.path, obj.schema)
        lines = [f"{'#' * level} {obj.heading} {{ #{obj.anchor} }}", ""]
        if obj.schema.get("description"):
            lines += [prose(obj.schema["description"]), ""]
        lines += table(HEADER, rows)
        if obj.variant == "builtin" and obj.path.startswith("reward"):
            lines += [
                f"`params` depends on `name`: see [Built-in rewards](#{BUILTIN_ANCHOR}).",
                "",
            ]
        elif obj.variant == "builtin":
            lines += [
                f"`params` depends on `name`: see [Built-in environments](#{ENV_ANCHOR}).",
                "",
            ]
        return lines + self.sections(nested, min(level + 1, 6))

    def builtin_rewards(self) -> list[str]:
        lines = [
            f"## Built-in rewards {{ #{BUILTIN_ANCHOR} }}",
            "",
            "`reward.name` (or a composite component's `name`) is one of these, and `params` "
            "holds that reward's parameters; any other key is refused. What each one computes: "
            "[Rewards](../rewards.md).",
            "",
        ]
        return lines + self.params_tables("reward", BUILTIN_REWARDS)

    def builtin_environments(self) -> list[str]:
        lines = [
            f"## Built-in environments {{ #{ENV_ANCHOR} }}",
            "",
            "`environment.name` (with `type: builtin`) is one of these, and `params` holds that "
            "environment's parameters; any other key is refused. What each one does: "
            "[Chat data and episodes](../episodes.md).",
            "",
        ]
        return lines + self.params_tables("environment", BUILTIN_ENVIRONMENTS)

    def params_tables(self, part: str, builtins: dict) -> list[str]:
        lines = []
        for name, params in builtins.items():
            schema = schema_of(params)
            lines += [f"### `{name}` {{ #{part}-{name.replace('_', '-')} }}", ""]
            if not schema.get("properties"):
                lines += ["No parameters: `params` is `{}` or left out.", ""]
                continue
            rows, _ = self.rows(f"{part}.params", schema)
            lines += table(HEADER, rows)
        return lines

    def markdown(self) -> str:
        top_rows, sections = self.rows("", self.schema)
        lines = [INTRO, "## Top level { #top-level }", "", *table(HEADER, top_rows)]
        lines += self.sections(sections, 2)
        return "\n".join(lines + self.builtin_rewards() + self.builtin_environments())
