"""Search spaces: a YAML file -> typed settings -> every feasible architecture, exactly counted.

A space names the teacher, the allowed values of each axis, the budget, and how candidates
are retrained and scored. Enumeration walks the product of the axes, keeps what can be
sliced from the teacher and what transformers accepts, and keeps the candidates whose
exact parameter count (or memory, weights plus KV cache) lies within the budget.

Long (about 550 lines) because it is the whole search-space file format: the section
dataclasses, a typed and range-checked reader for every key, and exact enumeration; the
stage settings themselves are in settings.py.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import itertools
import math
import sys
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import yaml

from .architecture import (
    Architecture,
    ParamCounter,
    head_dim_of,
    student_config,
    validate,
)
from .devices import check_device_name, check_dtype_name
from .errors import MinitronError
from .files import decode_utf8
from .samplers import SAMPLERS
from .settings import DistillSettings, RankSettings, RetrainSettings

RUNG_METRICS = ("kld", "heldout_loss")
METRICS = ("lm_eval", "heldout_loss", "kld")
AXES = ("hidden_size", "intermediate_size", "heads_per_group", "num_key_value_heads", "num_hidden_layers")


@dataclass(frozen=True)
class Budget:
    parameters: int
    count: str = "total"  # or "non_embedding"
    tolerance: float = 0.05  # relative, on both sides of the target
    memory_gb: float | None = None  # weights + KV cache, optional second limit
    context: int = 4096
    batch: int = 1
    bytes_per_value: int = 2


@dataclass(frozen=True)
class HalvingSpec:
    """How the search spends its retraining tokens: synchronous successive halving (halving.py)."""

    eta: int = 3
    """Each rung keeps the best 1/eta of its candidates; the next rung retrains them on eta x the tokens."""
    budget_tokens: int | None = None
    """Training tokens the whole search may spend; None: `budget_fraction` of `distill.tokens`."""
    budget_fraction: float | None = None
    """The search's budget as a fraction of the final distillation's tokens, e.g. 0.25 (with
    neither budget: as many halvings as keep `final_candidates`, the last at `retrain.tokens`)."""
    rung_metric: str = "kld"
    """What the rungs before the last compare on, at equal tokens: kld or heldout_loss. Rung 0 scores
    every candidate pruned on it (forward passes only)."""
    retrained: int | None = None
    """How many of rung 0's best are retrained (None: final_candidates x eta^2, fewer if the budget
    asks); 0: no retraining, the search is pruned scoring over the whole set."""
    min_steps: int = 4
    """Fewest optimizer steps of a retraining rung (4 or more: warm-up, stable and decay each need some)."""
    final_candidates: int = 2
    """Fewest candidates the last rung keeps (ranked there by `scoring.metric`)."""
    within_noise: float = 0.5
    """Candidates within one standard error of a rung's cut line go on too, up to this share of those
    promoted by rank (their tokens are reserved in the budget)."""
    order_pilot: int = 2
    """More data orders of rung 1's first candidate, trained to measure the data-order term of every
    retraining rung's standard error; 0: leave that term out."""

    def budget(self, distill_tokens: int) -> int | None:
        if self.budget_tokens is not None:
            return self.budget_tokens
        return None if self.budget_fraction is None else int(self.budget_fraction * distill_tokens)


@dataclass(frozen=True)
class LatencySpec:
    """Inference speed of each candidate on the run's device (latency.py), a constraint if asked."""

    measure: bool = False
    """Measure prefill and decode throughput of every candidate at rung 0."""
    batch_size: int = 1
    """Sequences per forward pass."""
    context: int = 256
    """Prompt tokens per sequence (prefill)."""
    new_tokens: int = 32
    """Tokens generated per sequence through the KV cache (decode)."""
    repeats: int = 3
    """Timed repeats; the median is kept (one untimed warm-up first)."""
    min_decode_tokens_per_s: float | None = None
    """Candidates that decode slower than this are stopped at rung 0 and never promoted (implies measure)."""

    @property
    def active(self) -> bool:
        return self.measure or self.min_decode_tokens_per_s is not None


@dataclass(frozen=True)
class ScoringSpec:
    """How a candidate is scored: lm-eval tasks, held-out loss, or KL divergence to the teacher."""

    metric: str = "heldout_loss"
    """lm_eval, heldout_loss or kld."""
    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names: any lm-eval knows, or one defined under include_path."""
    limit: int | dict[str, int] | None = None
    """Documents scored per task (the first N), one number or {task: N}; None scores all."""
    num_fewshot: int | dict[str, int] | None = None
    """Few-shot examples per prompt, one number or {task: n}; None keeps each task's default (0 for most)."""
    include_path: tuple[str, ...] = ()
    """Folders or YAML files of your own lm-eval task configs (lm-eval's --include_path)."""
    objective: str | dict[str, float] | None = None
    """'task/metric', or {'task/metric': weight} for a weighted mean; None: mean over tasks of acc_norm (else acc)."""
    batch_size: int = 16
    """lm-eval requests per forward pass."""
    data_dir: str | None = None
    """Folder of upstream benchmark files: the seven converted tasks are scored from it offline.
    None: lm-eval loads every task itself (the Hugging Face Hub, or its cache when offline)."""
    tasks_optional: bool = False
    """True: when data_dir is missing, score on held-out KL divergence instead of refusing the space."""
    heldout_samples: int = 32
    """Held-out blocks for heldout_loss and kld (their standard errors are over blocks)."""
    seq_len: int = 256
    """Tokens per held-out block."""

    def __post_init__(self):
        # YAML gives lists and single strings; keep the frozen spec's sequences immutable
        if isinstance(self.tasks, (list, str)):  # 'arc_easy,piqa' as on the command line
            names = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
            object.__setattr__(self, "tasks", tuple(n.strip() if isinstance(n, str) else n for n in names if n != ""))
        if isinstance(self.include_path, (list, str)):
            object.__setattr__(self, "include_path", tuple(self.include_path) if isinstance(self.include_path, list) else (self.include_path,))


@dataclass(frozen=True)
class DeviceSpec:
    """Where every stage runs and in which dtype the teacher (and so every student) is held."""

    device: str = "auto"
    """auto (this process's GPU if any, else the CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32."""

    def __post_init__(self):
        check_device_name(self.device)  # syntax only: whether the GPU exists is asked where a model loads
        check_dtype_name(self.dtype)


@dataclass(frozen=True)
class SearchSpace:
    teacher: str
    axes: dict[str, tuple[int, ...]]
    budget: Budget
    ranking: RankSettings = RankSettings()
    retrain: RetrainSettings = RetrainSettings()
    scoring: ScoringSpec = ScoringSpec()
    distill: DistillSettings = DistillSettings()
    halving: HalvingSpec = HalvingSpec()
    latency: LatencySpec = LatencySpec()
    device: DeviceSpec = DeviceSpec()
    family: tuple[int, ...] = ()  # several budgets: each pruned from the previous, largest first
    sampler: str = "auto"
    trials: int | None = None
    seed: int = 0
    source: str = field(default="", compare=False)


# --------------------------------------------------------------------------- checking values


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


def load_space(path: str | Path) -> SearchSpace:
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
        if key not in AXES:
            raise MinitronError(f"unknown key 'axes.{key}': allowed are {', '.join(AXES)}")
    budget = _section(Budget, data["budget"], "budget")
    if budget.count not in ("total", "non_embedding"):
        raise MinitronError(f"budget.count is '{budget.count}': use total or non_embedding")
    teacher = check_value("teacher", data["teacher"], str)
    if (path.parent / teacher).exists():  # a config or model path relative to the YAML file
        teacher = str(path.parent / teacher)
    space = SearchSpace(
        teacher=teacher,
        axes={key: _values(key, spec) for key, spec in axes.items()},
        budget=budget,
        ranking=_section(RankSettings, data.get("ranking"), "ranking"),
        retrain=_section(RetrainSettings, data.get("retrain"), "retrain"),
        scoring=_section(ScoringSpec, data.get("scoring"), "scoring"),
        distill=_section(DistillSettings, data.get("distill"), "distill"),
        device=_section(DeviceSpec, data.get("device"), "device"),
        halving=_section(HalvingSpec, data.get("halving"), "halving"),
        latency=_section(LatencySpec, data.get("latency"), "latency"),
        family=_top_level(data, "family", ()) or (),
        sampler=_top_level(data, "sampler", "auto"),
        trials=_top_level(data, "trials", None),
        seed=_top_level(data, "seed", 0),
        source=str(path),
    )
    if space.sampler not in SAMPLERS:
        raise MinitronError(f"unknown sampler '{space.sampler}': use one of {', '.join(SAMPLERS)}")
    if space.halving.rung_metric not in RUNG_METRICS:
        raise MinitronError(f"unknown halving.rung_metric '{space.halving.rung_metric}': use one of {', '.join(RUNG_METRICS)}")
    if space.scoring.metric not in METRICS:
        raise MinitronError(f"unknown scoring.metric '{space.scoring.metric}': use one of {', '.join(METRICS)}")
    if space.scoring.metric == "lm_eval" and not space.scoring.tasks:
        raise MinitronError("scoring.metric is lm_eval but scoring.tasks is empty: list tasks such as [arc_easy, piqa]")
    if space.scoring.metric == "lm_eval":
        from .scoring import check_lm_eval  # scoring reads this module's ScoringSpec: imported when used

        # names, folders and files checked now, before any teacher loads
        scoring = check_lm_eval(space.scoring, where="scoring.")
        if scoring is not space.scoring:
            space = replace(space, scoring=scoring)
    return space


