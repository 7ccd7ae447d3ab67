"""How a command ends: bad input as one line and exit 2; Ctrl-C or SIGTERM as one line saying what
was kept and how to go on, exit 130; a lost study database, a full or read-only disk as one line,
never a traceback."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

from minitron_nas.errors import MinitronError, resume_hint
from minitron_nas.files import WRITE_ERRNOS, write_failure

__all__ = ["console", "one_line_errors"]

console = Console(stderr=True)


def _quiet_libraries() -> None:
    """Our own progress bars stay; transformers' weight-loading bars are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# What an interrupted command kept and how to go on, unless the work in progress said more.
INTERRUPTED = {
    "rank": "rankings not written; rerun the same command",
    "prune": "pruned model not written; rerun the same command",
    "search": "finished trials are kept in the study; rerun with --resume to continue",
    "distill": "the last checkpoint (if any) is kept in RUN/distill; rerun the same command to resume",
    "export": "export not written (the distilled model is kept); rerun the same command",
    "run": "finished stages are kept in the run folder; rerun the same command to resume",
}


def _ignore_further_interrupts() -> None:
    """The command is ending: a second Ctrl-C or SIGTERM is ignored on the way out, where it would
    end an exit handler (torch's, Optuna's) with a traceback instead of the one line."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: outputs stay whole, one line is printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lost_connection(err: BaseException | None) -> BaseException | None:
    """The database error behind `err`, if any: libraries wrap it (Optuna raises others while handling it)."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None:
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (exc.OperationalError, exc.InterfaceError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _reason(err: BaseException) -> str:
    return (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0][:160]


def _storage_message(err: BaseException) -> str:
    reason = _reason(err)
    if "database or disk is full" in reason:  # SQLite's SQLITE_FULL: the errno is not passed on
        return f"no space left on the device while writing the study's database ({reason}): free disk space, then rerun with --resume"
    if "readonly database" in reason:
        return f"the study's database is read-only ({reason}): make the file and its folder writable (chmod u+w), then rerun with --resume"
    return f"lost the connection to the study's database ({reason}): check that the server runs, then rerun with --resume"


@contextmanager
def _quiet_heartbeat_threads():
    """A trial's heartbeat thread that loses the database says so in one line, not a traceback."""
    previous = threading.excepthook

    def hook(args):
        lost = _lost_connection(args.exc_value)
        if lost is None:
            return previous(args)
        console.print(
            f"\nwarning: a trial's heartbeat stopped ({escape(_reason(lost))}); another worker may fail and retry that trial",
            highlight=False,
            soft_wrap=True,
        )

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def one_line_errors(command):
    """Bad input -> `error: ...` on one line and exit status 2, never a traceback.

    Ctrl-C or SIGTERM -> `interrupted: <what was kept; how to resume>` and exit status 130.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _terminate_as_interrupt(), _quiet_heartbeat_threads():
                _quiet_libraries()
                return command(*args, **kwargs)
        except MinitronError as err:
            console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:
            _ignore_further_interrupts()
            hint = resume_hint(err) or INTERRUPTED.get(command.__name__, "nothing was written; rerun the same command")
            console.print(f"\ninterrupted: {escape(hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as err:
            lost = _lost_connection(err)
            message = _storage_message(lost) if lost is not None else write_failure(None, err, WRITE_ERRNOS)
            if message is None:
                raise
            console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper
