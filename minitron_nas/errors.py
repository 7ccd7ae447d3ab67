"""The one exception type users see: its message is a single line naming problem and fix."""


class MinitronError(Exception):
    """Bad input or state that the user can fix; the CLI prints it as one line and exits 2."""
