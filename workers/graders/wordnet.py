"""WordNet 3.0 for text_similarity's METEOR (its synonym matches), where nltk's data downloader
cannot reach the internet.

Debian's and Ubuntu's `wordnet-base` and `wordnet-sense-index` packages ship the WordNet 3.0
database in /usr/share/wordnet. nltk reads WordNet only from a `corpora/wordnet` folder under
one of its data roots (nltk.data.path, where its path checks allow reading; not through links
out of it), and wants the `lexnames` table, which the packages leave out. So installing lays
the packages' files out as nltk's corpus, with that table, under a data root nltk searches by
default: this Python's `share/nltk_data` (the virtual environment's). `make services` and the
worker image run it:

    python -m workers.graders.wordnet [ROOT]

The worker then loads WordNet the ordinary way (nltk.corpus.wordnet), nltk's own download of
it included.
"""

import shutil
import sys
from pathlib import Path

from workers.errors import RunError

SYSTEM = Path("/usr/share/wordnet")
DEFAULT_ROOT = Path(sys.prefix) / "share" / "nltk_data"
# What nltk's WordNetCorpusReader reads (index.sense comes in wordnet-sense-index).
FILES = (
    "cntlist.rev",
    "index.sense",
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("adj", "adv", "noun", "verb")),
    *(f"{pos}.exc" for pos in ("adj", "adv", "noun", "verb")),
)
# WordNet 3.0's lexicographer files by number (the table of lexnames(5WN)); each line of
# `lexnames` is "NN<tab>name<tab>category", the category 1-4 for noun, verb, adjective, adverb.
# fmt: off
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance",
    "noun.time", "verb.body", "verb.change", "verb.cognition", "verb.communication",
    "verb.competition", "verb.consumption", "verb.contact", "verb.creation", "verb.emotion",
    "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
# fmt: on
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
HOW = (
    "install Debian's or Ubuntu's wordnet-base and wordnet-sense-index packages, then run "
    "`python -m workers.graders.wordnet` with the worker's Python (`make services` does both), "
    "or install nltk's own data (python -m nltk.downloader wordnet)"
)


def install(root: Path = DEFAULT_ROOT, source: Path = SYSTEM) -> Path:
    """Lay out `source`'s WordNet files as nltk's wordnet corpus under `root`; its folder."""
    missing = [name for name in FILES if not (source / name).is_file()]
    if missing:
        raise SystemExit(f"{source} lacks {', '.join(missing)}: {HOW}")
    folder = root / "corpora" / "wordnet"
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(source / name, folder / name)  # copies: nltk refuses links out of roots
    (folder / "lexnames").write_text(
        "".join(
            f"{number:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n"
            for number, name in enumerate(LEXNAMES)
        )
    )
    return folder


def load():
    """nltk's WordNet reader, loaded; RunError saying how to install WordNet when it is not."""
    from nltk.corpus import wordnet

    try:
        wordnet.synsets("dog")  # a lazy corpus loads on first use
    except (LookupError, OSError):
        raise RunError(
            "text_similarity's meteor metric needs WordNet 3.0 on the worker, and nltk finds "
            f"none: {HOW}; or choose another metric"
        ) from None
    return wordnet


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ROOT
    print(f"WordNet for nltk in {install(root)}")
