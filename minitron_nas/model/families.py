"""Where heads, MLP neurons and norms live, per model family.

Every other module asks this one, so family differences stay in one place. A family is
described by data, not code: which per-layer norms act on the hidden size, whether the
embedding is scaled by sqrt(hidden), whether RMSNorm stores its weight as (1 + w), and a
table that says, for every parameter, which pruning axis each of its dimensions follows.
Adding a Llama-like family is adding one `Family(...)` entry; a mixture-of-experts family
names its expert-count and expert-width config keys (`MoE(...)`), and the same table then
covers the router, the experts' fused weights and a shared expert. A hybrid Mamba/attention
family (`Hybrid(...)`) has layers of several types and names its Mamba config keys: NemotronH's
layers are one mixer each (Mamba, attention or MLP), Bamba's a Mamba or attention mixer and an
MLP each. Mamba mixers are sliced as a whole by prune/mamba.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from minitron_nas.errors import MinitronError

# Pruning axes a tensor dimension can follow. None means "never pruned" (vocab, head_dim).
HIDDEN, QUERY, KV, FFN = "hidden", "query", "kv", "ffn"
# Mixture of experts: which experts are kept, each expert's neurons (chosen per expert), the
# fused [gate; up] rows of the experts (the expert's neurons, twice), the shared expert's neurons.
EXPERT, EXPERT_FFN, EXPERT_FFN_PAIR, SHARED_FFN = "expert", "expert_ffn", "expert_ffn_pair", "shared_ffn"

# The linear layers: axis of the output and of the input dimension of the weight ([out, in]);
# a bias follows the output.
_LINEARS: dict[str, tuple[str, str]] = {
    "q_proj": (QUERY, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, QUERY),
    "gate_proj": (FFN, HIDDEN),
    "up_proj": (FFN, HIDDEN),
    "down_proj": (HIDDEN, FFN),
}

# Parameter name suffix -> axis per dimension. Shared by all supported families.
_COMMON_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, HIDDEN),
    "embeddings.weight": (None, HIDDEN),  # NemotronH's name
    "lm_head.weight": (None, HIDDEN),
    "q_norm.weight": (None,),
    "k_norm.weight": (None,),
    **{f"{name}.weight": axes for name, axes in _LINEARS.items()},
    **{f"{name}.bias": axes[:1] for name, axes in _LINEARS.items()},
}

# transformers' sparse MoE blocks (Mixtral, Qwen2/3-MoE, OLMoE): a router `gate` [experts, hidden],
# experts stored as 3-D tensors, and (Qwen2-MoE) a dense shared expert behind a sigmoid gate.
_MOE_AXES: dict[str, tuple[str | None, ...]] = {
    "mlp.gate.weight": (EXPERT, HIDDEN),
    "experts.gate_up_proj": (EXPERT, EXPERT_FFN_PAIR, HIDDEN),  # [experts, 2 x width, hidden]
    "experts.down_proj": (EXPERT, HIDDEN, EXPERT_FFN),  # [experts, hidden, width]
    "shared_expert.gate_proj.weight": (SHARED_FFN, HIDDEN),
    "shared_expert.up_proj.weight": (SHARED_FFN, HIDDEN),
    "shared_expert.down_proj.weight": (HIDDEN, SHARED_FFN),
    "shared_expert_gate.weight": (None, HIDDEN),
}


@dataclass(frozen=True)
class MoE:
    """Where a sparse MoE family keeps its expert facts in the config."""

    experts_key: str = "num_experts"
    """Config key of the number of experts per layer (Mixtral: num_local_experts)."""
    width_key: str = "moe_intermediate_size"
    """Config key of each expert's FFN width (Mixtral and OLMoE: intermediate_size)."""
    top_k_key: str = "num_experts_per_tok"
    """Config key of the experts each token is routed to (kept at most the number of experts)."""
    block: str = "mlp"
    """The per-layer sparse MoE block: `gate` (router), `experts`, optional `shared_expert`."""

    def dense_layers(self, config) -> list[int]:
        """Layers with a dense MLP instead of experts (Qwen2/3-MoE's `mlp_only_layers` and
        `decoder_sparse_step`; absent keys: none). Experts are pruned in every layer, so these are refused."""
        step = getattr(config, "decoder_sparse_step", None) or 1
        only = set(getattr(config, "mlp_only_layers", None) or [])
        return [i for i in range(config.num_hidden_layers) if i in only or (i + 1) % step]