@dataclass(frozen=True)
class Candidate:
    arch: Architecture
    total: int
    non_embedding: int
    memory_gb: float

    def budgeted(self, budget: Budget) -> int:
        return self.total if budget.count == "total" else self.non_embedding


def memory_gb(config, arch: Architecture, params: int, budget: Budget) -> float:
    kv_cache = 2 * arch.num_hidden_layers * arch.num_key_value_heads * head_dim_of(config) * budget.context * budget.batch
    return (params + kv_cache) * budget.bytes_per_value / 2**30


def _transformers_requires_divisible_heads(config) -> bool:
    """Ask transformers once whether this family refuses hidden % heads != 0."""
    probe = Architecture(config.num_attention_heads + 1, 1, config.num_attention_heads, 1, 1)
    try:
        student_config(config, probe)
    except MinitronError:
        return True
    return False


def all_architectures(space: SearchSpace, config) -> list[Architecture]:
    """The product of the axes (axes not given keep the teacher's value), before any budget."""
    teacher = Architecture.from_config(config)
    axes = {
        "hidden_size": (teacher.hidden_size,),
        "intermediate_size": (teacher.intermediate_size,),
        "heads_per_group": (teacher.heads_per_group,),
        "num_key_value_heads": (teacher.num_key_value_heads,),
        "num_hidden_layers": (teacher.num_hidden_layers,),
        **space.axes,
    }
    return [
        Architecture(hidden, ffn, per_group * groups, groups, layers) for hidden, ffn, per_group, groups, layers in itertools.product(*(axes[a] for a in AXES))
    ]


def enumerate_candidates(space: SearchSpace, config) -> tuple[list[Candidate], list[Candidate]]:
    """(feasible candidates closest to the target first, every valid candidate)."""
    teacher = Architecture.from_config(config)
    counter = ParamCounter(config)
    divisible = _transformers_requires_divisible_heads(config)
    valid: list[Candidate] = []
    for arch in all_architectures(space, config):
        if divisible and arch.hidden_size % arch.num_attention_heads:
            continue
        try:
            validate(arch, teacher)
        except MinitronError:
            continue
        n = counter.count(arch)
        valid.append(Candidate(arch, n.total, n.non_embedding, memory_gb(config, arch, n.total, space.budget)))
    budget = space.budget
    low, high = budget.parameters * (1 - budget.tolerance), budget.parameters * (1 + budget.tolerance)
    feasible = [c for c in valid if low <= c.budgeted(budget) <= high and (budget.memory_gb is None or c.memory_gb <= budget.memory_gb)]
    closeness = lambda c: (abs(c.budgeted(budget) - budget.parameters), -c.total, str(c.arch))
    feasible.sort(key=closeness)
    valid.sort(key=closeness)
    return feasible, valid


def require_feasible(space: SearchSpace, config) -> list[Candidate]:
    feasible, valid = enumerate_candidates(space, config)
    if feasible:
        return feasible
    if not valid:
        raise MinitronError(f"the axes of '{space.source}' allow no architecture this teacher can be pruned to: widen axes")
    near = valid[0]
    memory = f" and memory_gb >= {near.memory_gb:.2f}" if space.budget.memory_gb is not None else ""
    raise MinitronError(
        f"no architecture within {space.budget.parameters:,} +/- {space.budget.tolerance:.0%} {space.budget.count} parameters: "
        f"the nearest feasible budget is {near.budgeted(space.budget):,}{memory}; change budget.parameters or widen the axes"
    )
