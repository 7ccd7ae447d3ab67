"""Search spaces: a YAML file -> typed settings -> every feasible architecture, exactly counted.

A space names the teacher, the allowed values of each axis, the budget, and how candidates
are retrained and scored. Enumeration walks the product of the axes, keeps what can be
sliced from the teacher and what transformers accepts, and keeps the candidates whose
exact parameter count (or memory, weights plus KV cache) lies within the budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from .architecture import Architecture, ParamCounter, head_dim_of, student_config, validate
from .errors import MinitronError

SAMPLERS = ("auto", "grid", "tpe", "nsga2")
METRICS = ("lm_eval", "heldout_loss", "kld")
AXES = ("hidden_size", "intermediate_size", "heads_per_group", "num_key_value_heads", "num_hidden_layers")
GRID_LIMIT = 64  # "auto" searches exhaustively up to this many feasible candidates


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
class RankingSpec:
    data: str = "shakespeare"
    samples: int = 64
    seq_len: int = 256


@dataclass(frozen=True)
class RetrainSpec:
    tokens: int = 8192
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-4
    temperature: float = 1.0
    top_k: int = 64
    data: str = "shakespeare"
    eval_every: int = 5

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def settings(self, seed: int):
        """The trainer's settings for one candidate's short retraining."""
        from .distill import RetrainSettings  # torch-heavy: only when training

        return RetrainSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=max(1, self.steps // 10),
            temperature=self.temperature,
            top_k=self.top_k,
            eval_every=self.eval_every,
            seed=seed,
        )


@dataclass(frozen=True)
class DistillSpec:
    """The winner's full distillation (logit KD, plus intermediate states when depth is cut)."""

    tokens: int = 65536
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    temperature: float = 1.0
    top_k: int | None = None  # None: full-vocabulary KD against the live teacher
    clm_weight: float = 0.0  # the paper's best practice 5: KD only
    intermediate: str = "auto"  # auto: on when >= 20% of the layers were dropped (best practices 6, 7)
    alpha: float = 1.0  # weight of the intermediate-state loss
    data: str = "shakespeare"
    eval_every: int = 25
    checkpoint_every: int = 25
    heldout_samples: int = 16

    @property
    def steps(self) -> int:
        return max(1, self.tokens // (self.batch_size * self.seq_len))

    def settings(self, seed: int):
        """The trainer's settings for the winner's full distillation."""
        from .distill import DistillSettings  # torch-heavy: only when training

        return DistillSettings(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=max(1, self.steps // 20),
            temperature=self.temperature,
            top_k=self.top_k,
            clm_weight=self.clm_weight,
            eval_every=self.eval_every,
            seed=seed,
            intermediate=self.intermediate,
            alpha=self.alpha,
            checkpoint_every=self.checkpoint_every,
        )


@dataclass(frozen=True)
class ScoringSpec:
    metric: str = "heldout_loss"
    tasks: tuple[str, ...] = ()
    limit: int | None = None
    batch_size: int = 16  # lm-eval requests per forward pass
    data_dir: str = "../shared/data"
    heldout_samples: int = 8
    seq_len: int = 256


@dataclass(frozen=True)
class DeviceSpec:
    """Where every stage runs and in which dtype the teacher (and so every student) is held."""

    device: str = "auto"
    """auto (this process's GPU if any, else the CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32."""

    def __post_init__(self):
        from .devices import check_device_name, check_dtype_name

        check_device_name(self.device)  # syntax only: whether the GPU exists is asked where a model loads
        check_dtype_name(self.dtype)


@dataclass(frozen=True)
class SearchSpace:
    teacher: str
    axes: dict[str, tuple[int, ...]]
    budget: Budget
    ranking: RankingSpec = RankingSpec()
    retrain: RetrainSpec = RetrainSpec()
    scoring: ScoringSpec = ScoringSpec()
    distill: DistillSpec = DistillSpec()
    device: DeviceSpec = DeviceSpec()
    family: tuple[int, ...] = ()  # several budgets: each pruned from the previous, largest first
    sampler: str = "auto"
    trials: int | None = None
    seed: int = 0
    source: str = field(default="", compare=False)


def _values(key: str, spec) -> tuple[int, ...]:
    """An axis is a list of ints or {range: [lo, hi], step: s} / {range: [lo, hi], divisor: d}."""
    if isinstance(spec, list) and spec and all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        return tuple(sorted(set(spec)))
    if isinstance(spec, dict) and set(spec) <= {"range", "step", "divisor"} and "range" in spec:
        lo, hi = spec["range"]
        if "divisor" in spec:
            return tuple(v for v in range(lo, hi + 1) if v % spec["divisor"] == 0)
        return tuple(range(lo, hi + 1, spec.get("step", 1)))
    raise MinitronError(
        f"axes.{key} must be a list of integers or {{range: [lo, hi], step: s}}, got {spec!r}"
    )


def _section(cls, data, name: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise MinitronError(f"'{name}' must be a mapping of settings")
    allowed = {f.name for f in fields(cls)}
    for key in data:
        if key not in allowed:
            raise MinitronError(f"unknown key '{name}.{key}': allowed are {', '.join(sorted(allowed))}")
    values = dict(data)
    if "tasks" in values:
        values["tasks"] = tuple(values["tasks"])
    try:
        return cls(**values)
    except TypeError as err:
        raise MinitronError(f"'{name}' is malformed: {err}") from None


def load_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise MinitronError(f"search space '{path}' not found: give a YAML file such as search_spaces/smollm2-135m-demo.yaml") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MinitronError(f"search space '{path}' is not valid YAML{where}: fix the syntax") from None
    if not isinstance(data, dict):
        raise MinitronError(f"search space '{path}' must be a YAML mapping")
    allowed = {f.name for f in fields(SearchSpace)} - {"source"}
    for key in data:
        if key not in allowed:
            raise MinitronError(f"unknown key '{key}' in '{path}': allowed are {', '.join(sorted(allowed))}")
    for key in ("teacher", "axes", "budget"):
        if key not in data:
            raise MinitronError(f"search space '{path}' lacks '{key}': add it")
    axes = data["axes"] or {}
    for key in axes:
        if key not in AXES:
            raise MinitronError(f"unknown key 'axes.{key}': allowed are {', '.join(AXES)}")
    if isinstance(data["budget"], dict) and "parameters" in data["budget"]:
        data["budget"]["parameters"] = int(float(data["budget"]["parameters"]))  # YAML reads 4.5e9 as text
    budget = _section(Budget, data["budget"], "budget")
    if budget.count not in ("total", "non_embedding"):
        raise MinitronError(f"budget.count must be 'total' or 'non_embedding', got '{budget.count}'")
    teacher = str(data["teacher"])
    if (path.parent / teacher).exists():  # a config or model path relative to the YAML file
        teacher = str(path.parent / teacher)
    space = SearchSpace(
        teacher=teacher,
        axes={key: _values(key, spec) for key, spec in axes.items()},
        budget=budget,
        ranking=_section(RankingSpec, data.get("ranking"), "ranking"),
        retrain=_section(RetrainSpec, data.get("retrain"), "retrain"),
        scoring=_section(ScoringSpec, data.get("scoring"), "scoring"),
        distill=_section(DistillSpec, data.get("distill"), "distill"),
        device=_section(DeviceSpec, data.get("device"), "device"),
        family=tuple(int(float(b)) for b in data.get("family") or ()),
        sampler=data.get("sampler", "auto"),
        trials=data.get("trials"),
        seed=data.get("seed", 0),
        source=str(path),
    )
    if space.sampler not in SAMPLERS:
        raise MinitronError(f"unknown sampler '{space.sampler}': use one of {', '.join(SAMPLERS)}")
    if space.scoring.metric not in METRICS:
        raise MinitronError(f"unknown scoring.metric '{space.scoring.metric}': use one of {', '.join(METRICS)}")
    if space.distill.intermediate not in ("auto", "on", "off"):
        raise MinitronError(f"distill.intermediate must be auto, on or off, got '{space.distill.intermediate}'")
    if space.scoring.metric == "lm_eval" and not space.scoring.tasks:
        raise MinitronError("scoring.metric is lm_eval but scoring.tasks is empty: list tasks such as [arc_easy, piqa]")
    from .lm_eval_tasks import SUPPORTED

    unknown = [task for task in space.scoring.tasks if task not in SUPPORTED]
    if unknown:
        raise MinitronError(f"unknown lm-eval task '{unknown[0]}' in scoring.tasks: supported are {', '.join(SUPPORTED)}")
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
        Architecture(hidden, ffn, per_group * groups, groups, layers)
        for hidden, ffn, per_group, groups, layers in itertools.product(*(axes[a] for a in AXES))
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
    feasible = [
        c for c in valid
        if low <= c.budgeted(budget) <= high and (budget.memory_gb is None or c.memory_gb <= budget.memory_gb)
    ]
    closeness = lambda c: (abs(c.budgeted(budget) - budget.parameters), -c.total, str(c.arch))  # noqa: E731
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
