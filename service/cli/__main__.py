"""`python -m service.cli`: the `gvpo` command."""

import sys

if __name__ == "__main__":
    try:
        from service.cli import run
    except KeyboardInterrupt:  # Ctrl-C while the command loads: no traceback then either
        sys.exit(130)
    run()
