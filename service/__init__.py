"""gvpo-service: the API, its CLI and the embedded stack (workers/ is the data plane)."""

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "gvpo-service"  # pyproject's project name

try:
    __version__ = version(DISTRIBUTION)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
