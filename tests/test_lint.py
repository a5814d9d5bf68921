"""The tree is formatted and lint-clean under the project's ruff configuration (pyproject.toml:
pycodestyle, pyflakes, import order, bugbear, pyupgrade, simplify)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ruff_check_finds_nothing():
    out = ruff("check")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_code_is_formatted():
    out = ruff("format", "--check")
    assert out.returncode == 0, out.stdout + out.stderr
