"""gvpo-service: the API, its CLI and the embedded stack (workers/ is the data plane)."""

from functools import cache
from importlib.metadata import PackageNotFoundError, version

DISTRIBUTION = "gvpo-service"  # pyproject's project name


@cache
def installed_version() -> str:
    """The installed distribution's version. Looked up when asked, not at import: reading the
    installed packages' metadata takes tens of milliseconds that every process importing
    `service` (each CLI command, each worker) would pay."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
