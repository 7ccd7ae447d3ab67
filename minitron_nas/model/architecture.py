"""Typed architectures and exact parameter counts without allocating weights.

An `Architecture` uses the Hugging Face config names. `ParamCounter` reads the teacher's
parameter shapes once from a model built on the meta device (no memory), turns them into
a short polynomial in (hidden, query width, kv width, ffn; experts, expert width, shared
expert width), and then counts any candidate with a handful of multiplications, fast enough
for exhaustive enumeration. An MoE model also has an *active* count: the parameters one
token passes through (top-k experts of each layer, not all of them).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM

from minitron_nas.errors import MinitronError
from minitron_nas.model.families import EXPERT, EXPERT_FFN, EXPERT_FFN_PAIR, FFN, HIDDEN, KV, QUERY, SHARED_FFN, family_for, layer_index

# The sizes every architecture has, and those only a mixture-of-experts family has (None otherwise).
DENSE_SIZES = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
MOE_SIZES = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
# ...and those only a hybrid Mamba/attention family has: Mamba heads and their width, and how many
# layers of each type stay (num_hidden_layers is their sum).
HYBRID_SIZES = ("mamba_num_heads", "mamba_head_dim", "num_mamba_layers", "num_attention_layers", "num_mlp_layers")
LAYER_TYPE_COUNTS = HYBRID_SIZES[2:]


@dataclass(frozen=True)
class Architecture:
    """A candidate shape. `layers` (teacher indices, kept in order) overrides the depth choice.

    MoE sizes are None for a dense model, and for a family without that part: Mixtral and
    OLMoE size their experts with `intermediate_size` (no `moe_intermediate_size`), only
    Qwen2-MoE has a shared expert. `num_experts` is the family's expert count whatever its
    config calls it (Mixtral: num_local_experts). Hybrid sizes are None outside hybrid families;
    a hybrid's depth is chosen per layer type (num_mamba_layers and so on; num_mlp_layers only
    where MLP is a layer type of its own, NemotronH), and the Mamba sizes carry these names
    whatever the family's config calls them (Bamba: mamba_n_heads, mamba_d_head).
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    layers: tuple[int, ...] | None = None
    num_experts: int | None = None
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None
    num_mamba_layers: int | None = None
    num_attention_layers: int | None = None
    num_mlp_layers: int | None = None

    @classmethod
    def from_config(cls, config) -> Architecture:
        family = family_for(config)
        moe, hybrid = family.moe, family.hybrid
        types = hybrid.types(config) if hybrid else []
        mamba = hybrid.sizes(config) if hybrid else None
        return cls(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            num_hidden_layers=config.num_hidden_layers,
            num_experts=getattr(config, moe.experts_key) if moe else None,
            moe_intermediate_size=getattr(config, "moe_intermediate_size", None) if moe else None,
            shared_expert_intermediate_size=getattr(config, "shared_expert_intermediate_size", None) if moe else None,
            mamba_num_heads=mamba.heads if hybrid else None,
            mamba_head_dim=mamba.head_dim if hybrid else None,
            num_mamba_layers=types.count(hybrid.mamba) if hybrid else None,
            num_attention_layers=types.count(hybrid.attention) if hybrid else None,
            num_mlp_layers=types.count(hybrid.mlp) if hybrid and hybrid.mlp else None,
        )

    @classmethod
    def from_dict(cls, data: dict, base: Architecture) -> Architecture:
        """Fields missing from `data` are taken from `base` (usually the teacher)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise MinitronError(f"unknown architecture key '{unknown[0]}': allowed keys are {', '.join(sorted(names))}")
        values = {k: v for k, v in data.items() if v is not None}
        if "layers" in values:
            layers = values["layers"]
            if not isinstance(layers, (list, tuple)) or any(not isinstance(i, int) or isinstance(i, bool) for i in layers):
                raise MinitronError(f"architecture key 'layers' must be a list of integer layer indices, got {layers!r}")
            values["layers"] = tuple(layers)
            values.setdefault("num_hidden_layers", len(values["layers"]))
        if "num_hidden_layers" not in values and any(k in values for k in LAYER_TYPE_COUNTS) and base.num_mamba_layers is not None:
            # the sum over the teacher's layer types (Bamba has no MLP layers: a num_mlp_layers given is refused by validate)
            values["num_hidden_layers"] = sum(values.get(k, getattr(base, k)) for k in LAYER_TYPE_COUNTS if getattr(base, k) is not None)
        for key, value in values.items():
            if key != "layers" and (not isinstance(value, int) or isinstance(value, bool)):
                raise MinitronError(f"architecture key '{key}' must be an integer, got {value!r}")
        return replace(base, **{"layers": None, **values})

    @classmethod
    def load(cls, source: str | Path, base: Architecture) -> Architecture:
        """From a JSON file path or an inline JSON object."""
        text = str(source)
        try:
            if text.lstrip().startswith("{"):
                data = json.loads(text)
            else:
                data = json.loads(Path(text).read_text())
        except FileNotFoundError:
            raise MinitronError(f"architecture file '{text}' not found: give a JSON file or an inline JSON object") from None
        except json.JSONDecodeError as err:
            raise MinitronError(f"architecture '{text}' is not valid JSON ({err.msg}, line {err.lineno})") from None
        if not isinstance(data, dict):
            raise MinitronError("an architecture must be a JSON object of HF config names")
        return cls.from_dict(data, base)

    def to_dict(self) -> dict:
        """HF config names; MoE and hybrid sizes only where the family has them (a dense dict stays as it was)."""
        data = {k: v for k, v in asdict(self).items() if k not in MOE_SIZES + HYBRID_SIZES or v is not None}
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class ParamCount:
    total: int
    non_embedding: int
    active: int | None = None
    """Parameters one token uses (top-k experts per layer); equals `total` for a dense model."""

    def __post_init__(self):
        if self.active is None:
            object.__setattr__(self, "active", self.total)


def validate(arch: Architecture, teacher: Architecture) -> None:
    """Reject candidates that cannot be sliced out of the teacher, with the reason."""
    for name in DENSE_SIZES + MOE_SIZES + HYBRID_SIZES:
        value, limit = getattr(arch, name), getattr(teacher, name)
        if limit is None:
            if value is not None:
                raise MinitronError(f"{name}={value} but the teacher has no such part: leave {name} out for this model family")
            continue
        if value is None:
            raise MinitronError(f"{name} is missing: this teacher has {name}={limit}")
        if name in LAYER_TYPE_COUNTS and value == 0:
            continue  # a hybrid may lose every layer of one type
        if value < 1:
            raise MinitronError(f"{name}={value} must be at least 1")
        if value > limit:
            raise MinitronError(f"{name}={value} is larger than the teacher's {limit}: pruning only shrinks")
    if teacher.num_attention_layers and not arch.num_attention_layers:
        raise MinitronError(
            "num_attention_layers=0 leaves no attention layer: transformers' hybrids (NemotronH, Bamba) need one to run with a cache "
            "(generate, lm-eval, latency); keep at least 1"
        )
    per_type = {k: getattr(arch, k) for k in LAYER_TYPE_COUNTS if getattr(teacher, k) is not None}
    if teacher.num_mamba_layers is not None and sum(per_type.values()) != arch.num_hidden_layers:
        counts = ", ".join(f"{k}={v}" for k, v in per_type.items())
        raise MinitronError(f"num_hidden_layers={arch.num_hidden_layers} is not the sum of the layers per type ({counts}): make them agree")
    if arch.num_attention_heads % arch.num_key_value_heads:
        raise MinitronError(
            f"num_attention_heads={arch.num_attention_heads} is not a multiple of "
            f"num_key_value_heads={arch.num_key_value_heads}: choose heads = groups x heads per group"
        )
    if arch.heads_per_group > teacher.heads_per_group:
        raise MinitronError(
            f"{arch.heads_per_group} query heads per KV group exceeds the teacher's {teacher.heads_per_group}: keep fewer query heads or more KV groups"
        )
    if arch.layers is not None:
        if len(arch.layers) != arch.num_hidden_layers:
            raise MinitronError(f"layers lists {len(arch.layers)} layers but num_hidden_layers={arch.num_hidden_layers}: make them agree")
        if len(set(arch.layers)) != len(arch.layers) or any(not 0 <= i < teacher.num_hidden_layers for i in arch.layers):
            raise MinitronError(f"layers must be distinct teacher layer indices in 0..{teacher.num_hidden_layers - 1}, got {list(arch.layers)}")


def student_config(teacher_config, arch: Architecture, kept_layers: list[int] | None = None):
    """The teacher's config with the candidate's sizes; per-layer lists follow the kept layers.

    transformers itself validates the result, so a config it would refuse to load is
    rejected here, before any weights are touched.
    """
    data = teacher_config.to_dict()
    for key in ("quantization_config", "_name_or_path", "name_or_path", "transformers_version"):
        data.pop(key, None)
    n_teacher = teacher_config.num_hidden_layers
    kept = kept_layers if kept_layers is not None else list(range(arch.num_hidden_layers))
    hybrid = family_for(teacher_config).hybrid
    fixed = {"architectures", *(hybrid.fixed_lists if hybrid else ())}  # lists that do not follow the layers
    for key, value in list(data.items()):
        if isinstance(value, list) and len(value) == n_teacher and key not in fixed:
            data[key] = [value[i] for i in kept]
    data.update(
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        num_hidden_layers=arch.num_hidden_layers,
        head_dim=head_dim_of(teacher_config),
    )
    family = family_for(teacher_config)
    if family.hidden_is_query_width and arch.hidden_size != arch.num_attention_heads * head_dim_of(teacher_config):
        raise MinitronError(
            f"{family.name} needs hidden_size = num_attention_heads x head_dim ({arch.num_attention_heads} x {head_dim_of(teacher_config)}), "
            f"got hidden_size={arch.hidden_size}: prune heads and hidden size together"
        )
    if family.moe and arch.num_experts is not None:
        moe, stored = family.moe, lambda key: teacher_config.attribute_map.get(key, key)  # Qwen3-MoE stores num_experts as num_local_experts
        data[stored(moe.experts_key)] = arch.num_experts
        data["output_router_logits"] = False  # no load-balancing loss: the KD loss alone trains the routers (README, Model families)
        data[stored(moe.top_k_key)] = min(data[stored(moe.top_k_key)], arch.num_experts)  # a token cannot pick more experts than exist
        for key in ("moe_intermediate_size", "shared_expert_intermediate_size"):
            if getattr(arch, key) is not None:
                data[stored(key)] = getattr(arch, key)
    hybrid = family.hybrid
    if hybrid and arch.mamba_num_heads is not None:
        data.update(hybrid.student_updates(teacher_config, arch.mamba_num_heads, arch.mamba_head_dim, arch.hidden_size))
    if hybrid and hybrid.attention_indices_key:  # Bamba: the attention layers' indices, in the student's positions
        types = hybrid.types(teacher_config)
        data[hybrid.attention_indices_key] = [position for position, layer in enumerate(kept) if types[layer] == hybrid.attention]
    for key in family.layer_count_keys:
        if key in data:
            data[key] = min(data[key], arch.num_hidden_layers)
    try:
        return type(teacher_config).from_dict(data)
    except (ValueError, TypeError, StrictDataclassError) as err:
        # transformers 5 wraps config validation in huggingface_hub's StrictDataclassError
        # (not a ValueError) whose first line only names the validator: keep the reason.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        message = lines[-1] if lines else type(err).__name__
        raise MinitronError(f"transformers refuses this architecture: {message}") from None


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class ParamCounter:
    """Exact parameter counts for any architecture of one teacher's family and vocabulary."""

    def __init__(self, teacher_config):
        self.family = family_for(teacher_config)
        self.head_dim = head_dim_of(teacher_config)
        self.teacher = Architecture.from_config(teacher_config)
        self.top_k = getattr(teacher_config, self.family.moe.top_k_key) if self.family.moe else None
        config = copy.deepcopy(teacher_config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # term: (axes, fixed multiplier) summed into coefficient dicts
        self._global: dict[tuple[str, ...], int] = {}
        self._embedding: dict[tuple[str, ...], int] = {}
        layer_terms: dict[int, dict[tuple[str, ...], int]] = {}
        self.config = teacher_config
        hybrid = self.family.hybrid
        types = hybrid.types(teacher_config) if hybrid else ["layer"] * teacher_config.num_hidden_layers
        if hybrid and set(types) - {hybrid.mamba, hybrid.attention, hybrid.mlp}:
            other = sorted(set(types) - {hybrid.mamba, hybrid.attention, hybrid.mlp})
            raise MinitronError(f"{self.family.name} layers of type {', '.join(other)} are not supported yet: only Mamba, attention and MLP layers")
        for name, param in model.named_parameters():
            if self.family.is_mamba(name):
                continue  # a Mamba mixer's count is Hybrid.mamba_parameters: its rows mix several sizes
            axes = self.family.axes(name)
            fixed = 1
            for size, axis in zip(param.shape, axes):
                if axis is None:
                    fixed *= size
            key = tuple(sorted(a for a in axes if a is not None))
            index = layer_index(name)
            if index is not None:
                target = layer_terms.setdefault(index, {})
            elif self.family.is_embedding(name):
                target = self._embedding
            else:
                target = self._global
            target[key] = target.get(key, 0) + fixed
        self._layers: dict[str, dict[tuple[str, ...], int]] = {}  # layer type -> its terms
        for kind in dict.fromkeys(types):
            shapes = {tuple(sorted(layer_terms.get(i, {}).items())) for i, t in enumerate(types) if t == kind}
            if len(shapes) != 1:
                raise MinitronError("layers of this teacher differ in structure: this family's layers must be alike within each layer type")
            self._layers[kind] = dict(shapes.pop())

    def _layer_counts(self, arch: Architecture) -> dict[str, int]:
        hybrid = self.family.hybrid
        return hybrid.layer_counts(arch) if hybrid else {"layer": arch.num_hidden_layers}

    def _evaluate(self, terms: dict[tuple[str, ...], int], arch: Architecture, active: bool = False) -> int:
        """Sum of the terms; `active`: an expert's own weights count top-k times, not once per expert."""
        expert_width = getattr(arch, self.family.moe.width_key) if self.family.moe else None
        sizes = {
            HIDDEN: arch.hidden_size,
            QUERY: arch.num_attention_heads * self.head_dim,
            KV: arch.num_key_value_heads * self.head_dim,
            FFN: arch.intermediate_size,
            EXPERT: arch.num_experts,
            EXPERT_FFN: expert_width,
            EXPERT_FFN_PAIR: 2 * expert_width if expert_width else None,
            SHARED_FFN: arch.shared_expert_intermediate_size,
        }
        total = 0
        for axes, fixed in terms.items():
            n = fixed
            per_expert = EXPERT_FFN in axes or EXPERT_FFN_PAIR in axes  # not the router: it scores every expert
            for axis in axes:
                n *= min(self.top_k, arch.num_experts) if (axis == EXPERT and active and per_expert) else sizes[axis]
            total += n
        return total

    def count(self, arch: Architecture) -> ParamCount:
        embedding, shared = self._evaluate(self._embedding, arch), self._evaluate(self._global, arch)
        layers = active = 0
        for kind, n in self._layer_counts(arch).items():
            terms = self._layers.get(kind, {})
            per_layer = self._evaluate(terms, arch)
            layers += n * per_layer
            active += n * (self._evaluate(terms, arch, active=True) if self.family.moe else per_layer)  # dense: every weight is active
        if self.family.hybrid:
            mamba = arch.num_mamba_layers * self.family.hybrid.mamba_parameters(self.config, arch.hidden_size, arch.mamba_num_heads, arch.mamba_head_dim)
            layers, active = layers + mamba, active + mamba
        return ParamCount(total=embedding + shared + layers, non_embedding=shared + layers, active=embedding + shared + active)
