"""OpenAI's graders as reward types: the same `type` names, fields and `{{ }}` templates, so that a
reinforcement fine-tuning job's grader runs here unchanged; plus `code_tests`, which runs the
completion's code against the row's tests (TACO/APPS style).

Both sides read these models: the API validates a grader when a run, a fine-tuning job or
`/v1/graders:validate` names one (templates parse, formulas name only known graders and
functions, Python source compiles and defines `grade`); the worker grades with them
(workers/graders). Fields that are ours and not OpenAI's are marked "(ours)" in their
descriptions.

Templates are Jinja expressions over two namespaces: `item` (the dataset row's fields, other
than its messages and tools) and `sample` (`output_text`, `output_json`: the completion parsed
as JSON, or null; `output_tools`: its tool calls).
"""

import ast
from functools import cache
from typing import Annotated, Any, Literal

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import Field, field_validator, model_validator

from service.contract.limits import INT32_MAX, MAX_TEXT, Strict

MAX_TEMPLATE = 100_000  # characters of one template
MAX_SOURCE = 256 * 1024  # a python grader's source: OpenAI's limit
MAX_FORMULA = 1_000
MAX_SUB_GRADERS = 32
MAX_JUDGE_MESSAGES = 64
SERVED_PREFIXES = ("ckpt_", "run_")  # a judge model that this service serves
NAMESPACES = ("item", "sample")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools")

# calculate_output: the operators and functions OpenAI documents for a multi grader.
FORMULA_OPERATORS = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.BitXor: "^",  # power, as in OpenAI's formulas (not Python's exclusive or)
    ast.USub: "-",
    ast.UAdd: "+",
}
FORMULA_FUNCTIONS = ("min", "max", "abs", "floor", "ceil", "exp", "sqrt", "log")

TEXT_SIMILARITY_METRICS = (
    "cosine",
    "fuzzy_match",
    "bleu",
    "gleu",
    "meteor",
    "rouge_1",
    "rouge_2",
    "rouge_3",
    "rouge_4",
    "rouge_5",
    "rouge_l",
)

Name = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


@cache
def template_environment() -> ImmutableSandboxedEnvironment:
    """The one Jinja environment templates are parsed and rendered in: sandboxed (no attribute
    of Python objects beyond the data), and an unknown field is an error, not empty text."""
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


def check_template(text: str) -> str:
    """ValueError unless `text` parses and names no variable but `item` and `sample`."""
    env = template_environment()
    try:
        tree = env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"template does not parse (line {exc.lineno}): {exc.message}") from None
    unknown = sorted(meta.find_undeclared_variables(tree) - set(NAMESPACES))
    if unknown:
        raise ValueError(
            f"template names {', '.join(unknown)}; templates may name only "
            f"{' and '.join(NAMESPACES)} (e.g. {{{{ item.answer }}}}, {{{{ sample.output_text }}}})"
        )
    return text


Template = Annotated[str, Field(max_length=MAX_TEMPLATE)]


class _Grader(Strict):
    name: Name | None = Field(
        None, description="the grader's name (metrics: reward/<name>/mean); default: its type"
    )


class StringCheckGrader(_Grader):
    """1.0 when the rendered input and reference compare as `operation` says, else 0.0: `eq`,
    `ne`, `like` (the reference occurs in the input), `ilike` (the same, ignoring case)."""

    type: Literal["string_check"]
    input: Template = Field(description="template, e.g. {{ sample.output_text }}")
    reference: Template = Field(description="template, e.g. {{ item.answer }}")
    operation: Literal["eq", "ne", "like", "ilike"]

    _templates = field_validator("input", "reference")(check_template)


class EmbeddingEndpoint(Strict):
    """(ours) Where `cosine` gets its embeddings: any OpenAI-compatible /v1/embeddings."""

    base_url: str = Field(min_length=1, max_length=2048, description="e.g. https://host/v1")
    model: Name
    api_key_env: Name | None = Field(
        None, description="the worker's environment variable that holds the endpoint's key"
    )


class TextSimilarityGrader(_Grader):
    """The similarity of the rendered input to the reference, in [0, 1], by a metric."""

    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: Literal[TEXT_SIMILARITY_METRICS]  # type: ignore[valid-type]
    embeddings: EmbeddingEndpoint | None = Field(
        None,
        description="(ours) for `cosine`, which compares embeddings: the endpoint that makes "
        "them (this service hosts no embedding model)",
    )

    _templates = field_validator("input", "reference")(check_template)

    @model_validator(mode="after")
    def _cosine_needs_embeddings(self) -> "TextSimilarityGrader":
        if self.evaluation_metric == "cosine" and self.embeddings is None:
            raise ValueError(
                "evaluation_metric cosine compares embeddings, and this service hosts no "
                "embedding model: give `embeddings` {base_url, model, api_key_env} of an "
                "OpenAI-compatible /v1/embeddings endpoint, or choose another metric"
            )
        if self.evaluation_metric != "cosine" and self.embeddings is not None:
            raise ValueError("`embeddings` is only for evaluation_metric cosine")
        return self


