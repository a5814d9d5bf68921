"""Building a grader from its spec: the one place that imports the grader modules, so that each
registers its kinds (workers.graders.base.BUILDERS) before any grader is built."""

from typing import Any

from workers.errors import RunError
from workers.graders import code_tests, judge, multi, python, text  # noqa: F401  (register)
from workers.graders.base import BUILDERS, Grader, GradingContext


def build_grader(spec: Any, context: GradingContext) -> Grader:
    """The grader of `spec` (any grader type of service.contract.graders)."""
    try:
        builder = BUILDERS[spec.type]
    except KeyError:
        raise RunError(
            f"this worker cannot grade with a {spec.type!r} grader "
            f"(it has {', '.join(sorted(BUILDERS))})"
        ) from None
    return builder(spec, context)
