"""Where heads, MLP neurons and norms live, per model family.

Every other module asks this one, so family differences stay in one place. A family is
described by data, not code: which per-layer norms act on the hidden size, whether the
embedding is scaled by sqrt(hidden), whether RMSNorm stores its weight as (1 + w), and a
table that says, for every parameter, which pruning axis each of its dimensions follows.
Adding a Llama-like family is adding one `Family(...)` entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MinitronError

# Pruning axes a tensor dimension can follow. None means "never pruned" (vocab, head_dim).
HIDDEN, QUERY, KV, FFN = "hidden", "query", "kv", "ffn"

# Parameter name suffix -> axis per dimension. Shared by all supported families.
_COMMON_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, HIDDEN),
    "lm_head.weight": (None, HIDDEN),
    "q_proj.weight": (QUERY, HIDDEN),
    "q_proj.bias": (QUERY,),
    "k_proj.weight": (KV, HIDDEN),
    "k_proj.bias": (KV,),
    "v_proj.weight": (KV, HIDDEN),
    "v_proj.bias": (KV,),
    "o_proj.weight": (HIDDEN, QUERY),
    "o_proj.bias": (HIDDEN,),
    "q_norm.weight": (None,),
    "k_norm.weight": (None,),
    "gate_proj.weight": (FFN, HIDDEN),
    "gate_proj.bias": (FFN,),
    "up_proj.weight": (FFN, HIDDEN),
    "up_proj.bias": (FFN,),
    "down_proj.weight": (HIDDEN, FFN),
    "down_proj.bias": (HIDDEN,),
}


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

    def axes(self, param_name: str) -> tuple[str | None, ...]:
        """Pruning axis of each dimension of a parameter of this family's CausalLM."""
        parts = param_name.split(".")
        suffix = ".".join(parts[-2:])
        if suffix in _COMMON_AXES:
            return _COMMON_AXES[suffix]
        if parts[-2] in self.layer_norms or suffix == "norm.weight":
            return (HIDDEN,)
        raise MinitronError(
            f"parameter '{param_name}' is unknown to the {self.name} family: "
            "extend the family table in minitron_nas/families.py"
        )

    def embedding_scale(self, hidden_size: int) -> float:
        return hidden_size**0.5 if self.scaled_embedding else 1.0


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",)),
    Family("qwen3", ("qwen3",)),
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
)


def family_for(config) -> Family:
    """The family of a transformers config, or a one-line error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise MinitronError(
        f"unsupported model type '{model_type}': supported are {supported} "
        "(add a Family entry in minitron_nas/families.py)"
    )


def layers_of(model):
    """The decoder layers (a ModuleList) of a CausalLM of any supported family."""
    return model.model.layers
