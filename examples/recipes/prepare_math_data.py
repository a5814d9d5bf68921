"""GSM8K and MATH as the service's JSONL rows, {"prompt", "answer"}, for the recipes beside it.

Run it on your own machine, which needs `pip install datasets` and access to the Hugging Face hub:

    python examples/recipes/prepare_math_data.py data/

It writes data/gsm8k_train.jsonl and gsm8k_test.jsonl (openai/gsm8k, config main),
math_train.jsonl and math_test.jsonl (DigitalLearningGmbH/MATH-lighteval, the MATH copy the
authors' verl script trains and validates on: 7,500 and 5,000 problems) and math500_test.jsonl
(HuggingFaceH4/MATH-500, the 500 test problems the paper reports MATH on).

Prompts are the text the authors' model saw. Their script (verl) sends one user message, the
question and then INSTRUCTION, through the tokenizer's chat template, and Qwen2.5-Math's template
adds SYSTEM when no system message is given. The service sends a prompt to the model as it is,
with no chat template, so each row holds that template already rendered. GSM8K gets the MATH
instruction (verl's GSM8K script asks for the answer after "####"): math_verify reads the
\\boxed{} answer, and the system line asks for one anyway.

Answers are written between dollar signs: math_verify parses the reference answer the way it
parses a completion, and finds nothing in bare LaTeX such as \\frac{1}{2}.
"""

import json
import sys
from collections.abc import Iterable
from pathlib import Path

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def chat_prompt(question: str) -> str:
    """Qwen2.5-Math's chat template for one user message, ready for the assistant's turn."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{question} {INSTRUCTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched one by one so that
    nested ones (\\boxed{\\frac{1}{2}}) come out whole; `\\boxed 5` gives 5. None when there
    is none, or it never closes."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox")
    if text.startswith(" ", i):
        return text[i:].split("$")[0].strip() or None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def gsm8k_row(example: dict) -> dict:
    """openai/gsm8k: the answer is the number after '####' (thousands commas dropped)."""
    final = example["answer"].split("####")[-1].strip().replace(",", "")
    return {"prompt": chat_prompt(example["question"]), "answer": f"${final}$"}


def math_row(example: dict) -> dict | None:
    """MATH: the answer is the last \\boxed{} of the worked solution; None when it has none."""
    answer = last_boxed(example["solution"])
    if answer is None:
        return None
    return {"prompt": chat_prompt(example["problem"]), "answer": f"${answer}$"}


def write_jsonl(rows: Iterable[dict | None], path: Path) -> None:
    kept = skipped = 0
    with path.open("w") as out:
        for row in rows:
            if row is None:
                skipped += 1
                continue
            out.write(json.dumps(row) + "\n")
            kept += 1
    left_out = f" ({skipped} without a boxed answer left out)" if skipped else ""
    print(f"{path}: {kept} rows{left_out}")


def main(out: Path) -> None:
    try:  # on the user's machine only: the conversion above needs none of it
        from datasets import load_dataset
    except ImportError:
        sys.exit("this needs the datasets library: pip install datasets")

    out.mkdir(parents=True, exist_ok=True)
    gsm8k = load_dataset("openai/gsm8k", "main")
    math = load_dataset("DigitalLearningGmbH/MATH-lighteval")
    math500 = load_dataset("HuggingFaceH4/MATH-500", split="test")
    for split in ("train", "test"):
        write_jsonl(map(gsm8k_row, gsm8k[split]), out / f"gsm8k_{split}.jsonl")
        write_jsonl(map(math_row, math[split]), out / f"math_{split}.jsonl")
    write_jsonl(map(math_row, math500), out / "math500_test.jsonl")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python prepare_math_data.py OUT_DIR")
    main(Path(sys.argv[1]))