# A hybrid model's Mamba-2 mixer parameters (names relative to the mixer): sliced together, group-aware.
MAMBA_PARAMS = ("in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight", "out_proj.weight", "out_proj.bias")


class MambaSizes(NamedTuple):
    """A teacher's Mamba-2 mixer sizes, whatever its family's config calls them."""

    heads: int
    head_dim: int
    groups: int
    state: int
    conv_kernel: int
    conv_bias: bool
    proj_bias: bool


@dataclass(frozen=True)
class Hybrid:
    """Where a hybrid family keeps its per-layer types and its Mamba-2 facts in the config.

    `Architecture` names the Mamba sizes mamba_num_heads and mamba_head_dim in every family;
    the keys below map them, and the sizes kept from the teacher, to each config's own names.
    """

    types_key: str = "layers_block_type"
    """Config key (or property) of the per-layer type list."""
    fixed_lists: tuple[str, ...] = ("time_step_limit",)
    """Config lists that are not per layer, even when as long as the layer list (a 2-layer teacher's (min, max))."""
    mamba: str = "linear_attention"
    attention: str = "full_attention"
    mlp: str | None = "mlp"
    """The MLP layers' type; None where every layer has its own MLP after its mixer (Bamba)."""
    mixer: str = "mixer"
    """Each Mamba layer's mixer module (NemotronH names every layer's one mixer so; Bamba: mamba)."""
    heads_key: str = "mamba_num_heads"
    head_dim_key: str = "mamba_head_dim"
    groups_key: str = "n_groups"
    state_key: str = "ssm_state_size"
    conv_kernel_key: str = "conv_kernel"
    conv_bias_key: str = "use_conv_bias"
    proj_bias_key: str = "use_bias"
    """in_proj's and out_proj's bias."""
    expand_key: str | None = None
    """An integer key the config requires to equal heads x head_dim / hidden_size (Bamba's mamba_expand):
    the Mamba width follows the hidden size. None: the width is free (NemotronH)."""
    attention_indices_key: str | None = None
    """Where the types are stored as the attention layers' indices (Bamba's attn_layer_indices, the
    types a property): a student's config gets them remapped to its own positions."""

    def types(self, config) -> list[str]:
        return list(getattr(config, self.types_key))

    def sizes(self, config) -> MambaSizes:
        keys = (self.heads_key, self.head_dim_key, self.groups_key, self.state_key, self.conv_kernel_key, self.conv_bias_key, self.proj_bias_key)
        return MambaSizes(*(getattr(config, key) for key in keys))

    def layer_counts(self, arch) -> dict[str, int]:
        """An architecture's layers per type (MLP only where it is a layer type of its own)."""
        counts = {self.mamba: arch.num_mamba_layers, self.attention: arch.num_attention_layers}
        return counts | ({self.mlp: arch.num_mlp_layers} if self.mlp else {})

    def has_mlp(self, kind: str) -> bool:
        """Whether a layer of this type has MLP neurons: NemotronH's MLP layers, every Bamba layer."""
        return self.mlp is None or kind == self.mlp

    def refusal(self, config, heads: int, head_dim: int, hidden: int) -> str | None:
        """Why a student of this teacher cannot have these Mamba sizes (one line), None if it can.

        Every group keeps as many heads. Bamba's mixer is mamba_expand x hidden_size wide and its
        config requires heads x head_dim to match; expand is an integer kept from the teacher, so
        the Mamba width follows the hidden size.
        """
        groups = getattr(config, self.groups_key)
        if heads % groups:
            return f"mamba_num_heads={heads} cannot be split over the {groups} Mamba groups: choose a multiple of {groups}"
        expand = getattr(config, self.expand_key) if self.expand_key else None
        if expand is not None and heads * head_dim != expand * hidden:
            return (
                f"{config.model_type} ties the Mamba width to the hidden size: mamba_num_heads x mamba_head_dim ({heads} x {head_dim} = {heads * head_dim}) "
                f"must equal {self.expand_key} x hidden_size ({expand} x {hidden} = {expand * hidden})"
            )
        return None

    def student_updates(self, config, heads: int, head_dim: int, hidden: int) -> dict:
        """Config keys of a student with `heads` Mamba heads of head_dim channels and `hidden` hidden
        channels, in the family's own names (NemotronH's `expand` is not read; Bamba's stays)."""
        refusal = self.refusal(config, heads, head_dim, hidden)
        if refusal:
            raise MinitronError(refusal)
        return {self.heads_key: heads, self.head_dim_key: head_dim}

    def mamba_parameters(self, config, hidden: int, heads: int, head_dim: int) -> int:
        """Exact parameters of one Mamba-2 mixer (layout in prune/mamba.py)."""
        sizes = self.sizes(config)
        inner, bc = heads * head_dim, 2 * sizes.groups * sizes.state
        rows = 2 * inner + bc + heads  # in_proj: z | x B C | dt
        n = hidden * rows + (inner + bc) * sizes.conv_kernel + 3 * heads + inner + inner * hidden  # + A_log, D, dt_bias, norm, out_proj
        n += (inner + bc) if sizes.conv_bias else 0
        n += (rows + hidden) if sizes.proj_bias else 0
        return n


