"""The manual builds as a site (mkdocs, strict: a broken link or anchor fails) with no warning;
its generated reference pages name every field of the run spec and every operation of the REST
API, walked here from the schema and the OpenAPI document on their own; and no page points at a
file outside the repository."""

import html
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from service.config import Settings
from service.contract.environments import BUILTIN_ENVIRONMENTS
from service.contract.rewards import BUILTIN_REWARDS
from service.contract.spec import RunSpec
from service.main import create_app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
# The product's design document and the team's other notes live beside the repository, not in it.
OUTSIDE = ("../shared", "/work/", "DESIGN.md")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = built.stdout + built.stderr
    assert built.returncode == 0, output
    assert "WARNING" not in output, output
    return out


def codes(page: Path) -> set[str]:
    """The text of every inline code element of a built page."""
    return {html.unescape(c) for c in re.findall(r"<code>([^<]*)</code>", page.read_text())}


def leaf_fields(node: dict, defs: dict, path: str = "") -> set[str]:
    """Every field path of a schema that holds a value rather than an object: `model.lora.r`,
    `reward.url` (each choice of a union), `reward.components[].label` (a list's objects)."""
    if "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    choices = [c for c in node.get("anyOf") or node.get("oneOf") or [] if c.get("type") != "null"]
    if choices:
        return set().union(*(leaf_fields(c, defs, path) for c in choices))
    if "properties" in node:
        return set().union(
            *(
                leaf_fields(child, defs, f"{path}.{name}" if path else name)
                for name, child in node["properties"].items()
            )
        )
    if node.get("type") == "array" and node.get("items"):
        inside = leaf_fields(node["items"], defs, f"{path}[]")
        if inside != {f"{path}[]"}:  # a list of objects: their fields
            return inside
    return {path}


def test_the_site_builds_in_strict_mode_with_no_warning(site):
    home = (site / "index.html").read_text()
    # The architecture picture is README's, included between its snippet markers.
    readme = (ROOT / "README.md").read_text()
    picture = readme.split("[start:architecture]")[1].split("[end:architecture]")[0]
    drawn = [line.strip() for line in picture.splitlines()[2:-2] if line.strip()]
    assert len(drawn) > 5
    assert [line for line in drawn if html.escape(line, quote=False) not in home] == []


def test_the_run_spec_reference_names_every_field(site):
    schema = RunSpec.model_json_schema()
    fields = leaf_fields(schema, schema["$defs"])
    assert {"model.path", "reward.url", "reward.components[].label", "sampling.stop"} <= fields
    named = codes(site / "reference" / "run-spec" / "index.html")
    assert fields - named == set()
    for name, params in BUILTIN_REWARDS.items():
        assert name in named
        assert {f"reward.params.{p}" for p in params.model_fields} - named == set()
    for name, params in BUILTIN_ENVIRONMENTS.items():
        assert name in named
        assert {f"environment.params.{p}" for p in params.model_fields} - named == set()


def test_the_api_reference_names_every_operation(site):
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            data_dir=data_dir, database_url=f"sqlite:///{data_dir}/gvpo.db", grpc_port=0
        )
        document = create_app(settings).openapi()
    operations = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    assert "POST /v1/runs" in operations
    page = site / "reference" / "api" / "index.html"
    assert operations - codes(page) == set()
    for schema in ("RunRead", "CheckpointRead", "DryRunRequest"):  # what the operations link to
        assert f'id="schema-{schema.lower()}"' in page.read_text()


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_points_outside_the_repository(page):
    text = page.read_text()
    assert [o for o in OUTSIDE if o in text] == []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z]+:|#", target):  # a URL or an anchor on the same page
            continue
        resolved = (page.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{target} leaves the repository"
        # The site's generated pages exist only in the build, where mkdocs checks links to them.
        if not resolved.is_relative_to(DOCS / "reference"):
            assert resolved.exists(), f"{target} does not exist"


def test_no_built_page_points_outside_the_repository(site):
    for page in site.rglob("*.html"):
        text = page.read_text()
        assert [o for o in OUTSIDE if o in text] == [], page.relative_to(site)
