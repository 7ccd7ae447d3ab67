"""Pruning: slices land where the rankings say, the student is a plain transformers model."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_NAMES, TINY_CONFIGS, expert_width, random_blocks, random_rankings, tiny_model

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.families import family_for, layers_of
from minitron_nas.model.saving import save_model
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import Rankings


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# Teacher 48/96/6 heads/2 groups/4 layers -> every axis cut; layer 1 has the lowest block
# importance, so the kept layers [0, 2, 3] differ from "the first three".
SMALL = Architecture(hidden_size=24, intermediate_size=40, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3)
# An MoE teacher (4 experts of width 96 or 32, top-2) also loses an expert, part of every
# expert's width and of the shared expert's.
SMALL_MOE = {"num_experts": 3, "moe_intermediate_size": 20, "shared_expert_intermediate_size": 24}


def small_arch(model) -> Architecture:
    """SMALL for this teacher: its MoE sizes cut too; OLMoE's hidden size is its query width (2 heads x 8)."""
    teacher = Architecture.from_config(model.config)
    sizes = {k: v for k, v in SMALL.to_dict().items() if v is not None}
    sizes.update({k: v for k, v in SMALL_MOE.items() if getattr(teacher, k) is not None})
    if family_for(model.config).hidden_is_query_width:
        sizes["hidden_size"] = 2 * 8
    return Architecture.from_dict(sizes, teacher)


def small_rankings(teacher: Architecture) -> Rankings:
    rankings = random_rankings(teacher, seed=1)
    rankings.block_importance = torch.tensor([0.9, 0.1, 0.5, 0.7])
    return rankings


def test_pruning_to_own_architecture_reproduces_logits(family_name):
    model = tiny_model(family_name)
    teacher = Architecture.from_config(model.config)
    student = prune(model, random_rankings(teacher), teacher)
    ids = random_blocks(2, 32)
    assert type(student) is type(model)
    assert student is not model
    assert (logits(student, ids) - logits(model, ids)).abs().max() <= 1e-5
    # the student owns its weights: changing it leaves the teacher alone
    with torch.no_grad():
        student.model.embed_tokens.weight.zero_()
    assert model.model.embed_tokens.weight.abs().sum() > 0


def test_pruning_to_smaller_architecture(family_name):
    model = tiny_model(family_name)
    teacher = Architecture.from_config(model.config)
    arch = small_arch(model)
    hidden = arch.hidden_size
    student = prune(model, small_rankings(teacher), arch)
    cfg = student.config
    assert type(student) is type(model)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (
        hidden,
        40,
        2,
        1,
        3,
    )
    assert Architecture.from_config(cfg) == arch
    assert len(layers_of(student)) == 3
    assert cfg.head_dim == model.config.head_dim
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types is not None:
        assert cfg.layer_types == [layer_types[i] for i in (0, 2, 3)]
    attn = layers_of(student)[0].self_attn
    assert attn.q_proj.weight.shape == (2 * 8, hidden)
    assert attn.k_proj.weight.shape == (1 * 8, hidden)
    assert attn.o_proj.weight.shape == (hidden, 2 * 8)
    mlp = layers_of(student)[0].mlp
    if arch.num_experts is None:
        assert mlp.down_proj.weight.shape == (hidden, 40)
    else:  # 3 experts of the expert width (Mixtral, OLMoE: intermediate_size), top-2 kept
        width = expert_width(arch)
        assert mlp.gate.weight.shape == (3, hidden)
        assert mlp.experts.gate_up_proj.shape == (3, 2 * width, hidden)
        assert mlp.experts.down_proj.shape == (3, hidden, width)
        assert cfg.num_experts_per_tok == 2
        if arch.shared_expert_intermediate_size is not None:
            assert mlp.shared_expert.down_proj.weight.shape == (hidden, 24)
            assert mlp.shared_expert_gate.weight.shape == (1, hidden)
    assert student.config.tie_word_embeddings == model.config.tie_word_embeddings
    if model.config.tie_word_embeddings:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    out = logits(student, random_blocks(2, 32))
    assert out.shape == (2, 32, model.config.vocab_size)
    assert torch.isfinite(out).all()