class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: Template

    _template = field_validator("text")(check_template)


class JudgeMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Template | Annotated[list[TextPart], Field(min_length=1, max_length=64)] = Field(
        description="a template, or text parts (images and audio are refused: text models only)"
    )
    type: Literal["message"] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        parts = v if isinstance(v, list) else []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_image", "input_audio"):
                raise ValueError(f"{kind} content is not supported: judges here are text models")
        if isinstance(v, str):
            check_template(v)
        return v


class SamplingParams(Strict):
    max_completions_tokens: int | None = Field(None, ge=1, le=1_048_576)
    reasoning_effort: str | None = Field(
        None, max_length=32, description="accepted; ignored unless the judge's server uses it"
    )
    seed: int | None = Field(None, ge=0, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)


class ScoreModelGrader(_Grader):
    """An LLM judge: the messages, rendered, go to `model`; the score it answers (a number, or
    JSON with `result`), within `range`, is the reward."""

    type: Literal["score_model"]
    model: Name = Field(
        description="ckpt_… or run_… of this project (served by our inference workers), or a "
        "model name at `base_url`"
    )
    input: list[JudgeMessage] = Field(min_length=1, max_length=MAX_JUDGE_MESSAGES)
    range: list[float] = Field(
        default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2, description="[low, high]"
    )
    sampling_params: SamplingParams | None = None
    base_url: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="(ours) any OpenAI-compatible endpoint, e.g. https://host/v1; without it, "
        "`model` is one of this project's checkpoints or runs",
    )
    api_key_env: Name | None = Field(
        None, description="(ours) the worker's environment variable that holds base_url's key"
    )
    max_attempts: int = Field(3, ge=1, le=20, description="(ours) tries per sample")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="(ours) per try")

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: list[float]) -> list[float]:
        if not v[0] < v[1]:
            raise ValueError(f"range must be [low, high] with low < high; got {v}")
        return v

    @model_validator(mode="after")
    def _key_needs_url(self) -> "ScoreModelGrader":
        if self.api_key_env and not self.base_url:
            raise ValueError("api_key_env is for base_url; our own models need no key here")
        if not self.base_url and not self.model.startswith(SERVED_PREFIXES):
            raise ValueError(
                f"model {self.model!r} is not one of this service's models (a checkpoint "
                "ckpt_… or a run run_… of this project): to judge with another model, give "
                "base_url (an OpenAI-compatible endpoint that serves it) and api_key_env"
            )
        return self


def _defines_grade(source: str) -> str:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(f"source does not compile (line {exc.lineno}): {exc.msg}") from None
    grade = [
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "grade"
    ]
    if not grade or isinstance(grade[-1], ast.AsyncFunctionDef):
        raise ValueError("source must define `def grade(sample, item) -> float` at top level")
    if len(grade[-1].args.args) < 2 and grade[-1].args.vararg is None:
        raise ValueError("grade must take two arguments: grade(sample, item)")
    return source


class PythonGrader(_Grader):
    """User source defining `grade(sample, item) -> float`, run in a sandbox (no network, a
    read-only file system, CPU, memory, process and time limits)."""

    type: Literal["python"]
    source: str = Field(min_length=1, max_length=MAX_SOURCE)
    image_tag: str | None = Field(
        None,
        max_length=MAX_TEXT,
        description="accepted for OpenAI's bodies; the code runs on the worker's own Python",
    )
    timeout_s: float = Field(10.0, gt=0, le=120, description="(ours) wall time of one grading")
    memory_mb: int = Field(1024, ge=64, le=16_384, description="(ours) address space")

    _source = field_validator("source")(_defines_grade)


class CodeTestsGrader(_Grader):
    """(ours) Run the completion's program against the row's tests, TACO/APPS style: the share of
    tests passed (`fraction`) or 1.0 only when all pass (`all`). The row field `tests` holds
    either {"inputs": [...], "outputs": [...]} (stdin/stdout pairs; with "fn_name", calls of that
    function with those arguments) or a list of assert statements; as an object or a JSON
    string. The program is the rendered `code`: its last fenced code block when it has one."""

    type: Literal["code_tests"]
    code: Template = Field("{{ sample.output_text }}", description="the program (a template)")
    tests_field: Name = Field("tests", description="the row field that holds the tests")
    scoring: Literal["fraction", "all"] = "fraction"
    timeout_s: float = Field(4.0, gt=0, le=60, description="wall time of one test")
    memory_mb: int = Field(512, ge=64, le=16_384, description="address space of one test")
    max_tests: int = Field(64, ge=1, le=1_000, description="tests run per sample (the first)")

    _code = field_validator("code")(check_template)


