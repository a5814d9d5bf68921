"""What `gvpo submit` and `gvpo runs rescore` read: YAML that expands past any spec's size (an
alias bomb, an alias that contains itself), nests too deeply or does not parse is refused with a
message before anything is sent."""

import pytest
from click.testing import CliRunner

from service.cli import main

LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    "text, needle",
    [
        (LAUGHS, "expands to more than 1,000,000 values"),
        ("&loop [*loop]\n", "expands to more than 1,000,000 values"),
        ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
        ("model: {path: [unclosed\n", "is not valid YAML"),
    ],
)
@pytest.mark.parametrize("command", [["submit"], ["runs", "rescore", "run_x"]])
def test_a_document_no_spec_could_be_is_refused_before_sending(tmp_path, command, text, needle):
    document = tmp_path / "spec.yaml"
    document.write_text(text)
    # nothing listens here: reaching the API would be a connection error, not this message
    env = {"GVPO_API_URL": "http://127.0.0.1:9", "GVPO_API_KEY": "gvpo_sk_unused"}
    result = CliRunner().invoke(main, [*command, str(document)], env=env)
    assert result.exit_code == 1, result.output
    assert needle in result.output


def test_the_installed_command_refuses_it_too(tmp_path):
    """Through `python -m service.cli`, as a user's shell runs it (the whole module loaded)."""
    import os
    import subprocess
    import sys

    document = tmp_path / "bomb.yaml"
    document.write_text(LAUGHS)
    env = {**os.environ, "GVPO_API_URL": "http://127.0.0.1:9", "GVPO_API_KEY": "gvpo_sk_unused"}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "submit", str(document)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "expands to more than 1,000,000 values" in done.stderr
