"""The README's five-minute tour, run as written, so that a docs example cannot rot: its fenced
blocks, read from README.md, in order, in a new directory against a live `gvpo up`.

The rule, which the README states too: every fenced block of the section runs; an indented block
is shown, never run (`gvpo up`, which this test starts itself). ```bash blocks run as one shell
session would, `bash -euo pipefail`, their variables (GVPO_API_KEY, FILE, RUN) carried from
block to block: `-a` exports them, and the environment a block ends with is the next one's.
```python blocks run with the venv's python. A fenced block of any other language fails the
test: nothing the tour shows fenced goes unchecked."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services import gvpo_up, stack_settings

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## A five-minute tour"
FENCED = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
RUNS = {"bash", "python"}
TOUR_S = 900  # the whole tour on a loaded 2-core machine: a model load and 250 steps
STOP_S = 60


def tour_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the tour, in order."""
    text = README.read_text()
    assert SECTION in text, f"README.md has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return [(m.group(1).strip(), m.group(2)) for m in FENCED.finditer(section)]


def test_the_tour_has_each_step_fenced_and_gvpo_up_only_shown():
    blocks = tour_blocks()
    assert {language for language, _ in blocks} <= RUNS, [b for b in blocks if b[0] not in RUNS]
    shell = "\n".join(text for language, text in blocks if language == "bash")
    for step in ("api-key create", "files upload", "submit", "runs watch", "checkpoints download"):
        assert f"gvpo {step}" in shell, step
    assert "gvpo up" not in shell  # the test provides the stack


@pytest.fixture
def stack(tmp_path):
    """`gvpo up` with its data directory where the tour's terminal finds it (./.gvpo of the
    tour's directory, as when both run in one directory); yields (directory, API URL)."""
    tour = tmp_path / "tour"
    up, url = gvpo_up(stack_settings(tour / ".gvpo"))
    try:
        yield tour, url
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()


def tour_env(url: str) -> dict[str, str]:
    """A user's second terminal: the venv's bin first on PATH (`gvpo` and `python` are this
    checkout's), the stack's URL (it listens on a port of its own, not 8000), and none of the
    GVPO_ settings of the process running the tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GVPO_")}
    venv_bin = str(Path(sys.executable).parent)
    return {**env, "PATH": f"{venv_bin}{os.pathsep}{env.get('PATH', '')}", "GVPO_API_URL": url}


def test_the_readmes_tour_runs_green(stack, tmp_path):
    tour, url = stack
    scripts = tmp_path / "blocks"  # beside the tour's directory, not in it
    scripts.mkdir()
    state = scripts / "environment"  # what a block leaves for the next one
    env = tour_env(url)
    for number, (language, text) in enumerate(tour_blocks(), start=1):
        block = scripts / f"{number}.{'py' if language == 'python' else 'sh'}"
        block.write_text(text)
        run = f'. "{block}"' if language == "bash" else f'python "{block}"'
        out = subprocess.run(
            ["bash", "-aeuo", "pipefail", "-c", f'{run}\nenv -0 > "{state}"'],
            cwd=tour,
            env=env,
            capture_output=True,
            text=True,
            timeout=TOUR_S,
        )
        assert out.returncode == 0, (
            f"README tour block {number} ({language}) exited {out.returncode}:\n{text}\n"
            f"--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}"
        )
        env = dict(v.split("=", 1) for v in state.read_text().split("\0") if "=" in v)
    assert (tour / "copy3-model" / "config.json").is_file()
