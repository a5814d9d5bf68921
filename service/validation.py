"""pydantic's validation errors in the words of the document the client wrote: each bad field
named by its key path, once, with pydantic's message; an unknown field with the closest field
of that level it may have meant. REST, gRPC and the CLI show what this makes."""

import difflib
import types
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

SOURCES = ("body", "query", "path", "header")  # FastAPI's first location part
_ABSENT = object()  # a key the document does not have
# pydantic's own words in front of a validator's message
_LIBRARY_PREFIXES = ("Value error, ", "Assertion failed, ")
_SHOULD = "Input should be "


def field_name(loc: tuple, body: object) -> str:
    """A pydantic error location as the client wrote the field: ("body", "algorithm", "beta")
    (FastAPI) or ("algorithm", "beta") (a validated document) -> "algorithm.beta".

    pydantic also puts the branches of a union into the location: the tag of a tagged union
    (reward: {type: builtin, ...}), and the type of each branch a value failed (a target_modules
    of 5 is neither "str" nor "list[str]"). They are dropped, so that the name is a key path in
    the submitted document.
    """
    source = loc[0] if loc and loc[0] in SOURCES else None
    named, node = [], body if source in (None, "body") else _ABSENT
    for part in loc[1:] if source else loc:
        if isinstance(node, dict):
            if part not in node and node.get("type") == part:
                continue  # the tag of a tagged union
            named.append(str(part))
            node = node.get(part, _ABSENT)
        elif isinstance(node, list) and isinstance(part, int):
            named.append(str(part))
            node = node[part] if part < len(node) else _ABSENT
        elif node is _ABSENT:
            named.append(str(part))
        # else a value no key leads into: `part` names a branch of a union type
    return ".".join(named) or "body"


def describe(errors: Iterable[dict[str, Any]], body: object, model: Any = None) -> list[dict]:
    """[{"field", "message"}] for pydantic's `errors` about `body`, one entry per field: the
    messages of a value that fits no branch of a union are joined. `model` (the type `body` was
    validated as) lets an unknown field be answered with the field it is closest to."""
    fields: dict[str, list[str]] = {}
    for error in errors:
        loc = tuple(error["loc"])
        if error["type"] == "extra_forbidden":
            message = _unknown_field(loc, model)
        else:
            message = error["msg"]
            for prefix in _LIBRARY_PREFIXES:
                message = message.removeprefix(prefix)
        said = fields.setdefault(field_name(loc, body), [])
        if message not in said:
            said.append(message)
    return [{"field": name, "message": _either(said)} for name, said in fields.items()]


def _either(messages: list[str]) -> str:
    """'Input should be a valid string or a valid list', not the same words twice."""
    if len(messages) > 1 and all(m.startswith(_SHOULD) for m in messages):
        return _SHOULD + " or ".join(m.removeprefix(_SHOULD) for m in messages)
    return ", or ".join(messages)


def _unknown_field(loc: tuple, model: Any) -> str:
    parts = loc[1:] if loc and loc[0] in SOURCES else loc
    if not parts or model is None:
        return "unknown field"
    known = sorted(_fields_at(model, parts[:-1]))
    close = difflib.get_close_matches(str(parts[-1]), known, n=1)
    if close:
        return f"unknown field (did you mean {close[0]}?)"
    if known:
        return f"unknown field (the fields here: {', '.join(known)})"
    return "unknown field"


def _fields_at(model: Any, path: tuple) -> set[str]:
    """The field names of the models that `path` (a pydantic location, union tags and branch
    names included) leads to from `model`."""
    level = [model]
    for part in path:
        level = [inner for outer in level for inner in _inside(outer, part)]
    return {name for t in level for m in _branches(t) if _is_model(m) for name in m.model_fields}


def _inside(annotation: Any, part: Any) -> list[Any]:
    """The types `part` of a location leads to from a value of type `annotation`."""
    found = []
    for t in _branches(annotation):
        args = get_args(t)
        if _is_model(t):
            if part in t.model_fields:
                found.append(t.model_fields[part].annotation)
            elif part == t.__name__ or part in _tags(t):
                found.append(t)  # a branch of a union, named by its tag or its class
        elif isinstance(part, int) and get_origin(t) in (list, tuple, set, frozenset) and args:
            found.append(args[0])
        elif get_origin(t) is dict and len(args) == 2:
            found.append(args[1])
    return found


def _branches(annotation: Any) -> list[Any]:
    """`annotation` without Annotated, split into the branches of a union."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _branches(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [b for arg in get_args(annotation) for b in _branches(arg)]
    return [annotation]


def _tags(model: type[BaseModel]) -> set[Any]:
    """The values a Literal field of `model` may take (a tagged union's tag is one)."""
    return {
        value
        for field in model.model_fields.values()
        for t in _branches(field.annotation)
        if get_origin(t) is Literal
        for value in get_args(t)
    }


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)
