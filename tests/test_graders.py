"""OpenAI's graders as rewards: templates, string_check, text_similarity (each metric against
its library or a hand computation), multi formulas, and the errors a grader counts."""

import math

import pytest

from service.config import Settings
from service.contract.graders import MultiGrader, StringCheckGrader, TextSimilarityGrader
from workers.errors import RunError
from workers.graders.base import GradeError, GradingContext, Sample
from workers.graders.registry import build_grader
from workers.graders.templates import Template, TemplateFailure
from workers.graders.text import wordnet

from embeddings_server import Behaviour, EmbeddingsServer, letter_counts


def grader(spec: dict, settings: Settings | None = None):
    context = GradingContext(settings=settings or Settings(), project_id="proj_test")
    model = {"multi": MultiGrader, "string_check": StringCheckGrader}.get(
        spec["type"], TextSimilarityGrader
    )
    return build_grader(model.model_validate(spec), context)


def grade_one(spec: dict, output: str, item: dict | None = None, settings=None):
    return grader(spec, settings).grade([(Sample.of(output), item or {})])[0]


def similarity(metric: str, text: str, reference: str) -> float:
    spec = {
        "type": "text_similarity",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.ref }}",
        "evaluation_metric": metric,
    }
    result = grade_one(spec, text, {"ref": reference})
    assert result.error is None, result.detail
    return result.reward


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("template", "item", "expected"),
    [
        ("{{ item.answer }}", {"answer": "42"}, "42"),
        ("{{ item.n }}", {"n": 3}, "3"),
        ("{{ item.x }}", {"x": 0.5}, "0.5"),
        ("{{ item.ok }}", {"ok": True}, "true"),
        ("{{ item.none }}", {"none": None}, "null"),
        ("{{ item.obj }}", {"obj": {"a": [1, "é"]}}, '{"a": [1, "é"]}'),
        ("{{ item.xs }}", {"xs": [1, 2]}, "[1, 2]"),
        ("{{ item.obj.a[1] }}", {"obj": {"a": [1, "b"]}}, "b"),
        ("{{ item['answer'] | upper }}", {"answer": "yes"}, "YES"),
        ("{{ item.items }}|{{ item.values }}", {"items": "i", "values": "v"}, "i|v"),
        ("{{ item.update }}", {"update": "u"}, "u"),
        ("{{ sample.output_text }}!", {}, "out!"),
        ("{% if item.hint is defined %}{{ item.hint }}{% else %}-{% endif %}", {}, "-"),
    ],
)
def test_templates_render_a_rows_fields(template, item, expected):
    assert Template(template).render(Sample.of("out"), item) == expected


def test_a_template_reads_the_json_and_the_tool_calls_of_a_sample():
    calls = [{"id": "c0", "type": "function", "function": {"name": "add", "arguments": "{}"}}]
    sample = Sample.of('{"answer": 7, "steps": ["a"]}', calls)
    assert Template("{{ sample.output_json.answer }}").render(sample, {}) == "7"
    assert Template("{{ sample.output_json.steps }}").render(sample, {}) == '["a"]'
    assert Template("{{ sample.output_tools[0].function.name }}").render(sample, {}) == "add"


def test_a_field_the_row_lacks_is_an_invalid_variable_naming_the_rows_fields():
    with pytest.raises(TemplateFailure) as failed:
        Template("{{ item.answer }}").render(Sample.of("x"), {"solution": "1"})
    assert failed.value.error == GradeError.INVALID_VARIABLE
    assert "answer" in failed.value.detail and "solution" in failed.value.detail


def test_naming_output_json_of_a_completion_that_is_not_json_is_a_sample_parse_error():
    with pytest.raises(TemplateFailure) as failed:
        Template("{{ sample.output_json.answer }}").render(Sample.of("not json"), {})
    assert failed.value.error == GradeError.SAMPLE_PARSE
    with pytest.raises(TemplateFailure) as failed:
        Template("{{ sample['output_json'] }}").render(Sample.of("{oops"), {})
    assert failed.value.error == GradeError.SAMPLE_PARSE


