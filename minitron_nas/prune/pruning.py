"""Slice a teacher into a smaller model of its own class along the rankings.

`select` decides what to keep (pure: rankings + architecture -> indices); `prune` builds a
standard transformers model with the new config and copies the kept slices. Hidden
channels are one global choice (the residual stream is shared); FFN neurons, KV groups
and query heads are chosen per layer. Heads are GQA-aware: whole KV groups are kept or
dropped, and inside each kept group the best query heads stay, so head j of the student
still attends with the keys of its own group. head_dim never changes. In a mixture-of-experts
layer the best experts are kept (router rows sliced with them), and inside each kept expert
its own best neurons; a shared expert's neurons as a dense MLP's. A hybrid Mamba/attention
model keeps its best layers of each type, and its Mamba mixers are sliced group-aware by mamba.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture, head_dim_of, student_config, validate
from minitron_nas.model.families import EXPERT, EXPERT_FFN, EXPERT_FFN_PAIR, FFN, HIDDEN, KV, QUERY, SHARED_FFN, family_for, in_layer, layer_index
from minitron_nas.prune.experts import EXPERT_CRITERIA
from minitron_nas.prune.mamba import select_mamba, slice_mamba_mixer
from minitron_nas.prune.ranking import Rankings

LAYER_CRITERIA = ("block_importance", "layer_loss", "last")


@dataclass
class Selection:
    """Teacher indices kept on every axis; lists are per kept layer, in student order."""

    layers: list[int]
    channels: torch.Tensor
    query_heads: list[torch.Tensor]
    kv_groups: list[torch.Tensor]
    neurons: list[torch.Tensor]
    experts: list[torch.Tensor] | None = None
    expert_neurons: list[torch.Tensor] | None = None  # [kept experts, expert width] per layer, in kept-expert order
    shared_neurons: list[torch.Tensor] | None = None
    mamba: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # (kept heads, kept head_dim channels); None in other layers


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps original layout)."""
    return torch.topk(scores.float(), k, sorted=False).indices.sort().values


def select_layers(rankings: Rankings, arch: Architecture, n_teacher: int, criterion: str, types: list[str] | None = None, hybrid=None) -> list[int]:
    """Kept teacher layers, ascending. A hybrid (`types`: each teacher layer's type) keeps the
    best `num_mamba_layers` of its Mamba layers, and so on per type."""
    if arch.layers is not None:
        return list(arch.layers)
    if arch.num_hidden_layers == n_teacher:
        return list(range(n_teacher))
    if criterion not in LAYER_CRITERIA:
        raise MinitronError(f"unknown layer criterion '{criterion}': use one of {', '.join(LAYER_CRITERIA)}")
    scores = getattr(rankings, criterion) if criterion != "last" else -torch.arange(n_teacher, dtype=torch.float)  # "last": drop from the end
    if scores is None:
        raise MinitronError("these rankings have no layer_loss scores: rank with --layer-loss or use block_importance")
    if types is None:
        return _top(scores, arch.num_hidden_layers).tolist()
    kept = []
    for kind, n in hybrid.layer_counts(arch).items():
        own = torch.tensor([i for i, t in enumerate(types) if t == kind], dtype=torch.long)
        kept += own[_top(scores[own], n)].tolist() if n else []
    kept.sort()
    if kept and types[kept[0]] == hybrid.mlp:
        # transformers' NemotronH reads the cache length off the first layer: it must be a Mamba or an
        # attention layer. Keep the teacher's first layer instead of the weakest kept layer of its type.
        own = [i for i in kept if types[i] == types[0]]
        if types[0] == hybrid.mlp or not own:
            raise MinitronError(
                f"the student's first layer would be teacher layer {kept[0]}, an MLP layer, which transformers cannot run with a cache: "
                f"keep at least one {types[0]} layer"
            )
        kept.remove(min(own, key=lambda i: scores[i].item()))
        kept = sorted([0, *kept])
    return kept


