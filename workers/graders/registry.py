"""Building a grader from its spec: the one place that imports the grader modules, so that each
registers its kinds (workers.graders.base.BUILDERS) before any grader is built.

A grader module is listed here once it exists; a listed module that this worker does not have
is skipped, and a spec of its kind is then refused with a message naming the kinds it has.
"""

import importlib
import importlib.util
from functools import cache
from typing import Any

from workers.errors import RunError
from workers.graders.base import BUILDERS, Grader, GradingContext

# workers.graders.<module>, each registering its kinds with @register
MODULES = ("text", "multi", "python", "code_tests", "judge")


@cache
def load() -> tuple[str, ...]:
    """Import every grader module there is; the kinds registered."""
    for module in MODULES:
        name = f"workers.graders.{module}"
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    return tuple(sorted(BUILDERS))


def build_grader(spec: Any, context: GradingContext) -> Grader:
    """The grader of `spec` (any grader type of service.contract.graders)."""
    kinds = load()
    try:
        builder = BUILDERS[spec.type]
    except KeyError:
        raise RunError(
            f"this worker cannot grade with a {spec.type!r} grader (it has {', '.join(kinds)})"
        ) from None
    return builder(spec, context)