def test_a_template_error_is_that_samples_reward_zero_not_an_exception():
    spec = {
        "type": "string_check",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.answer }}",
        "operation": "eq",
    }
    grades = grader(spec).grade(
        [(Sample.of("a"), {"answer": "a"}), (Sample.of("a"), {}), (Sample.of("a"), {"x": 1})]
    )
    assert [g.reward for g in grades] == [1.0, 0.0, 0.0]
    assert [g.error for g in grades] == [None] + [GradeError.INVALID_VARIABLE] * 2


@pytest.mark.parametrize(
    "template", ["{{ 'x' * 10 ** 9 }}", "{{ [1] * 10 ** 8 }}", "{{ 9 ** 99999 }}"]
)
def test_a_template_that_would_make_a_huge_value_is_that_samples_error(template):
    with pytest.raises(TemplateFailure) as failed:
        Template(template).render(Sample.of("x"), {})
    assert failed.value.error == GradeError.OTHER and "too big" in failed.value.detail


# ---------------------------------------------------------------- string_check


@pytest.mark.parametrize(
    ("operation", "output", "reference", "expected"),
    [
        ("eq", "Paris", "Paris", 1.0),
        ("eq", "Paris ", "Paris", 0.0),
        ("eq", "paris", "Paris", 0.0),
        ("ne", "Lyon", "Paris", 1.0),
        ("ne", "Paris", "Paris", 0.0),
        ("like", "The capital is Paris.", "Paris", 1.0),
        ("like", "The capital is paris.", "Paris", 0.0),
        ("like", "Paris", "The capital is Paris", 0.0),
        ("ilike", "THE CAPITAL IS PARIS.", "Paris", 1.0),
        ("ilike", "Straße", "STRASSE", 1.0),  # case folding, not just lower case
        ("ilike", "Lyon", "paris", 0.0),
        ("like", "anything", "", 1.0),  # the empty string occurs everywhere
    ],
)
def test_string_check(operation, output, reference, expected):
    spec = {
        "type": "string_check",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.ref }}",
        "operation": operation,
    }
    assert grade_one(spec, output, {"ref": reference}).reward == expected


# ---------------------------------------------------------------- text_similarity


PAIRS = [
    ("the cat sat on the mat", "the cat sat on the mat"),
    ("the cat sat", "the cat ran"),
    ("A quick brown fox jumps over the lazy dog.", "The quick brown fox jumped over a lazy dog"),
    ("completely different words", "nothing alike here"),
    ("", "something"),
]


@pytest.mark.parametrize(("text", "reference"), PAIRS)
def test_fuzzy_match_is_rapidfuzz_ratio(text, reference):
    from rapidfuzz import fuzz

    assert similarity("fuzzy_match", text, reference) == pytest.approx(
        fuzz.ratio(text, reference) / 100
    )


@pytest.mark.parametrize(("text", "reference"), PAIRS)
def test_bleu_is_sacrebleus_sentence_bleu_scaled_to_one(text, reference):
    import sacrebleu

    expected = sacrebleu.sentence_bleu(text, [reference]).score / 100
    assert similarity("bleu", text, reference) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "reference"), PAIRS[:4])
def test_gleu_is_nltks_sentence_gleu(text, reference):
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.gleu_score import sentence_gleu

    words = NLTKWordTokenizer().tokenize
    expected = sentence_gleu([words(reference)], words(text))
    assert similarity("gleu", text, reference) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "reference"), PAIRS[:4])
def test_meteor_is_nltks_meteor_score_with_wordnet(text, reference):
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.translate.meteor_score import meteor_score

    words = NLTKWordTokenizer().tokenize
    expected = meteor_score([words(reference)], words(text), wordnet=wordnet())
    assert similarity("meteor", text, reference) == pytest.approx(expected)


