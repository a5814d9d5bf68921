"""Generate the Python gRPC code from proto/gvpo/v1/*.proto, next to the .proto files.

    python proto/generate.py           # rewrite the generated modules
    python proto/generate.py --check   # exit 1 if they differ from what the .proto files give

The generated `*_pb2*.py(i)` files are never edited by hand. They are importable as `gvpo.v1`
(pyproject maps the `gvpo` package to proto/gvpo), matching the proto package, so the imports
protoc writes between them work as they are.
"""

import argparse
import filecmp
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "gvpo" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    """Write the generated modules under `out` (mirroring gvpo/v1); returns their paths."""
    protos = sorted(PACKAGE.glob("*.proto"))
    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p.relative_to(ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(p.name for p in protos)}")
    return [out / "gvpo" / "v1" / (p.stem + suffix) for p in protos for suffix in SUFFIXES]


def drifted() -> list[str]:
    """Generated modules whose committed copy differs from a fresh generation (or is missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f"gvpo/v1/{f.name}"
            for f in fresh
            if not (PACKAGE / f.name).exists()
            or not filecmp.cmp(f, PACKAGE / f.name, shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on drift")
    if parser.parse_args().check:
        stale = drifted()
        if stale:
            sys.exit(
                f"generated gRPC code is out of date with the .proto files: {', '.join(stale)}; "
                "run `python proto/generate.py`"
            )
        print("generated gRPC code matches the .proto files")
        return
    for path in generate(ROOT):
        print(path.relative_to(ROOT.parent))


if __name__ == "__main__":
    main()
