"""Checking one value of a space file: its type, its range, and an error that names the fix.

Each number has a `Range` (by `section.key`, by bare key, or on the field itself); a value of the
wrong type or outside its range is refused in one line that names the key and what to give.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import MISSING, dataclass

from minitron_nas.errors import MinitronError


@dataclass(frozen=True)
class Range:
    """Allowed numbers of a setting: [low, high], either end open or absent."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.high_open and value == self.high))

    def words(self) -> str:
        low, high = _bound(self.low), _bound(self.high)
        if self.low == 0 and self.low_open and self.high is None:
            return "positive"
        if self.low is not None and self.high is None:
            return f">= {low}" if not self.low_open else f"> {low}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        return f"<= {high}" if self.high is not None else ""


def _bound(value) -> str:
    return "" if value is None else str(int(value)) if float(value).is_integer() else f"{value:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
# Ranges by `section.key` or by bare key (any section). Numbers not listed must be >= 0; a
# field can also carry its own: `field(default=..., metadata={"range": Range(...)})`.
RANGES: dict[str, Range] = {
    **{
        key: POSITIVE
        for key in (
            "parameters",
            "memory_gb",
            "context",
            "batch",
            "bytes_per_value",
            "samples",
            "seq_len",
            "tokens",
            "batch_size",
            "lr",
            "temperature",
            "top_k",
            "checkpoint_every",
            "heldout_samples",
            "limit",
            "trials",
            "family",
            "budget_tokens",
            "budget_fraction",
            "final_candidates",
            "new_tokens",
            "repeats",
            "min_decode_tokens_per_s",
            "grad_accum",
            "steps",
            "max_grad_norm",
        )
    },
    "halving.eta": Range(2),  # each rung keeps 1/eta
    "halving.min_steps": Range(4),  # halving.MIN_STEPS
    "halving.within_noise": Range(0, 1),
    "scoring.heldout_samples": Range(2),  # a standard error needs two blocks
    "tolerance": Range(0, 1, low_open=True, high_open=True),
    "seed": Range(0, 2**32 - 1),  # numpy's seeds
}


def _rule(section: str, key: str, metadata) -> Range:
    if metadata and "range" in metadata:
        return metadata["range"]
    return RANGES.get(f"{section}.{key}" if section else key, RANGES.get(key, NON_NEGATIVE))


def _hints(cls) -> dict:
    """Resolved field annotations; one that cannot be resolved is left unchecked."""
    try:
        return typing.get_type_hints(cls)
    except Exception:
        hints = {}
        namespace = {**{name: getattr(typing, name) for name in typing.__all__}, **vars(sys.modules[cls.__module__])}
        for name, text in getattr(cls, "__annotations__", {}).items():
            try:
                hints[name] = eval(text, namespace) if isinstance(text, str) else text
            except Exception:
                pass
        return hints


def _shown(value) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _wanted(kind: str, rule: Range, default) -> str:
    words = rule.words()
    text = {"int": "a whole number", "float": "a number"}[kind]
    if words == "positive":
        text = f"a positive {text[2:]}"
    elif words:
        text = f"{text} {words}"
    if default is not None and default is not MISSING and not isinstance(default, bool) and isinstance(default, (int, float)) and rule.allows(default):
        text += f" such as {_shown(default)}"
    return f"give {text}"


def _number(value):
    """YAML reads 3e-4 and 4.5e9 (no dot) as text: numbers written so are numbers."""
    if isinstance(value, str):
        try:
            return float(value.strip().replace("_", ""))
        except ValueError:
            return value
    return value


def check_value(key: str, value, hint, default=MISSING, rule: Range = NON_NEGATIVE):
    """`value` converted to the annotated type `hint`, or a one-line MinitronError naming `key`.

    Knows int, float, bool, str, Optional/unions, tuple[X, ...], list[X] and dict; any other
    annotation is passed through unchecked.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        first = None
        for option in options:
            try:
                return check_value(key, value, option, default, rule)
            except MinitronError as err:
                first = first or err
        if first is None:
            return value
        raise first
    if hint is bool:
        if not isinstance(value, bool):
            raise MinitronError(f"{key} is {_shown(value)}: give true or false")
        return value
    if hint is int or hint is float:
        kind = hint.__name__
        number = _number(value)
        try:
            ok = isinstance(number, (int, float)) and not isinstance(number, bool) and math.isfinite(number)
            if ok and hint is int:
                ok = float(number).is_integer()
                number = int(number) if ok else number
        except OverflowError:  # an integer beyond any float
            ok = False
        if not ok or not rule.allows(number):
            raise MinitronError(f"{key} is {_shown(value)}: {_wanted(kind, rule, default)}")
        return hint(number)
    if hint is str:
        if isinstance(value, bool):  # YAML reads on/off/yes/no as booleans
            return "on" if value else "off"
        if not isinstance(value, str) or not value:
            example = f" such as {default!r}" if isinstance(default, str) and default else ""
            raise MinitronError(f"{key} is {_shown(value)}: give a text value{example}")
        return value
    if origin in (tuple, list) or hint in (tuple, list):
        kind = origin or hint
        if not isinstance(value, (list, tuple)):
            raise MinitronError(f"{key} is {_shown(value)}: give a list such as [a, b]")
        item = args[0] if args and (len(args) == 1 or args[1] is Ellipsis) else None
        items = [check_value(f"{key}[{i}]", v, item, MISSING, rule) if item is not None else v for i, v in enumerate(value)]
        return kind(items)
    if hint is dict or origin in (dict, typing.Mapping) or (origin is not None and getattr(origin, "__name__", "") == "Mapping"):
        if not isinstance(value, dict):
            raise MinitronError(f"{key} is {_shown(value)}: give a mapping of key: value pairs")
        return value
    return value


def check_fields(settings, section: str) -> None:
    """Every number, flag and text of a settings dataclass checked by the rules a space file's
    keys are checked by (the same `Range`s), so the Python API refuses what YAML would."""
    hints = _hints(type(settings))
    for f in dataclasses.fields(settings):
        hint, value = hints.get(f.name), getattr(settings, f.name)
        if hint is None or dataclasses.is_dataclass(value):
            continue
        check_value(f"{section}.{f.name}", value, hint, f.default, _rule(section, f.name, f.metadata))
