"""Console output shared by every command: one-line errors, warnings and progress bars."""

import shutil
import sys
import time
from functools import wraps

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False, soft_wrap=True, width=max(120, shutil.get_terminal_size().columns))


def command_app(**settings) -> typer.Typer:
    """A command's Typer app, as every command makes it: no shell-completion options, no pretty tracebacks, and
    click's plain help (Typer's rich help shows every flag of click 8.5 as `--watch <bool>`, as if it took a
    value)."""
    return typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, **settings)


class InspectError(Exception):
    """A problem with the user's input (a file, a folder, an option) that they can act on."""


def warn(message: str) -> None:
    console.print(f"[yellow]warning:[/yellow] {escape(message)}")


class RateLimitedWarning:
    """A warning said at once, then at most once per `interval_s` while the condition lasts, with a count of
    what was not said."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s, self.last, self.silenced = interval_s, {}, {}

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(key, -self.interval_s) >= self.interval_s:
            extra = self.silenced.pop(key, 0)
            warn(message + (f" ({extra} more since the last warning)" if extra else ""))
            self.last[key] = now
        else:
            self.silenced[key] = self.silenced.get(key, 0) + 1


def one_line_errors(func):
    """Wrap a CLI entry point: InspectError and Ctrl-C become one line and a non-zero exit code."""

    @wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except InspectError as error:
            console.print(f"[red]error:[/red] {escape(str(error))}")
            sys.exit(2)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            sys.exit(130)

    return wrapper


def progress_bar() -> Progress:
    """A rich progress bar on stderr, with elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=console, transient=False,
    )
