"""Reading a space file: safe YAML -> typed, range-checked `SearchSpace` (no torch, no model).

The YAML reader refuses what PyYAML would accept silently or slowly (duplicate keys, alias bombs,
huge files, deep nesting); each section is read into its dataclass key by key (checks.py).
"""

from __future__ import annotations

import collections.abc
import dataclasses
from dataclasses import MISSING, fields
from pathlib import Path

import yaml

from minitron_nas.config.checks import POSITIVE, _hints, _rule, _shown, check_value
from minitron_nas.config.settings import DistillSettings, RankSettings, RetrainSettings
from minitron_nas.config.space import (
    AXES,
    BUDGET_COUNTS,
    FAMILY_AXES,
    METRICS,
    RUNG_METRICS,
    SAMPLER_NAMES,
    Budget,
    DeviceSettings,
    HalvingSettings,
    LatencySettings,
    ScoringSettings,
    SearchSpace,
)
from minitron_nas.errors import MinitronError
from minitron_nas.files import decode_utf8


def _values(key: str, spec) -> tuple[int, ...]:
    """An axis is a list of ints or {range: [lo, hi], step: s} / {range: [lo, hi], divisor: d}."""
    usage = "give a list of positive integers or {range: [lo, hi], step: s}"
    if isinstance(spec, list) and spec:
        return tuple(sorted({check_value(f"axes.{key}[{i}]", v, int, rule=POSITIVE) for i, v in enumerate(spec)}))
    if isinstance(spec, dict) and set(spec) <= {"range", "step", "divisor"} and "range" in spec and not {"step", "divisor"} <= set(spec):
        bounds = spec["range"]
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise MinitronError(f"axes.{key}.range is {bounds!r}: give two integers [lo, hi]")
        lo, hi = (check_value(f"axes.{key}.range[{i}]", v, int, rule=POSITIVE) for i, v in enumerate(bounds))
        if lo > hi:
            raise MinitronError(f"axes.{key}.range is [{lo}, {hi}]: give the lower bound first")
        if "divisor" in spec:
            divisor = check_value(f"axes.{key}.divisor", spec["divisor"], int, rule=POSITIVE)
            values = tuple(v for v in range(lo, hi + 1) if v % divisor == 0)
        else:
            values = tuple(range(lo, hi + 1, check_value(f"axes.{key}.step", spec.get("step", 1), int, rule=POSITIVE)))
        if not values:
            raise MinitronError(f"axes.{key} allows no value ({spec!r}): widen the range or change the divisor")
        return values
    raise MinitronError(f"axes.{key} is {spec!r}: {usage}")


def _section(cls, data, name: str):
    """A settings dataclass from a YAML mapping, each key checked against its field's type and range."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise MinitronError(f"'{name}' is {_shown(data)}: give a mapping of its settings (key: value lines under {name}:)")
    known = {f.name: f for f in fields(cls) if f.metadata.get("in_space", True)}
    for key in data:
        if key not in known:
            hint = " (the space's top-level seed sets it)" if key == "seed" else ""
            raise MinitronError(f"unknown key '{name}.{key}'{hint}: allowed are {', '.join(sorted(known))}")
    hints = _hints(cls)
    values = {}
    for f in known.values():
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING and f.init:
                raise MinitronError(f"'{name}' lacks '{f.name}': add {name}.{f.name}")
            continue
        if dataclasses.is_dataclass(hints.get(f.name)):  # a nested section, e.g. ranking.aggregation
            values[f.name] = _section(hints[f.name], data[f.name], f"{name}.{f.name}")
            continue
        default = f.default if f.default is not MISSING else MISSING
        values[f.name] = check_value(f"{name}.{f.name}", data[f.name], hints.get(f.name), default, _rule(name, f.name, f.metadata))
    try:
        return cls(**values)
    except TypeError as err:
        raise MinitronError(f"'{name}' is malformed ({err}): fix its keys") from None


def _top_level(data: dict, key: str, default):
    """A top-level scalar of the space (seed, trials, sampler, family, teacher), checked like a section key."""
    if data.get(key) is None:
        return default
    f = next(f for f in fields(SearchSpace) if f.name == key)
    given = f.default if f.default is not MISSING else MISSING
    return check_value(key, data[key], _hints(SearchSpace).get(key), given, _rule("", key, f.metadata))


MAX_SPACE_BYTES = 1_000_000  # the largest shipped space is about 4 kB
MAX_SPACE_VALUES = 100_000  # values after expanding YAML aliases (a shipped space has a few hundred)


class _SpaceLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what it would otherwise accept silently or slowly.

    A key given twice (the later one would win unseen), and aliases that expand a small file
    into millions of values (nested `*a` lists, "billion laughs"), are refused in one line.
    """

    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.space_path = path

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_SPACE_VALUES:
            raise MinitronError(
                f"search space '{self.space_path}' expands its YAML aliases (*name) to over {MAX_SPACE_VALUES:,} values: write the values out instead"
            )
        return node

    def construct_mapping(self, node, deep=False):
        first_line = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by the keys beside it
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, collections.abc.Hashable):
                continue  # the safe loader refuses it below, as invalid YAML
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise MinitronError(f"search space '{self.space_path}' sets '{key}' twice (lines {first_line[key]} and {line}): keep one of them")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds once its aliases are expanded, capped just above the limit."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = MAX_SPACE_VALUES + 1  # an alias inside its own anchor expands without end
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    else:
        children = []
    size = 1
    for child in children:
        size += _expanded_size(child, sizes)
        if size > MAX_SPACE_VALUES:
            break
    sizes[id(node)] = min(size, MAX_SPACE_VALUES + 1)
    return sizes[id(node)]


