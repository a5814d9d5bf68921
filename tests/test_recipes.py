"""The recipes for real models (examples/recipes): every spec is one the API accepts once its
file ids are filled in, with GVPO, math_verify and a Qwen2.5-Math model; the data conversion
gives the prompts and answers the recipes rely on, and math_verify scores them. Nothing here
downloads a model or a dataset."""

import importlib.util
from pathlib import Path

import pytest
import yaml

from service.contract.rewards import BuiltinReward
from service.contract.spec import RunSpec
from workers.rewards.builtin import get_reward

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "recipes"
SPECS = sorted(RECIPES.glob("*.yaml"))


def load_prepare():
    """examples/ is not a package: the script is loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "prepare_math_data", RECIPES / "prepare_math_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare = load_prepare()


def math_verify(completion: str, answer: str) -> float:
    builtin = get_reward("math_verify")
    return builtin.fn(completion, answer, builtin.params())


def test_there_is_a_recipe_for_each_model_and_dataset():
    assert [p.name for p in SPECS] == [
        f"qwen2.5-math-{size}-{data}.yaml" for size in ("1.5b", "7b") for data in ("gsm8k", "math")
    ]


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_a_recipe_is_a_valid_gvpo_spec_once_its_file_ids_are_filled_in(path):
    text = path.read_text()
    assert "file_TRAIN" in text and "file_EVAL" in text
    filled = text.replace("file_TRAIN", "file_abc123").replace("file_EVAL", "file_def456")
    spec = RunSpec.model_validate(yaml.safe_load(filled))
    assert (spec.dataset.train_file, spec.dataset.eval_file) == ("file_abc123", "file_def456")
    assert spec.algorithm.name == "gvpo"
    assert spec.reward == BuiltinReward(type="builtin", name="math_verify")
    size = "1.5B" if "1.5b" in path.name else "7B"
    assert spec.model.path == f"Qwen/Qwen2.5-Math-{size}"
    assert "NOT RUN HERE" in text


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_a_recipe_has_the_authors_hyper_parameters(path):
    """GVPO/run_qwen2-7b_math_gvpo.sh in github.com/jszkc/GVPO, mapped as docs/recipes.md says."""
    spec = yaml.safe_load(path.read_text())
    assert spec["algorithm"] == {
        "name": "gvpo",
        "beta": 0.1,
        "group_size": 4,
        "reference": "sampling",
        "skip_zero_variance": False,
    }
    assert spec["optimizer"] == {
        "lr": 1e-6,
        "weight_decay": 0.01,
        "grad_clip": 0.25,
        "warmup_steps": 0,
    }
    assert (spec["training"]["prompts_per_step"], spec["training"]["mini_batches"]) == (1024, 4)
    assert spec["sampling"]["max_new_tokens"] == 1024
    assert spec["sampling"]["temperature"] == 1.0
    assert spec["model"]["dtype"] == "float32"


def test_the_prompt_is_qwen_math_chat_template_with_the_authors_instruction():
    row = prepare.gsm8k_row(
        {
            "question": "Natalia sold clips to 48 of her friends in April. How many?",
            "answer": "She sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,072",
        }
    )
    assert row == {
        "prompt": "<|im_start|>system\nPlease reason step by step, and put your final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>user\nNatalia sold clips to 48 of her "
        "friends in April. How many? Let's think step by step and output the final answer "
        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n",
        "answer": "$1072$",
    }


def test_the_math_answer_is_the_whole_last_boxed_expression():
    row = prepare.math_row(
        {
            "problem": "Compute $\\cos 30^\\circ$.",
            "solution": "First \\boxed{1} is wrong. In fact $\\cos 30^\\circ = "
            "\\boxed{\\frac{\\sqrt{3}}{2}}$.",
        }
    )
    assert row["answer"] == "$\\frac{\\sqrt{3}}{2}$"
    assert "Compute $\\cos 30^\\circ$. Let's think step by step" in row["prompt"]


@pytest.mark.parametrize(
    ("solution", "boxed"),
    [
        ("so \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("the answer is $\\boxed 5$.", "5"),
        ("\\fbox{\\text{(C)}}", "\\text{(C)}"),
        ("no box at all", None),
        ("\\boxed{\\frac{1}{2}", None),  # never closes
    ],
)
def test_last_boxed_matches_braces(solution, boxed):
    assert prepare.last_boxed(solution) == boxed


def test_a_solution_without_a_boxed_answer_is_left_out():
    assert prepare.math_row({"problem": "p", "solution": "It is 4."}) is None


@pytest.mark.parametrize(
    ("row", "right", "wrong"),
    [
        (
            {"problem": "Simplify.", "solution": "So it is $\\boxed{\\dfrac{\\sqrt{3}}{2}}$."},
            "Thus the value is \\boxed{\\frac{\\sqrt{3}}{2}}.",
            "Thus the value is \\boxed{\\frac{\\sqrt{2}}{2}}.",
        ),
        (
            {"problem": "Convert.", "solution": "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$"},
            "The point is \\boxed{(3, \\frac{\\pi}{2})}.",
            "The point is \\boxed{(3, \\frac{\\pi}{3})}.",
        ),
        (
            {"question": "How many?", "answer": "48 + 24 = 72\n#### 72"},
            "She sold 48 + 24 = 72 clips, so the answer is \\boxed{72}.",
            "She sold 48 + 23 = 71 clips, so the answer is \\boxed{71}.",
        ),
    ],
    ids=["math-nested-fraction", "math-tuple", "gsm8k"],
)
def test_math_verify_scores_a_converted_answer(row, right, wrong):
    convert = prepare.gsm8k_row if "question" in row else prepare.math_row
    answer = convert(row)["answer"]
    assert math_verify(right, answer) == 1.0
    assert math_verify(wrong, answer) == 0.0


def test_a_bare_latex_answer_would_score_nothing():
    """Why the rows put answers between dollar signs: math_verify finds no expression in bare
    LaTeX, so every completion would score 0."""
    assert math_verify("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}") == 0.0
    assert math_verify("\\boxed{\\frac{\\sqrt{3}}{2}}", "$\\frac{\\sqrt{3}}{2}$") == 1.0