def select(
    rankings: Rankings,
    arch: Architecture,
    teacher: Architecture,
    layer_criterion: str = "block_importance",
    expert_criterion: str = "reap",
    config=None,
) -> Selection:
    """`config`: the teacher's config, needed by MoE and hybrid families (the expert width's
    key, the layer types, the Mamba groups); a dense family's selection needs none."""
    family = family_for(config) if config is not None else None
    if family is None and (arch.num_experts is not None or arch.num_mamba_layers is not None):
        raise MinitronError("selecting an MoE or hybrid architecture needs the teacher's config: pass config=")
    hybrid = family.hybrid if family else None
    types = hybrid.types(config) if hybrid else None
    layers = select_layers(rankings, arch, teacher.num_hidden_layers, layer_criterion, types, hybrid)
    query_heads, kv_groups, neurons = [], [], []
    for layer in layers:
        heads = rankings.heads[layer].view(teacher.num_key_value_heads, teacher.heads_per_group)
        groups = _top(heads.sum(dim=1), arch.num_key_value_heads)
        kept = [g * teacher.heads_per_group + _top(heads[g], arch.heads_per_group) for g in groups.tolist()]
        kv_groups.append(groups)
        query_heads.append(torch.cat(kept))
        if rankings.neurons is not None:
            neurons.append(_top(rankings.neurons[layer], arch.intermediate_size))
    chosen = Selection(layers, _top(rankings.channels, arch.hidden_size), query_heads, kv_groups, neurons)
    if arch.num_experts is not None:
        if expert_criterion not in EXPERT_CRITERIA:
            raise MinitronError(f"unknown expert criterion '{expert_criterion}': use one of {', '.join(EXPERT_CRITERIA)}")
        scores = rankings.experts if expert_criterion == "reap" else rankings.expert_activation
        chosen.experts = [_top(scores[layer], arch.num_experts) for layer in layers]
        width = getattr(arch, family.moe.width_key)
        chosen.expert_neurons = [
            torch.stack([_top(rankings.expert_neurons[layer, e], width) for e in experts.tolist()]) for layer, experts in zip(layers, chosen.experts)
        ]
    if arch.shared_expert_intermediate_size is not None:
        chosen.shared_neurons = [_top(rankings.shared_neurons[layer], arch.shared_expert_intermediate_size) for layer in layers]
    if types is not None:
        kinds = [types[layer] for layer in layers]
        wanted = hybrid.layer_counts(arch)
        if any(kinds.count(kind) != n for kind, n in wanted.items()):
            raise MinitronError(f"the layers {layers} are not the layers per type the architecture names ({wanted}): make them agree")
        groups = hybrid.sizes(config).groups
        chosen.mamba = [
            select_mamba(rankings.mamba_heads[layer], rankings.mamba_dims[layer], groups, arch.mamba_num_heads, arch.mamba_head_dim)
            if kind == hybrid.mamba
            else None
            for layer, kind in zip(layers, kinds)
        ]
    return chosen


def _rows(units: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Head (or group) indices -> the rows of a projection that belong to them."""
    return (units[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@torch.no_grad()
def prune(
    model,
    rankings: Rankings,
    arch: Architecture,
    layer_criterion: str = "block_importance",
    norm_correction: bool = False,
    expert_criterion: str = "reap",
):
    """A new model of the teacher's class, sliced to `arch` along `rankings`.

    `expert_criterion` (MoE teachers): which experts stay, by REAP saliency or by the
    Minitron activation score (prune/experts.py).

    `norm_correction`: rescale every hidden-size norm's gain by sqrt(mean square of its
    input over the kept channels / over all channels), measured in the calibration pass.
    An RMSNorm of the pruned model divides by the root mean square of fewer channels, the
    most important (largest) ones. Off by default: on the real teacher it lowers the
    pruned loss when only the hidden size is cut and raises it when heads, FFN and depth
    are cut too (reports/benchmarks/norm_correction.md).
    """
    family = family_for(model.config)
    teacher_arch = Architecture.from_config(model.config)
    validate(arch, teacher_arch)
    _check_shapes(rankings, teacher_arch, family)
    chosen = select(rankings, arch, teacher_arch, layer_criterion, expert_criterion, model.config)
    config = student_config(model.config, arch, chosen.layers)
    head_dim = head_dim_of(model.config)
    param = next(model.parameters())
    # Built where the teacher lives, directly in its dtype: no float32 or host copy of the student.
    with no_init_weights(), torch.device(param.device):
        student = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    student.tie_weights()  # no_init_weights also skips tying

    teacher_state = model.state_dict()
    state = _sliced_mamba(teacher_state, family, chosen, model.config) if family.hybrid else {}
    for name in student.state_dict():
        if family.is_mamba(name):
            continue
        position = layer_index(name)
        inside = position is not None
        source = in_layer(name, chosen.layers[position]) if inside else name
        index = {
            HIDDEN: chosen.channels,
            QUERY: _rows(chosen.query_heads[position], head_dim) if inside else None,
            KV: _rows(chosen.kv_groups[position], head_dim) if inside else None,
            FFN: chosen.neurons[position] if inside and chosen.neurons else None,
        }
        if inside and chosen.experts is not None:
            own = chosen.expert_neurons[position]  # [kept experts, width]: each expert keeps its own neurons
            teacher_width = getattr(teacher_arch, family.moe.width_key)  # the fused [gate; up] rows: up starts there
            index.update({EXPERT: chosen.experts[position], EXPERT_FFN: own, EXPERT_FFN_PAIR: torch.cat([own, own + teacher_width], dim=1)})
        if inside and chosen.shared_neurons is not None:
            index[SHARED_FFN] = chosen.shared_neurons[position]
        tensor = teacher_state[source]
        for dim, axis in enumerate(family.axes(name)):
            if axis is not None:
                tensor = _slice(tensor, dim, index[axis].to(tensor.device))
        state[name] = tensor
    if norm_correction and arch.hidden_size != teacher_arch.hidden_size:
        _correct_norm_gains(state, rankings, family, chosen, teacher_arch.num_hidden_layers)
    _keep_embedding_scale(state, family, teacher_arch.hidden_size, arch.hidden_size, config)
    output = model.get_output_embeddings()  # tied in the model, not only in the config (NemotronH never ties)
    if output is not None and output.weight is model.get_input_embeddings().weight and family.lm_head_weight in state:
        state[family.lm_head_weight] = state[family.embedding_weight]
    student.load_state_dict(state, assign=True)  # the slices are fresh tensors: no second copy
    student.tie_weights()
    student.eval()
    return student


def _sliced_mamba(teacher_state: dict, family, chosen: Selection, config) -> dict:
    """Every kept Mamba mixer's parameters, named as in the student."""
    state = {}
    for position, (layer, kept) in enumerate(zip(chosen.layers, chosen.mamba)):
        if kept is None:
            continue
        prefix = f"model.layers.{layer}.{family.hybrid.mixer}."
        mixer = {k.removeprefix(prefix): v for k, v in teacher_state.items() if k.startswith(prefix)}
        for name, tensor in slice_mamba_mixer(mixer, config, *kept, chosen.channels).items():
            state[f"model.layers.{position}.{family.hybrid.mixer}.{name}"] = tensor
    return state


