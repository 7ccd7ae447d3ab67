"""What a worker says as it goes: one line per event on stderr, beside rung 0's progress bar."""

from __future__ import annotations

import sys

from minitron_nas.evaluate.metrics import Measurement

__all__ = ["say", "shown"]


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def shown(m: Measurement | None) -> str:
    """A measurement as `value ± stderr`, or n/a."""
    if m is None:
        return "n/a"
    return f"{m.value:.4f}" + ("" if m.stderr is None else f" ± {m.stderr:.4f}")
