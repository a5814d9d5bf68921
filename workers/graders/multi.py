"""`multi`: named sub-graders, each grading the whole batch, combined per sample by the
`calculate_output` formula over their names.

The formula is evaluated by the simpleeval library (never Python's eval) with the contract's
operators and functions only. `^` is power with the precedence people write it with: it binds
tighter than unary minus and * /, and groups to the right (2 + 3 ^ 2 is 11, -2 ^ 2 is -4,
2 ^ 3 ^ 2 is 512): the formula's `^` tokens become `**` before parsing, which Python's grammar
gives exactly that precedence (its own `^`, exclusive or, binds looser than +).

A sample whose formula cannot be evaluated (log(0), a division by zero, an overflow, a result
that is not finite) gets reward 0 and the error; so does a sample one of whose sub-graders
failed (the sub-grader's error, named). The sub-graders' rewards are kept either way.
"""

import ast
import io
import math
import operator
import tokenize

from simpleeval import InvalidExpression, NumberTooHigh, SimpleEval, safe_power

from service.contract.graders import FORMULA_FUNCTIONS, MultiGrader
from workers.graders.base import (
    BUILDERS,
    Grade,
    GradeError,
    GradingContext,
    Sample,
    merged_usage,
    register,
)

OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: safe_power,  # the formula's ^ (see power_syntax); simpleeval caps huge exponents
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
FUNCTIONS = {
    "min": min,
    "max": max,
    "abs": abs,
    "floor": math.floor,
    "ceil": math.ceil,
    "exp": math.exp,
    "sqrt": math.sqrt,
    "log": math.log,
}
assert set(FUNCTIONS) == set(FORMULA_FUNCTIONS), "the contract's functions, exactly"
ARITHMETIC = (ArithmeticError, ValueError, NumberTooHigh)  # log(0), 1/0, exp(1000), 10^10^10


def power_syntax(formula: str) -> str:
    """The formula with its `^` operators written `**` (tokens, so nothing else changes)."""
    tokens = [
        (tok.type, "**" if tok.type == tokenize.OP and tok.string == "^" else tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(formula).readline)
    ]
    return tokenize.untokenize(tokens)


class Formula:
    def __init__(self, text: str) -> None:
        self.text = text
        self.evaluator = SimpleEval(operators=OPERATORS, functions=FUNCTIONS)
        self.parsed = self.evaluator.parse(power_syntax(text).strip())

    def value(self, names: dict[str, float]) -> float:
        """The formula's value; ArithmeticError/ValueError (the numbers) or InvalidExpression
        (the formula) when there is none."""
        self.evaluator.names = names
        result = self.evaluator.eval(self.text, previously_parsed=self.parsed)
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise InvalidExpression(f"the formula gives {result!r}, not a number")
        result = float(result)
        if not math.isfinite(result):
            raise ValueError(f"the formula's value is {result}")
        return result


class Multi:
    def __init__(self, spec: MultiGrader, context: GradingContext) -> None:
        self.formula = Formula(spec.calculate_output)
        # Every kind is registered by now: workers/graders/registry.py imports them all.
        self.graders = {
            name: BUILDERS[sub.type](sub, context) for name, sub in spec.graders.items()
        }

    def grade(self, pairs: list[tuple[Sample, dict]]) -> list[Grade]:
        parts = {name: grader.grade(pairs) for name, grader in self.graders.items()}
        return [self._combine({name: g[i] for name, g in parts.items()}) for i in range(len(pairs))]

    def _combine(self, parts: dict[str, Grade]) -> Grade:
        subs = {name: g.reward for name, g in parts.items()}
        usage = sum(g.token_usage for g in parts.values())
        models = [g.model for g in parts.values() if g.model]
        grade = Grade(
            0.0,
            sub_rewards=subs,
            token_usage=usage,
            model=models[0] if models else None,
            usage=merged_usage(list(parts.values())),
        )
        if failed := next(((n, g) for n, g in parts.items() if g.error is not None), None):
            name, sub = failed
            grade.error, grade.detail = sub.error, f"{name}: {sub.detail}"
            return grade
        try:
            grade.reward = self.formula.value(subs)
        except ARITHMETIC as exc:
            grade.error = GradeError.OTHER
            grade.detail = f"calculate_output {self.formula.text!r}: {type(exc).__name__}: {exc}"
        except (InvalidExpression, TypeError, SyntaxError) as exc:
            grade.error = GradeError.FORMULA_PARSE
            grade.detail = f"calculate_output {self.formula.text!r}: {type(exc).__name__}: {exc}"
        return grade


@register("multi")
def build_multi(spec: MultiGrader, context: GradingContext) -> Multi:
    return Multi(spec, context)
