"""mkdocs hook: adds the generated reference pages to the site before the navigation is built.
They exist only in the build (nothing is written into docs/), so they cannot go stale."""

from api_page import api_markdown
from mkdocs.structure.files import File
from run_spec_page import RunSpecPage

PAGES = {
    "reference/run-spec.md": lambda: RunSpecPage().markdown(),
    "reference/api.md": api_markdown,
}


def on_files(files, config):
    for src_uri, make in PAGES.items():
        files.append(File.generated(config, src_uri, content=make()))
    return files