@dataclass(frozen=True)
class Family:
    """Facts about one model family that pruning, ranking and counting need."""

    name: str
    model_types: tuple[str, ...]
    # Per-layer norms over the hidden size; all of them are sliced and ranked.
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # Gemma multiplies token embeddings by sqrt(hidden_size).
    scaled_embedding: bool = False
    # Gemma's RMSNorm computes x * (1 + w); the effective gain is w + norm_offset.
    norm_offset: float = 0.0
    # Where ranking hooks in: the inputs of these per-layer modules are the attention
    # heads' outputs (concatenated) and the MLP neurons' activations.
    head_output_module: str = "self_attn.o_proj"
    neuron_output_module: str = "mlp.down_proj"
    # State-dict names of the token embedding, the output head and the final norm.
    embedding_weight: str = "model.embed_tokens.weight"
    lm_head_weight: str = "lm_head.weight"
    final_norm_weight: str = "model.norm.weight"
    # Config keys that count layers and must not exceed the student's depth (Qwen2's sliding window).
    layer_count_keys: tuple[str, ...] = ()
    # Sparse mixture-of-experts layers, None for dense families.
    moe: MoE | None = None
    # Per-family exceptions to the shared table (OLMoE normalises q and k over all heads at once).
    extra_axes: tuple[tuple[str, tuple[str | None, ...]], ...] = ()
    # OLMoE sizes its q norm by hidden_size: the student's hidden size must equal heads x head_dim.
    hidden_is_query_width: bool = False
    # Layers of several types (Mamba, attention, MLP), None for a uniform decoder.
    hybrid: Hybrid | None = None

    def is_mamba(self, param_name: str) -> bool:
        """A parameter of a hybrid model's Mamba mixer (sliced by prune/mamba.py, counted by Hybrid)."""
        if not self.hybrid or f".{self.hybrid.mixer}." not in param_name:
            return False
        return param_name.split(f".{self.hybrid.mixer}.", 1)[1] in MAMBA_PARAMS

    def axes(self, param_name: str) -> tuple[str | None, ...]:
        """Pruning axis of each dimension of a parameter of this family's CausalLM."""
        if self.is_mamba(param_name):
            raise MinitronError(f"'{param_name}' is a Mamba mixer parameter: slice it with prune/mamba.py")
        parts = param_name.split(".")
        tables = (dict(self.extra_axes), _MOE_AXES if self.moe else {}, _COMMON_AXES)
        for length in (3, 2):  # the longest known suffix wins: shared_expert.gate_proj.weight before gate_proj.weight
            suffix = ".".join(parts[-length:])
            for table in tables:
                if suffix in table:
                    return table[suffix]
        if parts[-2] in self.layer_norms or param_name == self.final_norm_weight:
            return (HIDDEN,)
        raise MinitronError(f"parameter '{param_name}' is unknown to the {self.name} family: extend the family table in minitron_nas/model/families.py")

    def embedding_scale(self, hidden_size: int) -> float:
        return hidden_size**0.5 if self.scaled_embedding else 1.0

    def is_embedding(self, param_name: str) -> bool:
        """The vocabulary matrices (input embedding, output head): counted apart from the body."""
        return param_name in (self.embedding_weight, self.lm_head_weight)

    def head_output(self, layer):
        """The module whose input holds one layer's attention heads, side by side."""
        return layer.get_submodule(self.head_output_module)

    def neuron_output(self, layer):
        """The module whose input holds one layer's MLP neuron activations (None in an MoE layer)."""
        return None if self.moe else layer.get_submodule(self.neuron_output_module)

    def moe_block(self, layer):
        """One layer's sparse MoE block (router `gate`, `experts`, optional `shared_expert`)."""
        return layer.get_submodule(self.moe.block)


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",), layer_count_keys=("max_window_layers",)),
    Family("qwen3", ("qwen3",), layer_count_keys=("max_window_layers",)),
    Family(
        "gemma3",
        ("gemma3_text",),
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        scaled_embedding=True,
        norm_offset=1.0,
    ),
    Family("mixtral", ("mixtral",), moe=MoE(experts_key="num_local_experts", width_key="intermediate_size")),
    Family("qwen2_moe", ("qwen2_moe",), layer_count_keys=("max_window_layers",), moe=MoE()),
    Family("qwen3_moe", ("qwen3_moe",), layer_count_keys=("max_window_layers",), moe=MoE()),
    Family(
        "olmoe",
        ("olmoe",),
        moe=MoE(width_key="intermediate_size"),
        extra_axes=(("q_norm.weight", (QUERY,)), ("k_norm.weight", (KV,))),
        hidden_is_query_width=True,
    ),
    Family(
        "nemotron_h",
        ("nemotron_h",),
        layer_norms=("norm",),
        head_output_module="mixer.o_proj",
        neuron_output_module="mixer.down_proj",
        embedding_weight="model.embeddings.weight",
        final_norm_weight="model.norm_f.weight",
        hybrid=Hybrid(),
    ),
    Family(
        "bamba",
        ("bamba",),
        layer_norms=("input_layernorm", "pre_ff_layernorm"),
        neuron_output_module="feed_forward.down_proj",
        final_norm_weight="model.final_layernorm.weight",
        hybrid=Hybrid(
            mlp=None,
            mixer="mamba",
            heads_key="mamba_n_heads",
            head_dim_key="mamba_d_head",
            groups_key="mamba_n_groups",
            state_key="mamba_d_state",
            conv_kernel_key="mamba_d_conv",
            conv_bias_key="mamba_conv_bias",
            proj_bias_key="mamba_proj_bias",
            expand_key="mamba_expand",
            attention_indices_key="attn_layer_indices",
        ),
    ),
)