def test_meteor_matches_synonyms_through_wordnet():
    # "sofa" and "couch" share a WordNet synset: METEOR's third stage matches them.
    assert similarity("meteor", "the sofa is red", "the couch is red") > similarity(
        "meteor", "the fork is red", "the couch is red"
    )


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("text", "reference"), PAIRS)
def test_rouge_n_is_rouge_scores_f_measure(n, text, reference):
    from rouge_score.rouge_scorer import RougeScorer

    kind = f"rouge{n}"
    expected = RougeScorer([kind]).score(reference, text)[kind].fmeasure
    assert similarity(f"rouge_{n}", text, reference) == pytest.approx(expected)


@pytest.mark.parametrize(("text", "reference"), PAIRS)
def test_rouge_l_is_rouge_scores_f_measure(text, reference):
    from rouge_score.rouge_scorer import RougeScorer

    expected = RougeScorer(["rougeL"]).score(reference, text)["rougeL"].fmeasure
    assert similarity("rouge_l", text, reference) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("metric", "text", "reference", "expected"),
    [
        # hand-computed: 8 characters, one substitution = 2 Indel edits -> 1 - 2/8
        ("fuzzy_match", "abcd", "abce", 0.75),
        # unigrams: 2 of 3 match both ways -> F = 2/3; bigrams: 1 of 2 -> 1/2
        ("rouge_1", "the cat sat", "the cat ran", 2 / 3),
        ("rouge_2", "the cat sat", "the cat ran", 1 / 2),
        ("rouge_3", "the cat sat", "the cat ran", 0.0),
        # longest common subsequence "the cat": 2 of 3 -> 2/3
        ("rouge_l", "the cat sat", "the cat ran", 2 / 3),
        # n-grams of 1-4 words: 6 each side, 3 shared (the, cat, the cat) -> 3/6
        ("gleu", "the cat sat", "the cat ran", 0.5),
        *[(m, "same words here", "same words here", 1.0) for m in ("bleu", "gleu", "rouge_l")],
        ("bleu", "completely different", "nothing alike", 0.0),
    ],
)
def test_similarities_computed_by_hand(metric, text, reference, expected):
    assert similarity(metric, text, reference) == pytest.approx(expected, abs=1e-6)


WORDNET_PROBE = """
import sys, nltk
nltk.data.path[:] = [sys.argv[1]]
from workers.errors import RunError
from workers.graders.wordnet import load
try:
    print([s.name() for s in load().synsets("sofa")])
except RunError as exc:
    print(exc)
"""


def test_wordnet_installs_from_the_system_packages_for_nltk_or_says_how(tmp_path):
    import subprocess
    import sys

    from workers.graders.wordnet import install

    def probe(root) -> str:
        args = [sys.executable, "-c", WORDNET_PROBE, str(root)]
        return subprocess.run(args, capture_output=True, text=True, check=True).stdout

    install(tmp_path / "nltk_data")
    assert probe(tmp_path / "nltk_data") == "['sofa.n.01']\n"
    assert "wordnet-base" in probe(tmp_path / "empty")


@pytest.fixture
def embeddings():
    server = EmbeddingsServer(Behaviour()).start()
    yield server
    server.stop()


def cosine_spec(server, **embeddings) -> dict:
    return {
        "type": "text_similarity",
        "input": "{{ sample.output_text }}",
        "reference": "{{ item.ref }}",
        "evaluation_metric": "cosine",
        "embeddings": {"base_url": server.base_url, "model": "letters", **embeddings},
    }


def local(settings: Settings) -> Settings:
    return settings.model_copy(update={"webhook_allow_private": True})


