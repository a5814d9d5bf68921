"""bench/algorithms.py, the algorithm study: a few steps of two arms end to end (worker
processes, the table with every seed, the plots, the docs block), and its summaries by hand."""

import json
from dataclasses import asdict

import pytest

from bench.algorithms import (
    Arm,
    Study,
    default_arms,
    main,
    merged,
    run_summary,
    select,
    write_block,
)


def _study(steps: int = 20) -> Study:
    return Study("copy", steps, 2, 4, 10, 4, 10, 1, (0, 1, 2), ())


def _run(rewards: list[float], norms: list[float] | None = None) -> dict:
    norms = norms or [1.0] * len(rewards)
    curve = [
        [i + 1, float(i), r, g, 0.0, 0.0, 0.1]
        for i, (r, g) in enumerate(zip(rewards, norms, strict=True))
    ]
    evals = [
        {"step": 0, "pass@1": 0.1, "pass@4": 0.2, "reward": 0.1, "kl_to_start": 0.0},
        {"step": len(rewards), "pass@1": 0.3, "pass@4": 0.5, "reward": 0.4, "kl_to_start": 1.5},
    ]
    return {"curve": curve, "evals": evals, "train_seconds": 2.0, "diverged": False}


@pytest.mark.slow
def test_two_arms_run_end_to_end_and_fill_the_docs_block(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("# Study\n\nprose before\n\n<!-- algorithms:copy:begin -->\nold\n"
                   "<!-- algorithms:copy:end -->\n\nprose after\n")  # fmt: skip
    args = ["--task", "copy", "--steps", "4", "--seeds", "2", "--lrs", "1e-3", "--jobs", "2",
            "--arms", "gvpo b=0.01 ref=initial keep0,grpo b=0", "--doc", str(doc),
            "--img", str(tmp_path / "img"), "--out", str(tmp_path / "out")]  # fmt: skip
    main(args)
    record = json.loads((tmp_path / "out" / "copy.json").read_text())
    results = record["results"]
    assert sorted((r["arm"]["label"], r["seed"]) for r in results) == [
        ("grpo b=0", 0),
        ("grpo b=0", 1),
        ("gvpo b=0.01 ref=initial keep0", 0),
        ("gvpo b=0.01 ref=initial keep0", 1),
    ]
    for r in results:
        assert "error" not in r, r.get("error")
        assert [c[0] for c in r["curve"]] == [1, 2, 3, 4]  # every step recorded
        assert [e["step"] for e in r["evals"]] == [0, 1, 2, 3, 4]
        assert all(0 <= e["pass@1"] <= e["pass@8"] <= 1 for e in r["evals"])
        assert r["evals"][0]["kl_to_start"] == pytest.approx(0, abs=1e-5)  # the start itself
        assert r["evals"][-1]["kl_to_start"] > 0  # four updates at lr 1e-3 moved it
    page = doc.read_text()
    assert page.startswith("# Study\n\nprose before\n") and page.endswith("\nprose after\n")
    assert "old" not in page and page.count("<!-- algorithms:copy:begin -->") == 1
    rows = [line for line in page.splitlines() if line.startswith("| grpo") or "| gvpo" in line]
    assert len(rows) == 2 and all(" ± " in row and row.endswith("| 2 |") for row in rows)
    assert "python bench/algorithms.py --task copy" in page
    for ext in ("png", "svg"):
        assert (tmp_path / "img" / f"algorithms-copy.{ext}").stat().st_size > 1000
    # --report rewrites the same block from the saved results, running nothing
    again = tmp_path / "again.md"
    main(["--task", "copy", "--report", "--doc", str(again), "--out", str(tmp_path / "out"),
          "--img", str(tmp_path / "img2")])  # fmt: skip
    block = page[page.index("<!-- algorithms:copy:begin -->") : page.index("prose after")]
    assert again.read_text() == block.rstrip("\n") + "\n"
    assert (tmp_path / "img2" / "algorithms-copy.svg").exists()


def test_steps_to_90_percent_is_the_first_full_window_that_far_from_start_to_final():
    # 20 steps: the first and last 10% (2 steps) average 0.0 and 1.0; a 2-step window first
    # reaches 0.9 at step 12 (0.8 and 1.0)
    rewards = [0.0] * 10 + [0.8] + [1.0] * 9
    assert run_summary(_run(rewards), _study())["to_90"] == 12
    assert run_summary(_run([0.5] * 20), _study())["to_90"] is None  # no gain, no time to it


def test_a_grad_norm_past_five_medians_is_a_spike_and_past_the_clip_is_clipped():
    norms = [1.0] * 18 + [5.5, 50.0]
    summary = run_summary(_run([0.1] * 20, norms), _study())
    assert summary["spikes"] == 2 and summary["norm_max_med"] == pytest.approx(50.0)
    assert summary["clipped"] == pytest.approx(2 / 20)  # past the study's clip of 1.0
    assert run_summary(_run([0.1] * 20, [1.0] * 19 + [4.9]), _study())["spikes"] == 0


def test_a_whole_label_picks_that_arm_only_and_other_text_every_arm_holding_it():
    arms = default_arms()
    assert [a.label for a in select(arms, "grpo b=0")] == ["grpo b=0"]
    assert {a.name for a in select(arms, "grpo")} == {"grpo", "dr_grpo"}
    assert len(select(arms, "gvpo,dr_grpo b=0.04")) == 6
    assert select(arms, None) == list(arms)


def test_the_default_grid_has_each_algorithm_at_beta_zero_and_above_and_both_references():
    arms = default_arms()
    baselines = {("grpo", False), ("grpo", True), ("dr_grpo", False), ("dr_grpo", True)}
    assert {(a.name, a.beta > 0) for a in arms} >= baselines
    gvpo = [a for a in arms if a.name == "gvpo"]
    assert {a.reference for a in gvpo} == {"sampling", "initial"}
    assert {a.skip_zero_variance for a in gvpo} == {True, False}
    assert all(len(a.lrs) >= 2 for a in arms)
    assert len({a.label for a in arms}) == len(arms)


def test_a_page_without_the_block_gets_it_appended_and_a_second_write_replaces_it(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("# Page\n")
    write_block(doc, "copy", "first\n")
    write_block(doc, "copy", "second\n")
    assert doc.read_text() == (
        "# Page\n\n<!-- algorithms:copy:begin -->\nsecond\n<!-- algorithms:copy:end -->\n"
    )


def test_arm_labels_name_what_differs():
    assert Arm("gvpo", 0.1, "initial", False).label == "gvpo b=0.1 ref=initial keep0"
    assert Arm("dr_grpo", 0.0, mini_batches=4).label == "dr_grpo b=0 mb=4"


def test_a_merged_rerun_replaces_only_the_arms_it_ran():
    a, b = Arm("gvpo", 0.01, "initial", lrs=(1e-3,)), Arm("grpo", 0.0, "initial", lrs=(1e-3,))
    study = asdict(Study("copy", 4, 2, 4, 1, 4, 10, 1, (0,), (a, b)))
    rerun = asdict(Study("copy", 4, 2, 4, 1, 4, 10, 1, (0,), (b,)))  # tuples, as saved by main

    def result(arm, pass1):
        return {"arm": asdict(arm) | {"label": arm.label}, "lr": 1e-3, "seed": 0, "p": pass1}

    command = "python bench/algorithms.py"
    old = {"study": study, "made_by": [[command, 10.0]], "jobs": 2,
           "results": [result(a, 0.1), result(b, 0.2)]}  # fmt: skip
    new = {"study": rerun, "made_by": [[f"{command} --arms grpo --merge", 5.0]], "jobs": 2,
           "results": [result(b, 0.3)]}  # fmt: skip
    record, merged_study = merged(old, new)
    assert sorted((r["arm"]["label"], r["p"]) for r in record["results"]) == [
        ("grpo b=0", 0.3),
        ("gvpo b=0.01 ref=initial skip0", 0.1),
    ]
    assert [arm.label for arm in merged_study.arms] == [a.label, b.label]
    assert record["made_by"] == [[command, 10.0], [f"{command} --arms grpo --merge", 5.0]]