Grader = Annotated[
    StringCheckGrader | TextSimilarityGrader | ScoreModelGrader | PythonGrader | CodeTestsGrader,
    Field(discriminator="type"),
]


def check_formula(formula: str, names: set[str]) -> str:
    """ValueError unless `formula` is an expression over `names`, numbers, OpenAI's operators
    (+ - * / ^, parentheses) and functions (FORMULA_FUNCTIONS)."""
    try:
        tree = ast.parse(formula, mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"calculate_output does not parse: {exc.msg}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Expression | ast.Load | ast.BinOp | ast.UnaryOp):
            continue
        if isinstance(node, ast.operator | ast.unaryop):
            if type(node) not in FORMULA_OPERATORS:
                raise ValueError(
                    "calculate_output may use only the operators "
                    f"{' '.join(sorted(set(FORMULA_OPERATORS.values())))}"
                )
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, int | float) or isinstance(node.value, bool):
                raise ValueError(f"calculate_output: {node.value!r} is not a number")
        elif isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in FORMULA_FUNCTIONS):
                raise ValueError(f"calculate_output may call only {', '.join(FORMULA_FUNCTIONS)}")
            if node.keywords:
                raise ValueError("calculate_output: functions take no keyword arguments")
        elif isinstance(node, ast.Name):
            if node.id not in names and node.id not in FORMULA_FUNCTIONS:
                raise ValueError(
                    f"calculate_output names {node.id!r}, which is not one of the graders "
                    f"({', '.join(sorted(names))})"
                )
        else:
            raise ValueError(f"calculate_output: {type(node).__name__} is not allowed in a formula")
    return formula


class MultiGrader(_Grader):
    """Named graders, each scored, combined by the `calculate_output` formula over their names."""

    type: Literal["multi"]
    graders: dict[Name, Grader] = Field(min_length=1, max_length=MAX_SUB_GRADERS)
    calculate_output: str = Field(min_length=1, max_length=MAX_FORMULA)

    @field_validator("graders", mode="before")
    @classmethod
    def _one_grader(cls, v: Any) -> Any:
        """OpenAI's SDK types `graders` as one grader: keyed by its name then."""
        if isinstance(v, dict) and isinstance(v.get("type"), str):
            return {v.get("name") or v["type"]: v}
        return v

    @field_validator("graders")
    @classmethod
    def _identifiers(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if not key.isidentifier() or key in FORMULA_FUNCTIONS:
                raise ValueError(
                    f"grader name {key!r} cannot appear in a formula: use letters, digits "
                    "and _, not starting with a digit, and not a function's name"
                )
        return v

    @model_validator(mode="after")
    def _formula(self) -> "MultiGrader":
        check_formula(self.calculate_output, set(self.graders))
        return self


AnyGrader = Annotated[
    StringCheckGrader
    | TextSimilarityGrader
    | ScoreModelGrader
    | PythonGrader
    | CodeTestsGrader
    | MultiGrader,
    Field(discriminator="type"),
]
GRADER_TYPES = (
    StringCheckGrader,
    TextSimilarityGrader,
    ScoreModelGrader,
    PythonGrader,
    CodeTestsGrader,
    MultiGrader,
)


def graders_in(spec: Any, where: str) -> list[tuple[str, Any]]:
    """(field, grader) of every grader in a reward or a grader, `where` naming its field: a
    composite's components and a multi grader's graders each named by their own field."""
    if getattr(spec, "type", None) == "composite":
        parts = [(f"{where}.components.{i}", c) for i, c in enumerate(spec.components)]
    else:
        parts = [(where, spec)]
    found: list[tuple[str, Any]] = []
    for field, part in parts:
        if isinstance(part, MultiGrader):
            found += [(f"{field}.graders.{name}", g) for name, g in part.graders.items()]
        elif isinstance(part, GRADER_TYPES):
            found.append((field, part))
    return found


def called_urls(spec: Any, where: str) -> list[tuple[str, str]]:
    """(field, URL) of every endpoint the graders in `spec` call: a judge's base_url, the
    embeddings endpoint of a cosine text_similarity."""
    urls = []
    for field, grader in graders_in(spec, where):
        if isinstance(grader, ScoreModelGrader) and grader.base_url is not None:
            urls.append((f"{field}.base_url", grader.base_url))
        if isinstance(grader, TextSimilarityGrader) and grader.embeddings is not None:
            urls.append((f"{field}.embeddings.base_url", grader.embeddings.base_url))
    return urls


def served_judges(spec: Any) -> list[str]:
    """The models of ours (ckpt_…, run_…) that the judges in `spec` name."""
    return [
        g.model
        for _, g in graders_in(spec, "")
        if isinstance(g, ScoreModelGrader) and g.base_url is None
    ]
