"""Rendering a grader's `{{ }}` templates for one (sample, item).

Templates render with the options of the contract's sandboxed environment (service.contract.
graders `template_environment`), refusing besides a value too big to hold, and show values as
people who wrote them expect: a string as it is, anything else (a number, true/false, null, an
object or a list) as JSON. `item.<field>` names the row's field even where a mapping has a
method of that name (`item.items`, `item.values`).

A template that names a field the row (or the sample) lacks is that sample's error, never an
exception out of grading: INVALID_VARIABLE, or SAMPLE_PARSE when it names `sample.output_json`
and the completion is not JSON.
"""

import json
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from service.contract.graders import template_environment
from workers.graders.base import Grade, GradeError, Sample

MAX_RENDERED = 1_000_000  # characters of one rendered template: more is the user's error
MAX_EXPONENT = 10_000


class TemplateFailure(Exception):
    """A template could not be rendered for a sample: the Grade that sample gets."""

    def __init__(self, error: GradeError, detail: str) -> None:
        super().__init__(detail)
        self.error, self.detail = error, detail

    def grade(self) -> Grade:
        return Grade.failed(self.error, self.detail)


class Fields(Mapping):
    """A row or sample namespace in a template: `fields.name` is the field `name` first (a
    plain dict would give its method `items` for `item.items`), and it is immutable, so the
    sandbox lets a template read a field whatever its name."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_data", data)

    def __getattribute__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name in data:
            return data[name]
        return object.__getattribute__(self, name)

    def __getitem__(self, key: str) -> Any:
        return object.__getattribute__(self, "_data")[key]

    def __iter__(self) -> Iterator[str]:
        return iter(object.__getattribute__(self, "_data"))

    def __len__(self) -> int:
        return len(object.__getattribute__(self, "_data"))


def plain(fields: Fields) -> Mapping[str, Any]:
    """The data under `fields` (not a method: a field could have any name)."""
    return object.__getattribute__(fields, "_data")


def as_text(value: Any) -> Any:
    """How a value shows in a rendered template: strings as they are, data as JSON."""
    if isinstance(value, str | jinja2.Undefined):
        return value  # an undefined value raises when shown: the sample's error
    if isinstance(value, Fields):
        value = plain(value)
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not data (a function a template reached): as Jinja shows it
        return value


class RenderingEnvironment(ImmutableSandboxedEnvironment):
    """The contract's sandbox, which also refuses a `*` or `**` that would make a value too big
    to hold (`{{ "x" * 10 ** 10 }}`): one sample's error, not a worker out of memory."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for items, times in ((left, right), (right, left)):
                sized = isinstance(items, str | list | tuple) and isinstance(times, int)
                if sized and len(items) * times > MAX_RENDERED:
                    raise SecurityError(f"a value of {len(items) * times} items is too big")
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"an exponent of {right} is too big")
        return super().call_binop(context, operator, left, right)


@cache
def environment() -> jinja2.Environment:
    """Where templates render: the contract's environment's options, values shown by
    as_text."""
    contract = template_environment()
    return RenderingEnvironment(
        undefined=contract.undefined,
        autoescape=contract.autoescape,
        keep_trailing_newline=contract.keep_trailing_newline,
        finalize=as_text,
    )


def _names_output_json(tree: nodes.Template) -> bool:
    """Whether the template reads sample.output_json (or sample['output_json'])."""
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
        parent = node.node
        if key == "output_json" and isinstance(parent, nodes.Name) and parent.name == "sample":
            return True
    return False


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Template:
    """One template, parsed once and rendered per sample."""

    def __init__(self, text: str) -> None:
        env = environment()
        self.text = text
        self.compiled = env.from_string(text)
        self.needs_json = _names_output_json(env.parse(text))

    def render(self, sample: Sample, item: Mapping[str, Any]) -> str:
        """The template rendered for (sample, item); TemplateFailure says why it cannot be."""
        if self.needs_json and sample.output_json is None and not _is_json(sample.output_text):
            raise TemplateFailure(
                GradeError.SAMPLE_PARSE,
                f"the template {self._shown()} names sample.output_json, and the completion is "
                f"not JSON: {sample.output_text[:200]!r}",
            )
        try:
            text = self.compiled.render(item=Fields(item), sample=Fields(sample.namespace()))
        except jinja2.UndefinedError as exc:
            raise TemplateFailure(
                GradeError.INVALID_VARIABLE,
                f"the template {self._shown()}: {exc.message}; the row's fields are "
                f"{', '.join(sorted(item)) or 'none'}, the sample's "
                f"{', '.join(sample.namespace())}",
            ) from None
        except Exception as exc:  # the user's template failed on this sample's data
            raise TemplateFailure(
                GradeError.OTHER, f"the template {self._shown()}: {type(exc).__name__}: {exc}"
            ) from None
        if len(text) > MAX_RENDERED:
            raise TemplateFailure(
                GradeError.OTHER,
                f"the template {self._shown()} rendered {len(text)} characters, more than "
                f"{MAX_RENDERED}",
            )
        return text

    def _shown(self) -> str:
        return repr(self.text if len(self.text) <= 80 else self.text[:77] + "...")