def _slice(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """index_select along `dim`; a 2-D index [experts, k] picks per expert (dim 0 holds the experts)."""
    if index.dim() == 1:
        return tensor.index_select(dim, index)
    return torch.stack([tensor[e].index_select(dim - 1, index[e]) for e in range(index.shape[0])])


def _correct_norm_gains(state: dict, rankings: Rankings, family, chosen: Selection, n_teacher_layers: int) -> None:
    """gain_c *= sqrt(mean_{kept} E[x_c^2] / mean_{all} E[x_c^2]) for every sliced hidden norm."""
    if rankings.norm_inputs is None:
        raise MinitronError("these rankings have no norm statistics: rank the teacher again to use norm correction")
    per_layer = len(family.layer_norms)
    for name in state:
        parts = name.split(".")
        if name == family.final_norm_weight:
            row = n_teacher_layers * per_layer
        elif len(parts) >= 2 and parts[-2] in family.layer_norms and layer_index(name) is not None and not family.is_mamba(name):
            position = layer_index(name)
            row = chosen.layers[position] * per_layer + family.layer_norms.index(parts[-2])
        else:
            continue
        squares = rankings.norm_inputs[row].double()
        ratio = (squares[chosen.channels].mean() / squares.mean()).sqrt().item()
        gain = state[name] + family.norm_offset
        state[name] = gain * ratio - family.norm_offset


def _keep_embedding_scale(state: dict, family, old_hidden: int, new_hidden: int, config) -> None:
    """Gemma scales embeddings by sqrt(hidden): undo the change a smaller hidden size causes.

    With tied embeddings the same matrix also produces the logits, so the final norm's
    gain is divided by the same factor and the logits stay as they were.
    """
    if not family.scaled_embedding or old_hidden == new_hidden:
        return
    factor = family.embedding_scale(old_hidden) / family.embedding_scale(new_hidden)
    state[family.embedding_weight] = state[family.embedding_weight] * factor
    if getattr(config, "tie_word_embeddings", False):
        gain = state[family.final_norm_weight] + family.norm_offset
        state[family.final_norm_weight] = gain / factor - family.norm_offset


def _check_shapes(rankings: Rankings, teacher: Architecture, family) -> None:
    n = teacher.num_hidden_layers
    expected = {"heads": (n, teacher.num_attention_heads), "channels": (teacher.hidden_size,), "block_importance": (n,)}
    if family.moe:
        width = getattr(teacher, family.moe.width_key)
        expected.update(experts=(n, teacher.num_experts), expert_activation=(n, teacher.num_experts), expert_neurons=(n, teacher.num_experts, width))
        if teacher.shared_expert_intermediate_size is not None:
            expected["shared_neurons"] = (n, teacher.shared_expert_intermediate_size)
    else:
        expected["neurons"] = (n, teacher.intermediate_size)
    if family.hybrid:
        expected.update(mamba_heads=(n, teacher.mamba_num_heads), mamba_dims=(n, teacher.mamba_head_dim))
    for name, shape in expected.items():
        if getattr(rankings, name) is None or tuple(getattr(rankings, name).shape) != shape:
            found = None if getattr(rankings, name) is None else tuple(getattr(rankings, name).shape)
            raise MinitronError(
                f"rankings '{name}' have shape {found}, the teacher needs {shape}: these rankings belong to another model; rank this teacher first"
            )
