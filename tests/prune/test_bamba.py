"""The second hybrid family, Bamba, end to end on tiny random models: every layer a Mamba or an
attention mixer and its own MLP, layer types stored as the attention layers' indices, and a Mamba
width tied to the hidden size (mamba_n_heads x mamba_d_head = mamba_expand x hidden_size). The
NemotronH tests (test_hybrid.py, test_mamba.py) cover what the two share."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
import yaml
from helpers import (
    assert_layers_are_the_teachers,
    assert_memory_is_the_weights_and_the_cache,
    best_subset,
    gate_off,
    layers_of_types,
    logits,
    n_params,
    one_line,
    random_blocks,
    random_model,
    reload_in_fresh_process,
)
from transformers import AutoModelForCausalLM, BambaConfig
from transformers.models.bamba.modeling_bamba import BambaMixer

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture, ParamCounter, student_config
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, compute_rankings
from minitron_nas.recipes.search import feasible_candidates

MAMBA, ATTENTION = "linear_attention", "full_attention"
TYPES = [MAMBA, ATTENTION, MAMBA, MAMBA]
TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    attn_layer_indices=[1],
    num_attention_heads=4,
    num_key_value_heads=2,
    mamba_n_heads=8,  # 2 groups of 4 heads; 8 x 8 = mamba_expand (2) x hidden_size (32)
    mamba_d_head=8,
    mamba_n_groups=2,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_chunk_size=16,
    max_position_embeddings=128,
    eos_token_id=0,
    bos_token_id=0,
    pad_token_id=0,
)
# Every parameter Bamba can add or drop, and tied embeddings.
VARIANTS = {
    "plain": {},
    "mamba-biases": {"mamba_proj_bias": True, "mamba_conv_bias": False},
    "attention-and-mlp-biases": {"attention_bias": True, "mlp_bias": True},
    "tied": {"tie_word_embeddings": True},
}


def tiny_bamba(seed: int = 0, **overrides):
    """Random init with the norms moved away from exactly 1, so slicing errors show."""
    return random_model(BambaConfig(**{**TINY, **overrides}), seed, dtype=torch.float32)


def bamba_rankings(seed: int = 0, types: list[str] = TYPES) -> Rankings:
    """Random scores shaped as compute_rankings gives them: heads and Mamba heads zero outside their layers, neurons everywhere."""
    g = torch.Generator().manual_seed(seed)
    n = len(types)

    def rows(kind: str, width: int) -> torch.Tensor:
        return torch.rand(n, width, generator=g) * torch.tensor([t == kind for t in types], dtype=torch.float)[:, None]

    return Rankings(
        heads=rows(ATTENTION, TINY["num_attention_heads"]),
        neurons=torch.rand(n, TINY["intermediate_size"], generator=g),
        channels=torch.rand(TINY["hidden_size"], generator=g),
        block_importance=torch.rand(n, generator=g),
        mamba_heads=rows(MAMBA, TINY["mamba_n_heads"]),
        mamba_dims=rows(MAMBA, TINY["mamba_d_head"]),
    )


# --- identity and exact counts ----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruning_to_own_architecture_reproduces_logits(variant):
    model = tiny_bamba(**VARIANTS[variant])
    teacher = Architecture.from_config(model.config)
    assert (teacher.num_mamba_layers, teacher.num_attention_layers, teacher.num_mlp_layers, teacher.num_hidden_layers) == (3, 1, None, 4)
    assert (teacher.mamba_num_heads, teacher.mamba_head_dim) == (8, 8)  # Architecture's names for mamba_n_heads, mamba_d_head
    student = prune(model, bamba_rankings(), teacher)
    assert student.config.attn_layer_indices == [1] and student.config.layers_block_type == TYPES
    assert student.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(logits(student), logits(model))


def random_architecture(rng: random.Random) -> Architecture:
    """Any valid architecture of the tiny teacher: Mamba heads a multiple of the 2 groups, heads x
    head_dim = 2 x hidden (so the hidden size follows the Mamba width), 0 layers of a type allowed."""
    while True:
        counts = rng.randint(0, 3), rng.randint(0, 1)
        heads, head_dim = 2 * rng.randint(1, 4), rng.randint(1, 8)
        if sum(counts) and heads * head_dim % 2 == 0:
            break
    groups = rng.choice([1, 2])
    return Architecture(
        hidden_size=heads * head_dim // 2,
        intermediate_size=rng.randint(1, 48),
        num_attention_heads=groups * rng.randint(1, 2),
        num_key_value_heads=groups,
        num_hidden_layers=sum(counts),
        mamba_num_heads=heads,
        mamba_head_dim=head_dim,
        num_mamba_layers=counts[0],
        num_attention_layers=counts[1],
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_are_exact_for_pruned_and_instantiated_students(variant):
    """ParamCounter against the numel of real models, 30 random architectures per variant: each built
    from its student config, and pruned from the teacher where it keeps an attention layer."""
    model = tiny_bamba(**VARIANTS[variant])
    counter = ParamCounter(model.config)
    assert counter.count(Architecture.from_config(model.config)).total == n_params(model)
    tied = VARIANTS[variant].get("tie_word_embeddings", False)
    rng = random.Random(variant)
    seen, pruned = set(), 0
    for trial in range(30):
        arch = random_architecture(rng)
        count = counter.count(arch)
        assert count.active == count.total  # no experts
        assert count.non_embedding == count.total - (1 if tied else 2) * model.config.vocab_size * arch.hidden_size, arch
        kept = layers_of_types({MAMBA: arch.num_mamba_layers, ATTENTION: arch.num_attention_layers}, TYPES)
        config = student_config(model.config, arch, kept)
        assert config.attn_layer_indices == [p for p, layer in enumerate(kept) if TYPES[layer] == ATTENTION]
        assert n_params(AutoModelForCausalLM.from_config(config)) == count.total, arch
        if arch.num_attention_layers:
            student = prune(model, bamba_rankings(seed=trial), replace(arch, layers=tuple(kept)))
            assert n_params(student) == count.total, arch
            pruned += 1
        seen.add((arch.num_mamba_layers == 0, arch.num_attention_layers == 0))
    assert len(seen) == 3 and pruned >= 10  # students without Mamba and without attention layers were among them


# --- the Mamba width follows the hidden size ----------------------------------------------------


def test_a_hidden_size_the_mamba_width_does_not_match_is_refused_in_one_line():
    model = tiny_bamba()
    teacher = Architecture.from_config(model.config)
    with pytest.raises(MinitronError, match=r"ties the Mamba width to the hidden size.*\(8 x 8 = 64\).*mamba_expand x hidden_size \(2 x 24 = 48\)") as err:
        prune(model, bamba_rankings(), Architecture.from_dict({"hidden_size": 24}, teacher))
    one_line(err)
    with pytest.raises(MinitronError, match="multiple of 2") as err:
        prune(model, bamba_rankings(), Architecture.from_dict({"hidden_size": 12, "mamba_num_heads": 3}, teacher))
    one_line(err)
    assert prune(model, bamba_rankings(), Architecture.from_dict({"hidden_size": 24, "mamba_num_heads": 6}, teacher)).config.mamba_n_heads == 6


def test_enumeration_keeps_only_the_mamba_sizes_the_hidden_size_allows(tmp_path):
    """hidden 18 is no multiple of the 4 heads: Bamba accepts it (its attention keeps head_dim 8)."""
    model = tiny_bamba()
    model.config.save_pretrained(tmp_path / "teacher")
    axes = {"hidden_size": [16, 18, 24, 32], "mamba_num_heads": [3, 4, 6, 8], "mamba_head_dim": [4, 6, 8], "num_mamba_layers": [2, 3]}
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"teacher": str(tmp_path / "teacher"), "axes": axes, "budget": {"parameters": 40_000, "tolerance": 0.9}}))
    _, feasible, valid = feasible_candidates(space)
    allowed = {(16, 4, 8), (16, 8, 4), (18, 6, 6), (24, 6, 8), (24, 8, 6), (32, 8, 8)}  # heads x head_dim = 2 x hidden, heads even
    assert {(c.arch.hidden_size, c.arch.mamba_num_heads, c.arch.mamba_head_dim) for c in feasible} == allowed
    assert valid == len(feasible) == 2 * len(allowed)
    counter = ParamCounter(model.config)
    for c in feasible:
        built = AutoModelForCausalLM.from_config(student_config(model.config, c.arch, layers_of_types({MAMBA: c.arch.num_mamba_layers, ATTENTION: 1}, TYPES)))
        assert n_params(built) == c.total == counter.count(c.arch).total


# --- depth per layer type -----------------------------------------------------------------------

DEPTH_ATTENTION = [1, 4, 6]  # 8 layers: Mamba 0, 2, 3, 5, 7
DEPTH_TYPES = [ATTENTION if i in DEPTH_ATTENTION else MAMBA for i in range(8)]


@pytest.mark.parametrize("seed", range(6))
def test_depth_keeps_the_best_layers_of_each_type_and_remaps_the_attention_indices(seed):
    model = tiny_bamba(num_hidden_layers=8, attn_layer_indices=DEPTH_ATTENTION)
    teacher = Architecture.from_config(model.config)
    rankings = bamba_rankings(seed, DEPTH_TYPES)
    rng = random.Random(seed)
    counts = {MAMBA: rng.randint(1, 4), ATTENTION: rng.randint(1, 2)}
    arch = Architecture.from_dict({"num_mamba_layers": counts[MAMBA], "num_attention_layers": counts[ATTENTION]}, teacher)
    assert arch.num_hidden_layers == sum(counts.values()) and arch.num_mlp_layers is None
    student = prune(model, rankings, arch)
    expected = sorted(set().union(*(best_subset(rankings.block_importance, DEPTH_TYPES, kind, n) for kind, n in counts.items())))
    assert student.config.attn_layer_indices == [p for p, layer in enumerate(expected) if layer in DEPTH_ATTENTION]
    assert student.config.layers_block_type == [DEPTH_TYPES[i] for i in expected]
    assert_layers_are_the_teachers(student, model, expected)


def test_per_type_axes_refuse_mlp_layers_and_no_attention_layer_in_one_line():
    model = tiny_bamba()
    teacher = Architecture.from_config(model.config)
    with pytest.raises(MinitronError, match="num_mlp_layers=1 but the teacher has no such part") as err:
        prune(model, bamba_rankings(), Architecture.from_dict({"num_mlp_layers": 1}, teacher))
    one_line(err)
    with pytest.raises(MinitronError, match="num_attention_layers=0 leaves no attention layer") as err:
        prune(model, bamba_rankings(), Architecture.from_dict({"num_attention_layers": 0}, teacher))
    one_line(err)


# --- Mamba heads, group-aware ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "hidden, keep_heads, keep_head_dim",
    [(24, 6, 8), (16, 4, 8), (24, 8, 6), (12, 4, 6)],
    ids=["three-heads-a-group", "two-heads-a-group", "head-dim", "heads-and-head-dim"],
)
def test_mamba_heads_are_cut_inside_their_groups_and_each_mixer_is_the_gated_off_teachers(hidden, keep_heads, keep_head_dim):
    """Each student mixer, on the kept hidden channels of an input, gives the kept channels of the
    gated-off teacher mixer's output on that input with the other channels zeroed."""
    model = tiny_bamba(mamba_proj_bias=True)
    teacher = Architecture.from_config(model.config)
    rankings = bamba_rankings(seed=3)
    for layer in (0, 2, 3):  # the three best heads of every Mamba layer are all in group 0 (heads 0-3)
        rankings.mamba_heads[layer] = torch.tensor([0.5, 9.0, 8.0, 7.0, 0.1, 0.3, 0.2, 0.05])
    arch = Architecture.from_dict({"hidden_size": hidden, "mamba_num_heads": keep_heads, "mamba_head_dim": keep_head_dim}, teacher)
    student = prune(model, rankings, arch)
    channels = torch.topk(rankings.channels, hidden).indices.sort().values
    x = torch.randn(2, 20, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    zeroed = torch.zeros_like(x)
    zeroed[..., channels] = x[..., channels]
    per_group = keep_heads // 2
    for layer in (0, 2, 3):
        scores = rankings.mamba_heads[layer]
        heads = sorted(g * 4 + h for g in range(2) for h in torch.topk(scores[g * 4 : g * 4 + 4], per_group).indices.tolist())
        assert sum(h >= 4 for h in heads) == per_group  # group 1 kept as many, however much better group 0's were
        dims = torch.topk(rankings.mamba_dims[layer], keep_head_dim).indices.sort().values
        mixer, own = student.model.layers[layer].mamba, model.model.layers[layer].mamba
        assert torch.equal(mixer.A_log, own.A_log[heads]) and torch.equal(mixer.dt_bias, own.dt_bias[heads])
        assert mixer.in_proj.weight.shape == (2 * keep_heads * keep_head_dim + 2 * 2 * 8 + keep_heads, hidden)
        oracle = BambaMixer(model.config, layer_idx=layer).eval()
        oracle.load_state_dict(own.state_dict())
        gate_off(oracle, torch.tensor(heads), dims)
        with torch.no_grad():
            assert (mixer(x[..., channels]) - oracle(zeroed)[..., channels]).abs().max() < 1e-5
    assert (logits(student) - logits(model)).abs().max() > 1e-3  # the cut did change the model


# --- rankings -------------------------------------------------------------------------------------


def test_rankings_score_heads_and_mamba_heads_in_their_layers_and_neurons_in_every_layer():
    model = tiny_bamba()
    r = compute_rankings(model, random_blocks(4, 20), progress=False, batch_size=2)
    assert r.heads.shape == (4, 4) and r.neurons.shape == (4, 48) and r.mamba_heads.shape == (4, 8) and r.mamba_dims.shape == (4, 8)
    assert (r.neurons > 0).all()  # every layer has its MLP
    for part, kind in ((r.heads, ATTENTION), (r.mamba_heads, MAMBA), (r.mamba_dims, MAMBA)):
        for layer, t in enumerate(TYPES):
            assert (part[layer] > 0).all() if t == kind else (part[layer] == 0).all(), (kind, layer)
    assert r.norm_inputs.shape == (2 * 4 + 1, 32)  # input_layernorm and pre_ff_layernorm per layer, then the final norm
    assert (r.channels > 0).all() and torch.isfinite(r.block_importance).all()


# --- cache memory of a candidate -----------------------------------------------------------------


@pytest.mark.parametrize("sizes", [{}, {"hidden_size": 12, "mamba_num_heads": 4, "mamba_head_dim": 6, "num_mamba_layers": 2}], ids=["teacher", "mamba-cut"])
def test_memory_is_the_weights_and_the_cache_a_forward_fills(sizes):
    model = tiny_bamba()
    arch = Architecture.from_dict(sizes, Architecture.from_config(model.config))
    student = prune(model, bamba_rankings(), arch)
    assert_memory_is_the_weights_and_the_cache(model.config, arch, student)


# --- a saved student reloads with plain transformers ---------------------------------------------


def test_saved_student_reloads_in_a_fresh_process_with_the_same_logits(tmp_path):
    model = tiny_bamba(mamba_proj_bias=True)
    teacher = Architecture.from_config(model.config)
    arch = Architecture.from_dict(
        {"hidden_size": 24, "intermediate_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1}
        | {"mamba_num_heads": 8, "mamba_head_dim": 6, "num_mamba_layers": 2},
        teacher,
    )
    rankings = bamba_rankings(seed=2)
    rankings.block_importance = torch.tensor([0.1, 0.5, 0.9, 0.8])  # layer 0 goes: the attention layer comes first
    student = prune(model, rankings, arch)
    assert student.config.attn_layer_indices == [0]
    reloaded = reload_in_fresh_process(student, "bamba", tmp_path, "attn_layer_indices")  # same logits and greedy tokens
    assert reloaded["class"] == "BambaForCausalLM" and reloaded["config"]["attn_layer_indices"] == [0]
    assert Architecture.from_config(student.config) == arch