def family_for(config) -> Family:
    """The family of a transformers config, or a one-line error naming the supported ones."""
    return family_of_type(getattr(config, "model_type", None))


def family_of_type(model_type: str | None) -> Family:
    """The family of a config's `model_type`; asked before transformers parses the config,
    so an unknown type is named here rather than in transformers' longer message."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise MinitronError(
        f"Model type '{model_type}' is not supported: the supported types are {supported}; "
        "a Llama-like family is added with one Family entry in minitron_nas/model/families.py."
    )


_LAYER_NAME = re.compile(r"\.layers\.(\d+)\.")


def layer_index(param_name: str) -> int | None:
    """The decoder layer a parameter belongs to ('model.layers.3.mlp...' -> 3), None outside layers."""
    match = _LAYER_NAME.search(param_name)
    return int(match.group(1)) if match else None


def in_layer(param_name: str, index: int) -> str:
    """The same parameter's name in decoder layer `index` (how a student's layer finds its teacher's)."""
    return _LAYER_NAME.sub(f".layers.{index}.", param_name, count=1)


def layers_of(model):
    """The decoder layers (a ModuleList) of a CausalLM of any supported family."""
    return model.model.layers


def final_norm(model):
    """The norm after the last decoder layer of a CausalLM of any supported family."""
    return model.get_submodule(family_for(model.config).final_norm_weight.removesuffix(".weight"))