def _read_space(path: Path):
    """The parsed YAML of a space file: a regular UTF-8 file under MAX_SPACE_BYTES."""
    if not path.exists():
        raise MinitronError(f"search space '{path}' not found: give a YAML file such as search_spaces/smollm2-135m-demo.yaml")
    if not path.is_file():
        raise MinitronError(
            f"search space '{path}' is not a regular file (a folder, FIFO or device): give a YAML file such as search_spaces/smollm2-135m-demo.yaml"
        )
    size = path.stat().st_size
    if size > MAX_SPACE_BYTES:
        raise MinitronError(f"search space '{path}' is {size:,} bytes, over the {MAX_SPACE_BYTES:,} a space may have: give the space's YAML file")
    loader = _SpaceLoader(decode_utf8(path.read_bytes(), path), path)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MinitronError(f"search space '{path}' is not valid YAML{where}: fix the syntax") from None
    except RecursionError:
        raise MinitronError(f"search space '{path}' nests its YAML too deeply: write it with fewer levels") from None
    finally:
        loader.dispose()


def read_space(path: str | Path) -> SearchSpace:
    """The space file at `path`, every key type- and range-checked; lm-eval task names are checked by search.candidates.load_space."""
    path = Path(path)
    data = _read_space(path)
    if not isinstance(data, dict):
        raise MinitronError(f"search space '{path}' must be a YAML mapping: give keys such as teacher, axes and budget")
    allowed = {f.name for f in fields(SearchSpace)} - {"source"}
    for key in data:
        if key not in allowed:
            raise MinitronError(f"unknown key '{key}' in '{path}': allowed are {', '.join(sorted(allowed))}")
    for key in ("teacher", "axes", "budget"):
        if key not in data:
            raise MinitronError(f"search space '{path}' lacks '{key}': add it")
    axes = data["axes"] or {}
    if not isinstance(axes, dict):
        raise MinitronError(f"'axes' is {_shown(axes)}: give a mapping of axis: values, e.g. hidden_size: [384, 576]")
    for key in axes:
        if key not in AXES + FAMILY_AXES:
            raise MinitronError(f"unknown key 'axes.{key}': allowed are {', '.join(AXES + FAMILY_AXES)}")
    budget = _section(Budget, data["budget"], "budget")
    if budget.count not in BUDGET_COUNTS:
        raise MinitronError(f"budget.count is '{budget.count}': use {', '.join(BUDGET_COUNTS)}")
    teacher = check_value("teacher", data["teacher"], str)
    if (path.parent / teacher).exists():  # a config or model path relative to the YAML file
        teacher = str(path.parent / teacher)
    space = SearchSpace(
        teacher=teacher,
        axes={key: _values(key, spec) for key, spec in axes.items()},
        budget=budget,
        ranking=_section(RankSettings, data.get("ranking"), "ranking"),
        retrain=_section(RetrainSettings, data.get("retrain"), "retrain"),
        scoring=_section(ScoringSettings, data.get("scoring"), "scoring"),
        distill=_section(DistillSettings, data.get("distill"), "distill"),
        device=_section(DeviceSettings, data.get("device"), "device"),
        halving=_section(HalvingSettings, data.get("halving"), "halving"),
        latency=_section(LatencySettings, data.get("latency"), "latency"),
        family=_top_level(data, "family", ()) or (),
        sampler=_top_level(data, "sampler", "auto"),
        trials=_top_level(data, "trials", None),
        seed=_top_level(data, "seed", 0),
        source=str(path),
    )
    if space.sampler not in SAMPLER_NAMES:
        raise MinitronError(f"unknown sampler '{space.sampler}': use one of {', '.join(SAMPLER_NAMES)}")
    if space.halving.rung_metric not in RUNG_METRICS:
        raise MinitronError(f"unknown halving.rung_metric '{space.halving.rung_metric}': use one of {', '.join(RUNG_METRICS)}")
    if space.scoring.metric not in METRICS:
        raise MinitronError(f"unknown scoring.metric '{space.scoring.metric}': use one of {', '.join(METRICS)}")
    if space.scoring.metric == "lm_eval" and not space.scoring.tasks:
        raise MinitronError("scoring.metric is lm_eval but scoring.tasks is empty: list tasks such as [arc_easy, piqa]")
    return space
