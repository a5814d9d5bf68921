"""The `gvpo` command's one error boundary: whatever a command raises reaches the user as a line
or two that say what happened and what to do, never as a traceback, with an exit code: 1 an
error, 2 a usage mistake (click's own), 130 Ctrl-C, 141 (silently) a reader of its output that
went away. GVPO_DEBUG=1 prints the traceback first."""

import os
import sys
import traceback

import click

DEBUG = "GVPO_DEBUG"
INTERRUPTED = 130  # 128 + SIGINT: what a shell reports of a program Ctrl-C stopped
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports of a program whose reader went away


class CliError(click.ClickException):
    """What the user is told, on standard error: `message` (a line, or a header and indented
    lines), after "Error: " unless it is an interruption the user asked for."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        prefix = "" if self.exit_code == INTERRUPTED else "Error: "
        click.echo(f"{prefix}{self.format_message()}", file=file or sys.stderr)


class Gvpo(click.Group):
    """The root group: runs the command, and turns whatever else it raises into a CliError.
    click's own exceptions (usage errors, exits, the messages commands raise on purpose) pass
    through as they are."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            # The reader left (`gvpo runs list | head -1`): nothing is wrong and no one is
            # there to tell. Standard output goes nowhere from now on, so that flushing it at
            # exit does not fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise click.exceptions.Exit(BROKEN_PIPE) from None
        except BaseException as exc:  # KeyboardInterrupt too
            if debugging():
                traceback.print_exception(exc)
            raise describe(exc) from None


def debugging() -> bool:
    return os.environ.get(DEBUG, "").strip().lower() not in ("", "0", "false", "no")


def describe(exc: BaseException) -> CliError:
    """What to tell the user about `exc`."""
    import httpx
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from service.client import ApiError
    from service.stack import StackError

    if isinstance(exc, KeyboardInterrupt):
        return CliError("interrupted", INTERRUPTED)
    if isinstance(exc, ApiError):
        return _refused(exc)
    if isinstance(exc, httpx.TransportError):
        return _unreachable(exc)
    if isinstance(exc, StackError):
        return CliError(str(exc))
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        return CliError(
            "a GVPO_ setting in the environment is invalid:\n"
            + "\n".join(
                f"  GVPO_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
            )
        )
    if isinstance(exc, OperationalError):
        return _database(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return CliError(f"{exc.filename}: {exc.strerror or exc}")
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return CliError(
        f"unexpected error: {type(exc).__name__}{f': {detail}' if detail else ''} "
        f"({DEBUG}=1 shows the traceback)"
    )


def _refused(exc) -> CliError:
    """An error answer of the API: its message, the fields it names, and what to do."""
    said = f"{exc.status} {exc.code}"
    if exc.status == 401:
        return CliError(
            f"the API key was refused ({said}: {exc.message}): set GVPO_API_KEY to a key of "
            "this API (`gvpo api-key create --project NAME` makes one, on the API's machine)"
        )
    fields = exc.details.get("fields") if isinstance(exc.details, dict) else None
    if exc.status == 422 and fields:  # the message lists the fields too: said once, here
        lines = [f"  {f.get('field', '?')}: {f.get('message', '')}" for f in fields]
        return CliError("\n".join([f"the API refused the request ({said}):", *lines]))
    message = (exc.message.strip().splitlines() or [""])[0][:300]
    if exc.status >= 500:
        return CliError(
            f"the API failed to answer ({said}{f': {message}' if message else ''}); try again "
            "later, and look at the API's log if it goes on"
        )
    return CliError(f"{message} ({said})" if message else f"the API refused the request ({said})")


def _unreachable(exc) -> CliError:
    """No answer: nothing listens at the URL, it took too long, or the connection broke."""
    import httpx

    try:
        url = str(exc.request.url.copy_with(path="/", query=None, fragment=None)).rstrip("/")
    except RuntimeError:  # an error raised before the request was made
        url = "GVPO_API_URL"
    if isinstance(exc, httpx.ConnectError):
        return CliError(
            f"cannot reach the API at {url}: is `gvpo up` running? (set GVPO_API_URL to "
            "where the API is)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return CliError(
            f"the API at {url} did not answer in time ({type(exc).__name__}); try again later"
        )
    if isinstance(exc, httpx.UnsupportedProtocol):
        return CliError(f"GVPO_API_URL must be an http:// or https:// URL: {exc}")
    return CliError(
        f"the connection to the API at {url} broke ({type(exc).__name__}: {exc}); try again"
    )


def _database(exc) -> CliError:
    """The database of this machine's settings could not be reached or used."""
    from sqlalchemy.engine import make_url

    from service.config import get_settings

    url = make_url(get_settings().resolved_database_url).render_as_string(hide_password=True)
    reason = (str(getattr(exc, "orig", exc)).strip().splitlines() or ["?"])[0]
    return CliError(f"cannot use the database at {url} (GVPO_DATABASE_URL): {reason}")