def test_pruned_layers_follow_block_importance_and_criteria():
    model = tiny_model("llama")
    teacher = Architecture.from_config(model.config)
    rankings = small_rankings(teacher)
    assert select(rankings, SMALL, teacher).layers == [0, 2, 3]
    assert select(rankings, SMALL, teacher, layer_criterion="last").layers == [0, 1, 2]
    with pytest.raises(MinitronError, match="layer_loss"):
        select(rankings, SMALL, teacher, layer_criterion="layer_loss")
    rankings.layer_loss = torch.tensor([1.0, 5.0, 2.0, 3.0])
    assert select(rankings, SMALL, teacher, layer_criterion="layer_loss").layers == [1, 2, 3]
    with pytest.raises(MinitronError, match="unknown layer criterion"):
        select(rankings, SMALL, teacher, layer_criterion="random")
    # an explicit layer list wins over every criterion, and keeps its order
    arch = Architecture.from_dict({"layers": [3, 1]}, teacher)
    assert select(rankings, arch, teacher).layers == [3, 1]


# --- save -> reload in a fresh process ----------------------------------------------------

_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]))  # same kernels' partitioning as the parent: bitwise equal
ids = torch.load(sys.argv[2])
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    torch.save({"logits": out, "class": type(model).__name__}, folder + "/reloaded.pt")
"""


@pytest.fixture(scope="module")
def saved_students(tmp_path_factory):
    """Every family's pruned student, saved and reloaded by one fresh Python process."""
    root = tmp_path_factory.mktemp("students")
    ids = random_blocks(2, 32, seed=3)
    torch.save(ids, root / "ids.pt")
    expected = {}
    for name in FAMILY_NAMES:
        model = tiny_model(name)
        teacher = Architecture.from_config(model.config)
        student = prune(model, small_rankings(teacher), small_arch(model))
        save_model(student, root / name, metadata={"family": name})
        expected[name] = (logits(student, ids), type(student).__name__)
    result = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(torch.get_num_threads()), str(root / "ids.pt"), *(str(root / n) for n in FAMILY_NAMES)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return root, expected


def test_saved_student_reloads_identically_in_fresh_process(saved_students, family_name):
    root, expected = saved_students
    folder = root / family_name
    assert (folder / "config.json").is_file()
    assert (folder / "minitron.json").read_text().count(family_name) == 1
    reloaded = torch.load(folder / "reloaded.pt")
    want_logits, want_class = expected[family_name]
    assert reloaded["class"] == want_class
    assert torch.equal(reloaded["logits"], want_logits)
    assert not list(Path(root).glob(".*partial*"))


# --- GQA-aware selection -------------------------------------------------------------------

GQA = dict(hidden_size=48, num_attention_heads=12, num_key_value_heads=4)  # 3 heads per group
GQA_HIDDEN = 24  # the students' hidden size


def gqa(family_name: str) -> tuple[dict, int]:
    """(teacher overrides, student hidden size): OLMoE's hidden size is its query width (heads x 8)."""
    if family_name == "olmoe":
        return {**GQA, "hidden_size": 12 * 8}, 4 * 8
    return GQA, GQA_HIDDEN


# per layer: the two favoured groups and, inside each, the two favoured (local) heads
FAVOURED = [
    {1: (0, 2), 3: (1, 2)},
    {0: (0, 1), 2: (0, 2)},
    {2: (1, 2), 3: (0, 1)},
    {0: (0, 2), 1: (1, 2)},
]


