"""Every feasible architecture of a space, exactly counted, and the space file checked for the search.

Enumeration walks the product of the axes, keeps what can be sliced from the teacher and what
transformers accepts, and keeps the candidates whose exact parameter count (or memory, weights
plus KV cache) lies within the budget.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

from minitron_nas.config.loader import read_space
from minitron_nas.config.space import AXES, FAMILY_AXES, Budget, SearchSpace
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import LAYER_TYPE_COUNTS, Architecture, ParamCounter, head_dim_of, student_config, validate
from minitron_nas.model.families import family_for


def load_space(path: str | Path) -> SearchSpace:
    """A space file read (config.loader) and its lm-eval tasks checked: names, folders and files, before any teacher loads."""
    space = read_space(path)
    if space.scoring.metric == "lm_eval":
        from minitron_nas.evaluate.harness import check_lm_eval  # lm-eval's task registry: imported only when scored by it

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
    active: int | None = None  # parameters per token (MoE); the total for a dense model

    def __post_init__(self):
        if self.active is None:
            object.__setattr__(self, "active", self.total)

    def budgeted(self, budget: Budget) -> int:
        return {"total": self.total, "non_embedding": self.non_embedding, "active": self.active}[budget.count]


def memory_gb(config, arch: Architecture, params: int, budget: Budget) -> float:
    """Weights plus the inference cache: keys and values of every attention layer, and (hybrids)
    each Mamba layer's fixed-size convolution and SSM states, whatever the context."""
    attention_layers = arch.num_hidden_layers if arch.num_attention_layers is None else arch.num_attention_layers
    cache = 2 * attention_layers * arch.num_key_value_heads * head_dim_of(config) * budget.context * budget.batch
    if arch.num_mamba_layers:
        sizes = family_for(config).hybrid.sizes(config)
        inner, bc = arch.mamba_num_heads * arch.mamba_head_dim, 2 * sizes.groups * sizes.state
        cache += arch.num_mamba_layers * budget.batch * (inner * sizes.state + (inner + bc) * sizes.conv_kernel)
    return (params + cache) * budget.bytes_per_value / 2**30


def _transformers_requires_divisible_heads(config) -> bool:
    """Ask transformers once whether this family refuses hidden % heads != 0.

    Where the Mamba width follows the hidden size (Bamba), the probe's hidden size is one that
    some Mamba sizes allow, and the probe takes those, so only the heads are in question; if
    every such hidden size is a multiple of the heads, the question never arises."""
    heads = config.num_attention_heads
    probe = replace(Architecture.from_config(config), hidden_size=heads + 1, intermediate_size=1, num_key_value_heads=1, num_hidden_layers=1)
    hybrid = family_for(config).hybrid
    if hybrid and hybrid.expand_key:
        groups, expand = hybrid.sizes(config).groups, getattr(config, hybrid.expand_key)
        hidden = next((h for h in range(heads + 1, heads + 1 + heads * groups) if h % heads and expand * h % groups == 0), None)
        if hidden is None:
            return False
        probe = replace(probe, hidden_size=hidden, mamba_num_heads=groups, mamba_head_dim=expand * hidden // groups)
    try:
        student_config(config, probe)
    except MinitronError:
        return True
    return False


def all_architectures(space: SearchSpace, config) -> list[Architecture]:
    """The product of the axes (axes not given keep the teacher's value), before any budget."""
    teacher = Architecture.from_config(config)
    for axis in FAMILY_AXES:
        if axis in space.axes and getattr(teacher, axis) is None:
            raise MinitronError(f"axes.{axis} is given but this {config.model_type} teacher has no such part: remove it from the space")
    moe = family_for(config).moe
    if moe and moe.width_key != "intermediate_size" and "intermediate_size" in space.axes:
        raise MinitronError(f"axes.intermediate_size is given but every {config.model_type} layer is sparse (no dense MLP): give moe_intermediate_size instead")
    hybrid = teacher.num_mamba_layers is not None
    if hybrid and "num_hidden_layers" in space.axes:
        per_type = ", ".join(k for k in LAYER_TYPE_COUNTS if getattr(teacher, k) is not None)
        raise MinitronError(f"axes.num_hidden_layers is given for a hybrid teacher: give {per_type} instead")
    axes = {
        "hidden_size": (teacher.hidden_size,),
        "intermediate_size": (teacher.intermediate_size,),
        "heads_per_group": (teacher.heads_per_group,),
        "num_key_value_heads": (teacher.num_key_value_heads,),
        "num_hidden_layers": (teacher.num_hidden_layers,),
        **{axis: (getattr(teacher, axis),) for axis in FAMILY_AXES},
        **space.axes,
    }
    archs = []
    for values in itertools.product(*(axes[a] for a in AXES + FAMILY_AXES)):
        hidden, ffn, per_group, groups, layers, *extra = values
        arch = Architecture(hidden, ffn, per_group * groups, groups, layers, None, *extra)
        if hybrid:  # a hybrid's depth is the sum of its layers per type
            arch = replace(arch, num_hidden_layers=sum(getattr(arch, k) or 0 for k in LAYER_TYPE_COUNTS))
        archs.append(arch)
    return archs


def enumerate_candidates(space: SearchSpace, config) -> tuple[list[Candidate], list[Candidate]]:
    """(feasible candidates closest to the target first, every valid candidate)."""
    teacher = Architecture.from_config(config)
    counter = ParamCounter(config)
    divisible = _transformers_requires_divisible_heads(config)
    family = family_for(config)
    tied, hybrid = family.hidden_is_query_width, family.hybrid
    valid: list[Candidate] = []
    for arch in all_architectures(space, config):
        if divisible and arch.hidden_size % arch.num_attention_heads:
            continue
        if tied and arch.hidden_size != arch.num_attention_heads * head_dim_of(config):
            continue
        if hybrid and hybrid.refusal(config, arch.mamba_num_heads, arch.mamba_head_dim, arch.hidden_size):
            continue  # every Mamba group keeps as many heads; Bamba's Mamba width follows its hidden size
        try:
            validate(arch, teacher)
        except MinitronError:
            continue
        n = counter.count(arch)
        valid.append(Candidate(arch, n.total, n.non_embedding, memory_gb(config, arch, n.total, space.budget), n.active))
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
