"""`string_check` and `text_similarity`: the rendered input compared with the rendered reference.

Every similarity metric comes from a maintained library, with the settings docs/rewards.md
lists (the source of truth for users; keep the two in step):

- fuzzy_match: rapidfuzz `fuzz.ratio` (normalised Indel similarity) / 100.
- bleu: sacrebleu sentence BLEU (its 13a tokeniser, exponential smoothing, effective order)
  / 100.
- gleu: nltk `sentence_gleu` (n-grams 1 to 4), over nltk's word tokens.
- meteor: nltk `meteor_score` (alpha 0.9, beta 3, gamma 0.5; lower-cased, Porter stems,
  WordNet 3.0 synonyms: workers/graders/wordnet.py), over nltk's word tokens.
- rouge_1 .. rouge_5, rouge_l: rouge-score's F-measure (its tokeniser: lower case, letters and
  digits; no stemming).
- cosine: the cosine of the two texts' embeddings from the grader's `embeddings` endpoint.
"""

import math
from collections.abc import Callable
from functools import cache

from service.contract.graders import StringCheckGrader, TextSimilarityGrader
from workers.errors import RunError
from workers.graders import wordnet as wordnet_data
from workers.graders.base import Grade, GradeError, GradingContext, Sample, register
from workers.graders.embeddings import Embedder
from workers.graders.templates import Template, TemplateFailure

Pair = tuple[Sample, dict]


def compare(operation: str, text: str, reference: str) -> float:
    if operation == "eq":
        return float(text == reference)
    if operation == "ne":
        return float(text != reference)
    if operation == "like":
        return float(reference in text)
    return float(reference.casefold() in text.casefold())  # ilike


class TemplatePair:
    """A grader's input and reference templates, rendered per sample."""

    def __init__(self, spec: StringCheckGrader | TextSimilarityGrader) -> None:
        self.input, self.reference = Template(spec.input), Template(spec.reference)

    def render(self, sample: Sample, item: dict) -> tuple[str, str]:
        return self.input.render(sample, item), self.reference.render(sample, item)


class StringCheck:
    def __init__(self, spec: StringCheckGrader) -> None:
        self.operation, self.templates = spec.operation, TemplatePair(spec)

    def grade(self, pairs: list[Pair]) -> list[Grade]:
        grades = []
        for sample, item in pairs:
            try:
                text, reference = self.templates.render(sample, item)
            except TemplateFailure as exc:
                grades.append(exc.grade())
                continue
            grades.append(Grade(compare(self.operation, text, reference)))
        return grades


@register("string_check")
def build_string_check(spec: StringCheckGrader, context: GradingContext) -> StringCheck:
    return StringCheck(spec)


# -- text similarity ---------------------------------------------------------------------------


@cache
def _words() -> Callable[[str], list[str]]:
    """nltk's word tokeniser (the Treebank rules word_tokenize applies; needs no data files)."""
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize


@cache
def wordnet():
    """nltk's WordNet, loaded once (workers/graders/wordnet.py says where it comes from)."""
    return wordnet_data.load()


def _fuzzy(text: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(text, reference) / 100


@cache
def _bleu():
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="13a", smooth_method="exp", effective_order=True)


def _sacrebleu(text: str, reference: str) -> float:
    return _bleu().sentence_score(text, [reference]).score / 100


def _gleu(text: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    hypothesis, ref = _words()(text), _words()(reference)
    if not hypothesis or not ref:  # no n-grams at all: equal only when both are empty
        return float(hypothesis == ref)
    return sentence_gleu([ref], hypothesis, min_len=1, max_len=4)


def _meteor(text: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    hypothesis, ref = _words()(text), _words()(reference)
    if not hypothesis or not ref:
        return float(hypothesis == ref)
    return meteor_score([ref], hypothesis, wordnet=wordnet())


@cache
def _rouge(kind: str):
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer([kind], use_stemmer=False)


def _rouge_of(kind: str) -> Callable[[str, str], float]:
    def score(text: str, reference: str) -> float:
        return _rouge(kind).score(reference, text)[kind].fmeasure  # (target, prediction)

    return score


# metric -> similarity(input, reference), for every metric but cosine (which batches)
METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": _fuzzy,
    "bleu": _sacrebleu,
    "gleu": _gleu,
    "meteor": _meteor,
    **{f"rouge_{n}": _rouge_of(f"rouge{n}") for n in range(1, 6)},
    "rouge_l": _rouge_of("rougeL"),
}


def cosine(a: list[float], b: list[float]) -> float:
    import numpy as np

    u, v = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(u @ v) / norms if norms else 0.0


class TextSimilarity:
    def __init__(self, spec: TextSimilarityGrader, context: GradingContext) -> None:
        self.metric, self.templates = spec.evaluation_metric, TemplatePair(spec)
        self.embedder = Embedder(spec.embeddings, context) if spec.embeddings else None
        if self.metric == "meteor":
            wordnet()  # no WordNet fails the run now, not at its first step

    def grade(self, pairs: list[Pair]) -> list[Grade]:
        grades: list[Grade | None] = [None] * len(pairs)
        rendered: dict[int, tuple[str, str]] = {}
        for i, (sample, item) in enumerate(pairs):
            try:
                rendered[i] = self.templates.render(sample, item)
            except TemplateFailure as exc:
                grades[i] = exc.grade()
        for i, value in self._similarities(rendered).items():
            grades[i] = value
        return grades  # type: ignore[return-value]

    def _similarities(self, rendered: dict[int, tuple[str, str]]) -> dict[int, Grade]:
        if self.embedder is not None:
            texts = [t for pair in rendered.values() for t in pair]
            vectors = iter(self.embedder.embed(texts) if texts else [])
            return {i: Grade(cosine(next(vectors), next(vectors))) for i in rendered}
        return {i: self._measure(*texts) for i, texts in rendered.items()}

    def _measure(self, text: str, reference: str) -> Grade:
        try:
            value = METRICS[self.metric](text, reference)
        except RunError:
            raise
        except Exception as exc:  # the library choked on this sample's text
            return Grade.failed(GradeError.OTHER, f"{self.metric}: {type(exc).__name__}: {exc}")
        if not math.isfinite(value):
            return Grade.failed(GradeError.OTHER, f"{self.metric} is {value}")
        return Grade(float(value))


@register("text_similarity")
def build_text_similarity(spec: TextSimilarityGrader, context: GradingContext) -> TextSimilarity:
    return TextSimilarity(spec, context)