def test_cosine_compares_the_endpoints_embeddings(embeddings, settings):
    import numpy as np

    pairs = [("abc", "abd"), ("hello", "world"), ("abc", "abc"), ("xyz", "abc")]
    g = grader(cosine_spec(embeddings), local(settings))
    grades = g.grade([(Sample.of(t), {"ref": r}) for t, r in pairs])
    for (t, r), result in zip(pairs, grades, strict=True):
        u, v = np.array(letter_counts(t)), np.array(letter_counts(r))
        assert result.reward == pytest.approx(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    assert grades[3].reward == 0.0  # no letter in common
    # one request, each distinct text once, with the grader's model
    assert embeddings.behaviour.inputs == [["abc", "abd", "hello", "world", "xyz"]]
    assert embeddings.behaviour.models == ["letters"]


def test_cosine_retries_an_overloaded_endpoint_and_sends_its_key(embeddings, settings, monkeypatch):
    embeddings.behaviour.fail_first, embeddings.behaviour.key = 2, "sk-test"
    monkeypatch.setenv("EMBEDDINGS_KEY", "sk-test")
    retries = []
    context = GradingContext(local(settings), "proj_test", lambda m, d: retries.append(d))
    spec = TextSimilarityGrader.model_validate(
        cosine_spec(embeddings, api_key_env="EMBEDDINGS_KEY")
    )
    result = build_grader(spec, context).grade([(Sample.of("ab"), {"ref": "ab"})])[0]
    assert result.reward == pytest.approx(1.0) and len(retries) == 2


def test_cosine_at_a_refused_or_failing_endpoint_fails_the_run(embeddings, settings, monkeypatch):
    spec = cosine_spec(embeddings)
    with pytest.raises(RunError, match="may not be called"):  # loopback, not allowed here
        grader(spec, settings).grade([(Sample.of("a"), {"ref": "b"})])
    embeddings.behaviour.key = "sk-other"
    with pytest.raises(RunError, match="HTTP 401"):
        grader(spec, local(settings)).grade([(Sample.of("a"), {"ref": "b"})])
    with pytest.raises(RunError, match="NO_SUCH_VARIABLE"):
        grader(cosine_spec(embeddings, api_key_env="NO_SUCH_VARIABLE"), local(settings))


# ---------------------------------------------------------------- multi


def multi(formula: str, **graders) -> dict:
    return {"type": "multi", "graders": graders, "calculate_output": formula}


def check(reference: str, operation: str = "eq") -> dict:
    return {
        "type": "string_check",
        "input": "{{ sample.output_text }}",
        "reference": reference,
        "operation": operation,
    }


# Graded on the output "yes": a = 1.0, b = 0.0, and c, a fraction: rapidfuzz's ratio of "yes"
# and "yet" (one substitution is 2 Indel edits of 6 characters: 1 - 2/6).
SUBS = {
    "a": check("yes"),
    "b": check("no"),
    "c": {
        "type": "text_similarity",
        "input": "{{ sample.output_text }}",
        "reference": "yet",
        "evaluation_metric": "fuzzy_match",
    },
}
C = 4 / 6


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("a + b", 1.0),
        ("a - c", 1 - C),
        ("3 * c", 3 * C),
        ("c / 2", C / 2),
        ("(a + 1) ^ 3", 8.0),
        ("-c", -C),
        ("+c", C),
        ("0.5 * a + 0.5 * c", 0.5 + 0.5 * C),
        # ^ is power with its usual precedence: above * and unary minus, grouping to the right
        ("2 + 3 ^ 2", 11.0),
        ("2 * 3 ^ 2", 18.0),
        ("-2 ^ 2", -4.0),
        ("2 ^ 3 ^ 2", 512.0),
        ("(2 ^ 3) ^ 2", 64.0),
        ("c ^ 0.5", math.sqrt(C)),
        ("min(a, b, c)", 0.0),
        ("max(b, c)", C),
        ("abs(b - c)", C),
        ("floor(c + 1.5)", 2.0),
        ("ceil(c)", 1.0),
        ("exp(b)", 1.0),
        ("exp(c)", math.exp(C)),
        ("sqrt(4 * c)", math.sqrt(4 * C)),
        ("log(c)", math.log(C)),
        ("log(exp(2))", 2.0),
    ],
)
def test_multi_formulas(formula, expected):
    result = grade_one(multi(formula, **SUBS), "yes")
    assert result.error is None, result.detail
    assert result.reward == pytest.approx(expected)
    assert result.sub_rewards == pytest.approx({"a": 1.0, "b": 0.0, "c": C})


@pytest.mark.parametrize(
    ("formula", "error"),
    [
        ("log(b)", "ValueError"),  # log(0)
        ("a / b", "ZeroDivisionError"),
        ("sqrt(b - a)", "ValueError"),
        ("exp(1000 * a)", "OverflowError"),
        ("10 ^ 10 ^ 10", "NumberTooHigh"),
    ],
)
def test_a_formula_with_no_value_is_reward_zero_and_an_error(formula, error):
    result = grade_one(multi(formula, **SUBS), "yes")
    assert result.reward == 0.0 and result.error == GradeError.OTHER
    assert error in result.detail
    assert result.sub_rewards == pytest.approx({"a": 1.0, "b": 0.0, "c": C})


def test_a_sub_graders_error_is_the_samples_reward_zero_naming_it():
    spec = multi("a + d", a=check("yes"), d=check("{{ item.missing }}"))
    result = grade_one(spec, "yes", {"answer": "yes"})
    assert result.reward == 0.0 and result.error == GradeError.INVALID_VARIABLE
    assert result.detail.startswith("d: ") and result.sub_rewards == {"a": 1.0, "d": 0.0}


def test_multi_grades_each_sub_grader_over_the_whole_batch():
    spec = multi("2 * a + b", a=check("{{ item.answer }}"), b=check("x", "ne"))
    grades = grader(spec).grade(
        [(Sample.of("1"), {"answer": "1"}), (Sample.of("x"), {"answer": "1"})]
    )
    assert [g.reward for g in grades] == [3.0, 0.0]


# ---------------------------------------------------------------- as a run's reward


def test_a_chat_rows_completion_shows_its_tool_calls():
    from workers.data import Example
    from workers.rewards.graders import sample_of
    from workers.rollout.base import Completion

    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    chat = Example("", None, [{"role": "user", "content": "1+1?"}], tools)
    said = 'Adding.<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    sample = sample_of(chat, Completion(said, [], "stop"))
    assert sample.output_text == "Adding."
    assert [c["function"] for c in sample.output_tools] == [
        {"name": "add", "arguments": '{"a": 1}'}
    ]
    plain = sample_of(Example("p", None), Completion(said, [], "stop"))  # no tools: as it is
    assert plain.output_text == said and plain.output_tools == []


def test_a_composite_weighs_graders_and_counts_each_failed_completion_once(settings):
    from service.contract.rewards import CompositeReward
    from workers.data import Example
    from workers.rewards.scoring import build_scorer
    from workers.rollout.base import Completion, Rollout

    spec = CompositeReward.model_validate(
        {
            "type": "composite",
            "components": [
                {**check("{{ item.answer }}"), "weight": 2.0},
                {**check("{{ item.answer }}", "ne"), "label": "differs"},
                {"type": "builtin", "name": "exact_match"},
            ],
        }
    )
    scorer = build_scorer(spec, None, GradingContext(settings, "proj_test"))
    examples = [Example("p", "a", item={"answer": "a"}), Example("q", None)]
    rollouts = [
        Rollout([], [Completion("a", [], "stop"), Completion("b", [], "stop")]),
        Rollout([], [Completion("a", [], "stop"), Completion("b", [], "stop")]),
    ]
    scores = scorer.score(1, examples, rollouts)
    assert scores.rewards.tolist() == [[3.0, 1.0], [0.0, 0.0]]
    assert set(scores.components) == {"string_check", "differs", "exact_match"}
    # the second group's completions failed in two components: each counts once
    assert scores.errors.count == 2 and scores.errors.kind == "invalid_variable_error"