def gqa_rankings(teacher: Architecture) -> Rankings:
    rankings = random_rankings(teacher, seed=5)
    heads = torch.empty(teacher.num_hidden_layers, teacher.num_key_value_heads, teacher.heads_per_group)
    g = torch.Generator().manual_seed(7)
    for layer, favoured in enumerate(FAVOURED):
        heads[layer] = 1 + torch.rand(teacher.num_key_value_heads, teacher.heads_per_group, generator=g)  # 1..2
        for group, local in favoured.items():
            heads[layer, group, list(local)] = 10 + torch.rand(len(local), generator=g)
    # an unfavoured group may not win through many middling heads: sum of favoured > 3 * 2
    rankings.heads = heads.view(teacher.num_hidden_layers, -1)
    return rankings


def expected_heads(layer: int) -> tuple[list[int], list[int]]:
    groups = sorted(FAVOURED[layer])
    heads = [g * 3 + h for g in groups for h in FAVOURED[layer][g]]
    return groups, heads


def test_gqa_selection_keeps_favoured_groups_and_heads():
    model = tiny_model("llama", **GQA)
    teacher = Architecture.from_config(model.config)
    arch = Architecture(48, 96, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4)
    chosen = select(gqa_rankings(teacher), arch, teacher)
    for layer in range(4):
        groups, heads = expected_heads(layer)
        assert chosen.kv_groups[layer].tolist() == groups
        assert chosen.query_heads[layer].tolist() == heads
        # every kept query head belongs to a kept group, in the student's group order
        assert [h // 3 for h in chosen.query_heads[layer].tolist()] == [g for g in groups for _ in range(2)]


def test_kv_groups_are_chosen_by_the_sum_of_their_heads_not_the_largest():
    """Hand-computed: group 0 holds heads (5, 5, 5), sum 15, max 5; group 1 holds (9, 0, 0), sum 9,
    max 9; groups 2 and 3 are smaller on both. Keeping 1 of 4 groups by sum keeps group 0 (max would keep group 1)."""
    teacher = Architecture(48, 96, num_attention_heads=12, num_key_value_heads=4, num_hidden_layers=1)
    rankings = random_rankings(teacher)
    rankings.heads = torch.tensor([[5.0, 5.0, 5.0, 9.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0]])
    arch = Architecture(48, 96, num_attention_heads=3, num_key_value_heads=1, num_hidden_layers=1)
    chosen = select(rankings, arch, teacher)
    assert chosen.kv_groups[0].tolist() == [0]
    assert chosen.query_heads[0].tolist() == [0, 1, 2]


def _rows(units, head_dim=8):
    return [u * head_dim + d for u in units for d in range(head_dim)]


def test_gqa_student_weights_are_teacher_slices(family_name):
    overrides, hidden = gqa(family_name)
    model = tiny_model(family_name, **overrides)
    teacher = Architecture.from_config(model.config)
    rankings = gqa_rankings(teacher)
    width = teacher.hidden_size  # 48 (OLMoE: 96)
    rankings.channels = torch.arange(float(width)).flip(0)  # keep channels 0..hidden-1 (highest scores)
    rankings.channels[[width - 18, width - 8]] = 100.0  # ... but these two (30 and 40 of 48) instead of the last two
    channels = sorted([*range(hidden - 2), width - 18, width - 8])
    arch = Architecture.from_dict({"hidden_size": hidden, "num_attention_heads": 4, "num_key_value_heads": 2}, teacher)
    student = prune(model, rankings, arch)
    for layer in range(4):
        groups, heads = expected_heads(layer)
        t, s = layers_of(model)[layer].self_attn, layers_of(student)[layer].self_attn
        q_rows, kv_rows = _rows(heads), _rows(groups)
        assert torch.equal(s.q_proj.weight, t.q_proj.weight[q_rows][:, channels])
        assert torch.equal(s.k_proj.weight, t.k_proj.weight[kv_rows][:, channels])
        assert torch.equal(s.v_proj.weight, t.v_proj.weight[kv_rows][:, channels])
        assert torch.equal(s.o_proj.weight, t.o_proj.weight[channels][:, q_rows])
        if t.q_proj.bias is not None:
            assert torch.equal(s.q_proj.bias, t.q_proj.bias[q_rows])
            assert torch.equal(s.k_proj.bias, t.k_proj.bias[kv_rows])
            assert torch.equal(s.v_proj.bias, t.v_proj.bias[kv_rows])
        if t.o_proj.bias is not None:
            assert torch.equal(s.o_proj.bias, t.o_proj.bias[channels])
        if hasattr(t, "q_norm") and t.q_norm.weight.numel() == 8:  # one norm per head, shared by all heads
            assert torch.equal(s.q_norm.weight, t.q_norm.weight)
            assert torch.equal(s.k_norm.weight, t.k_norm.weight)
        elif hasattr(t, "q_norm"):  # OLMoE: one norm over all heads at once, sliced with them
            assert torch.equal(s.q_norm.weight, t.q_norm.weight[q_rows])
            assert torch.equal(s.k_norm.weight, t.k_norm.weight[kv_rows])
        norm = layers_of(model)[layer].input_layernorm.weight
        assert torch.equal(layers_of(student)[layer].input_layernorm.weight, norm[channels])
        t_mlp, s_mlp = layers_of(model)[layer].mlp, layers_of(student)[layer].mlp
        if arch.num_experts is not None:  # every expert and neuron kept: only the hidden channels are cut
            assert torch.equal(s_mlp.gate.weight, t_mlp.gate.weight[:, channels])
            assert torch.equal(s_mlp.experts.gate_up_proj, t_mlp.experts.gate_up_proj[:, :, channels])
            assert torch.equal(s_mlp.experts.down_proj, t_mlp.experts.down_proj[:, channels])


def test_gqa_student_equals_teacher_with_dropped_heads_silenced(family_name):
    """Kept query heads still attend with their own group's keys: zeroing the dropped heads'
    o_proj columns in the teacher gives exactly the student's function."""
    if family_for(TINY_CONFIGS[family_name]()).hidden_is_query_width:
        pytest.skip("OLMoE normalises q over all heads at once and its hidden size is the query width: dropping heads is not silencing them")
    model = tiny_model(family_name, **GQA)
    teacher = Architecture.from_config(model.config)
    arch = Architecture.from_dict({"num_attention_heads": 4, "num_key_value_heads": 2}, teacher)
    student = prune(model, gqa_rankings(teacher), arch)
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        for layer in range(4):
            _, heads = expected_heads(layer)
            dropped = [h for h in range(12) if h not in heads]
            layers_of(silenced)[layer].self_attn.o_proj.weight[:, _rows(dropped)] = 0
    ids = random_blocks(2, 32, seed=4)
    assert (logits(student, ids) - logits(silenced, ids)).abs().max() <= 1e-5
    assert (logits(student, ids) - logits(model, ids)).abs().max() > 1e-3  # heads really were dropped


# --- layers ---------------------------------------------------------------------------------


def _skip_hook(module, args, kwargs, output):
    hidden_in = args[0] if args else kwargs["hidden_states"]
    return (hidden_in, *output[1:]) if isinstance(output, tuple) else hidden_in


@pytest.mark.parametrize("dropped", [1, 2])
def test_dropping_a_layer_equals_skipping_it(family_name, dropped):
    """seq_len 32 > the sliding window 16, so a wrong attention type per layer would show."""
    model = tiny_model(family_name)
    teacher = Architecture.from_config(model.config)
    kept = [i for i in range(4) if i != dropped]
    student = prune(model, random_rankings(teacher), Architecture.from_dict({"layers": kept}, teacher))
    ids = random_blocks(2, 32, seed=2)
    handle = layers_of(model)[dropped].register_forward_hook(_skip_hook, with_kwargs=True)
    try:
        skipped = logits(model, ids)
    finally:
        handle.remove()
    assert (logits(student, ids) - skipped).abs().max() <= 1e-5
    assert (logits(model, ids) - skipped).abs().max() > 1e-3  # the layer mattered


def test_layer_order_of_explicit_list_is_kept():
    model = tiny_model("llama")
    teacher = Architecture.from_config(model.config)
    student = prune(model, random_rankings(teacher), Architecture.from_dict({"layers": [2, 0]}, teacher))
    for position, source in enumerate([2, 0]):
        assert torch.equal(layers_of(student)[position].mlp.up_proj.weight, layers_of(model)[source].mlp.up_proj.weight)


def test_ffn_neurons_follow_rankings(family_name):
    model = tiny_model(family_name)
    teacher = Architecture.from_config(model.config)
    rankings = random_rankings(teacher)
    if teacher.num_experts is not None:
        return _expert_neurons_follow_rankings(model, teacher, rankings)
    keep = [3, 10, 11, 50, 95]
    rankings.neurons[2, keep] = 5.0
    student = prune(model, rankings, Architecture.from_dict({"intermediate_size": 5}, teacher))
    t, s = layers_of(model)[2].mlp, layers_of(student)[2].mlp
    assert torch.equal(s.up_proj.weight, t.up_proj.weight[keep])
    assert torch.equal(s.gate_proj.weight, t.gate_proj.weight[keep])
    assert torch.equal(s.down_proj.weight, t.down_proj.weight[:, keep])


def _expert_neurons_follow_rankings(model, teacher: Architecture, rankings: Rankings) -> None:
    """Each expert keeps its own best neurons, in its gate and up rows alike; the shared expert its own."""
    width = expert_width(teacher)
    keeps = [[0, 5, 17, 30, width - 1], [1, 2, 3, 12, 29], [4, 9, 20, 21, width - 2], [6, 7, 8, 25, 31]]  # widths 32 or 96
    for e, keep in enumerate(keeps):
        rankings.expert_neurons[2, e, keep] = 5.0
    sizes = {family_for(model.config).moe.width_key: 5}
    shared_keep = [0, 7, 20, 21, 39]
    if teacher.shared_expert_intermediate_size is not None:
        rankings.shared_neurons[2, shared_keep] = 5.0
        sizes["shared_expert_intermediate_size"] = 5
    student = prune(model, rankings, Architecture.from_dict(sizes, teacher))
    t, s = layers_of(model)[2].mlp, layers_of(student)[2].mlp
    assert torch.equal(s.gate.weight, t.gate.weight)  # every expert kept
    for e, keep in enumerate(keeps):
        assert torch.equal(s.experts.gate_up_proj[e], t.experts.gate_up_proj[e][keep + [width + k for k in keep]])
        assert torch.equal(s.experts.down_proj[e], t.experts.down_proj[e][:, keep])
    if teacher.shared_expert_intermediate_size is not None:
        assert torch.equal(s.shared_expert.gate_proj.weight, t.shared_expert.gate_proj.weight[shared_keep])
        assert torch.equal(s.shared_expert.up_proj.weight, t.shared_expert.up_proj.weight[shared_keep])
        assert torch.equal(s.shared_expert.down_proj.weight, t.shared_expert.down_proj.weight[:, shared_keep])
        assert torch.equal(s.shared_expert_gate.weight, t.shared_expert_gate.weight)


# --- gemma3 embedding scale ----------------------------------------------------------------


def test_gemma3_hidden_pruning_keeps_embedding_output():
    model = tiny_model("gemma3")
    teacher = Architecture.from_config(model.config)
    rankings = random_rankings(teacher, seed=9)
    student = prune(model, rankings, Architecture.from_dict({"hidden_size": 24}, teacher))
    channels = torch.topk(rankings.channels, 24).indices.sort().values
    ids = random_blocks(2, 16)
    with torch.no_grad():
        want = model.model.embed_tokens(ids)[..., channels]
        got = student.model.embed_tokens(ids)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    # tied: the logits use the rescaled matrix, so the final norm's gain absorbs the factor
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    factor = (48 / 24) ** 0.5
    assert torch.allclose((student.model.norm.weight + 1) * factor, (model.model.norm.weight + 1)[channels], atol=1e-6)


# --- bad rankings ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, shape", [("heads", (4, 5)), ("heads", (3, 6)), ("neurons", (4, 95)), ("channels", (47,)), ("block_importance", (5,))])
def test_rankings_of_wrong_shape_are_refused(name, shape):
    model = tiny_model("llama")
    teacher = Architecture.from_config(model.config)
    rankings = random_rankings(teacher)
    setattr(rankings, name, torch.rand(shape))
    with pytest.raises(MinitronError, match=f"rankings '{name}' have shape") as info:
        prune(model, rankings, SMALL)
    assert "\n" not in str(info.value)


def test_prune_validates_architecture():
    model = tiny_model("llama")
    teacher = Architecture.from_config(model.config)
    with pytest.raises(MinitronError, match="larger than the teacher"):
        prune(model, random_rankings(teacher), Architecture(64, 96, 6, 2, 4))
    with pytest.raises(MinitronError, match="transformers refuses"):
        prune(model, random_rankings(teacher), Architecture(47, 96, 6, 2, 4))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_norm_correction_scales_each_gain_by_the_calibrated_rms_ratio(family):
    import numpy as np

    from minitron_nas.model.families import family_for
    from minitron_nas.prune.ranking import compute_rankings

    model = tiny_model(family)
    offset = family_for(model.config).norm_offset
    per_layer = 4 if family == "gemma3" else 2
    calibration = random_blocks(8, 32)
    rankings = compute_rankings(model, calibration, progress=False)
    assert rankings.norm_inputs.shape == (4 * per_layer + 1, 48)
    # Row 0 is layer 0's input norm: its input is the embedding, so its mean squares are known.
    embedded = model.model.embed_tokens(calibration).detach().double().numpy()  # Gemma's module applies its scale
    assert np.allclose(rankings.norm_inputs[0].numpy(), (embedded**2).mean(axis=(0, 1)), rtol=1e-4)

    teacher = Architecture.from_config(model.config)
    arch = Architecture.from_dict({"hidden_size": 24, "num_hidden_layers": 3}, teacher)
    chosen = select(rankings, arch, teacher)
    student = prune(model, rankings, arch, norm_correction=True)
    squares = rankings.norm_inputs.double().numpy()
    kept = chosen.channels.numpy()
    for position, layer in enumerate(chosen.layers):
        row = layer * per_layer  # input_layernorm of that teacher layer
        ratio = np.sqrt(squares[row, kept].mean() / squares[row].mean())
        gain = layers_of(model)[layer].input_layernorm.weight.detach().double().numpy()[kept] + offset
        got = layers_of(student)[position].input_layernorm.weight.detach().double().numpy() + offset
        assert np.allclose(got, gain * ratio, rtol=1e-5)
    ratio = np.sqrt(squares[-1, kept].mean() / squares[-1].mean())
    final = (model.model.norm.weight.detach().double().numpy()[kept] + offset) * ratio
    if family == "gemma3":  # tied embeddings: the final norm also undoes the embedding scale change
        final /= family_for(model.config).embedding_scale(48) / family_for(model.config).embedding_scale(24)
    assert np.allclose(student.model.norm.weight.detach().double().numpy() + offset, final, rtol=1e-5)

    ids = random_blocks(2, 32, seed=7)
    same = prune(model, rankings, teacher, norm_correction=True)
    assert torch.allclose(logits(same, ids), logits(model, ids), atol=1e-5)  # nothing to correct at full width


def test_norm_correction_needs_norm_statistics():
    model = tiny_model("llama")
    teacher = Architecture.from_config(model.config)
    with pytest.raises(MinitronError, match="no norm statistics"):
        prune(model, random_rankings(teacher), SMALL, norm_correction=True)
