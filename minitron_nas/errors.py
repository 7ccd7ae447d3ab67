"""The one exception type users see: its message is a single line naming problem and fix."""


class MinitronError(Exception):
    """Bad input or state that the user can fix; the CLI prints it as one line and exits 2."""


def add_resume_hint(err: BaseException, hint: str) -> None:
    """Say on an interrupt (KeyboardInterrupt) what was kept and how to go on.

    The CLI prints `interrupted: <hint>` and exits 130. The innermost stage knows best, so a
    hint already set is kept; `KeyboardInterrupt("...")` with a message works the same way.
    """
    if not resume_hint(err):
        err.resume_hint = hint


def resume_hint(err: BaseException) -> str | None:
    return getattr(err, "resume_hint", None) or (str(err) if err.args and isinstance(err.args[0], str) and err.args[0] else None)
