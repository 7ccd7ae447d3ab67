"""The hybrid Mamba/attention family (NemotronH) end to end on tiny random models: identity
pruning, exact counts, depth chosen per layer type, group-aware Mamba heads, rankings per layer
type, a saved student that plain transformers reloads. The mixer slicing itself: test_mamba.py."""

from __future__ import annotations

import copy
import random
from dataclasses import replace

import pytest
import torch
from helpers import (
    HYBRID_IDS,
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
from transformers import AutoModelForCausalLM, NemotronHConfig

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture, ParamCounter, student_config
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, compute_rankings

MAMBA, ATTENTION, MLP = "linear_attention", "full_attention", "mlp"
# "M-M*-M": layers 0, 2, 5 are Mamba, 3 attention, 1 and 4 MLP.
TYPES = [MAMBA, MLP, MAMBA, ATTENTION, MLP, MAMBA]
TINY = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=64,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    mamba_num_heads=8,  # 2 groups of 4 heads
    mamba_head_dim=6,
    n_groups=2,
    ssm_state_size=8,
    conv_kernel=4,
    hybrid_override_pattern="M-M*-M",
    max_position_embeddings=128,
    eos_token_id=0,
    bos_token_id=0,
    pad_token_id=0,
)
# Bias variations: every parameter NemotronH can add or drop (its attention has no biases).
VARIANTS = {
    "plain": {},
    "mamba-biases": {"use_bias": True, "use_conv_bias": False},
    "mlp-bias": {"mlp_bias": True},
}


def tiny_config(**overrides) -> NemotronHConfig:
    return NemotronHConfig(**{**TINY, **overrides})


def tiny_hybrid(seed: int = 0, **overrides):
    """As helpers.tiny_model: random init, norms moved away from exactly 1 so slicing errors show."""
    return random_model(tiny_config(**overrides), seed, dtype=torch.float32)


def hybrid_rankings(seed: int = 0, types: list[str] = TYPES) -> Rankings:
    """Random scores shaped as compute_rankings gives them: each part's rows are zeros outside its layer type."""
    g = torch.Generator().manual_seed(seed)
    n = len(types)

    def rows(kind: str, width: int) -> torch.Tensor:
        mask = torch.tensor([t == kind for t in types], dtype=torch.float)[:, None]
        return torch.rand(n, width, generator=g) * mask

    return Rankings(
        heads=rows(ATTENTION, TINY["num_attention_heads"]),
        neurons=rows(MLP, TINY["intermediate_size"]),
        channels=torch.rand(TINY["hidden_size"], generator=g),
        block_importance=torch.rand(n, generator=g),
        mamba_heads=rows(MAMBA, TINY["mamba_num_heads"]),
        mamba_dims=rows(MAMBA, TINY["mamba_head_dim"]),
    )


# --- identity and exact counts ----------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pruning_to_own_architecture_reproduces_logits(variant):
    model = tiny_hybrid(**VARIANTS[variant])
    teacher = Architecture.from_config(model.config)
    assert (teacher.num_mamba_layers, teacher.num_attention_layers, teacher.num_mlp_layers, teacher.num_hidden_layers) == (3, 1, 2, 6)
    student = prune(model, hybrid_rankings(), teacher)
    assert student.config.layers_block_type == TYPES
    assert student.state_dict().keys() == model.state_dict().keys()
    assert torch.equal(logits(student), logits(model))


def random_architecture(rng: random.Random) -> Architecture:
    """Any valid architecture of the tiny teacher: Mamba heads a multiple of the 2 groups, 0 layers of a type allowed."""
    while True:
        counts = rng.randint(0, 3), rng.randint(0, 1), rng.randint(0, 2)
        if sum(counts):
            break
    groups = rng.choice([1, 2])
    return Architecture(
        hidden_size=rng.randint(4, 48),
        intermediate_size=rng.randint(1, 64),
        num_attention_heads=groups * rng.randint(1, 3),
        num_key_value_heads=groups,
        num_hidden_layers=sum(counts),
        mamba_num_heads=2 * rng.randint(1, 4),
        mamba_head_dim=rng.randint(1, 6),
        num_mamba_layers=counts[0],
        num_attention_layers=counts[1],
        num_mlp_layers=counts[2],
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_counts_are_exact_for_pruned_and_instantiated_students(variant):
    """ParamCounter against the numel of real models, 40 random architectures per variant: each built
    from its student config, and pruned from the teacher where transformers can run the student with
    a cache (a Mamba or attention layer first and an attention layer, which validate and select_layers ensure)."""
    model = tiny_hybrid(**VARIANTS[variant])
    counter = ParamCounter(model.config)
    assert counter.count(Architecture.from_config(model.config)).total == n_params(model)
    rng = random.Random(variant)
    seen, pruned = set(), 0
    for trial in range(40):
        arch = random_architecture(rng)
        count = counter.count(arch)
        assert count.active == count.total  # no experts
        assert count.non_embedding == count.total - 2 * model.config.vocab_size * arch.hidden_size, arch  # untied
        counts = {MAMBA: arch.num_mamba_layers, ATTENTION: arch.num_attention_layers, MLP: arch.num_mlp_layers}
        built = AutoModelForCausalLM.from_config(student_config(model.config, arch, layers_of_types(counts, TYPES)))
        assert n_params(built) == count.total, arch
        if arch.num_mamba_layers and arch.num_attention_layers:
            student = prune(model, hybrid_rankings(seed=trial), replace(arch, layers=tuple(layers_of_types(counts, TYPES))))
            assert n_params(student) == count.total, arch
            pruned += 1
        seen.add((arch.num_mamba_layers == 0, arch.num_attention_layers == 0, arch.num_mlp_layers == 0))
    assert len(seen) >= 4 and pruned >= 10  # students without Mamba, without attention, without MLP layers were among them


def test_a_tie_word_embeddings_config_transformers_does_not_tie_keeps_its_own_output_head():
    model = tiny_hybrid(tie_word_embeddings=True)
    assert model.lm_head.weight is not model.model.embeddings.weight  # two matrices, whatever the config says
    teacher = Architecture.from_config(model.config)
    assert ParamCounter(model.config).count(teacher).total == n_params(model)
    student = prune(model, hybrid_rankings(), teacher)
    assert torch.equal(student.lm_head.weight, model.lm_head.weight)
    assert torch.equal(logits(student), logits(model))


# --- depth per layer type -----------------------------------------------------------------------


DEPTH_PATTERN = "M-*M-M*-M-*M"  # 12 layers: Mamba 0, 3, 5, 8, 11; MLP 1, 4, 7, 9; attention 2, 6, 10
DEPTH_TYPES = [{"M": MAMBA, "-": MLP, "*": ATTENTION}[c] for c in DEPTH_PATTERN]


@pytest.mark.parametrize("seed", range(8))
def test_depth_keeps_the_best_layers_of_each_type(seed):
    """Layer 0 scores highest, as a first layer does: every student keeps a Mamba layer first."""
    model = tiny_hybrid(hybrid_override_pattern=DEPTH_PATTERN)
    teacher = Architecture.from_config(model.config)
    rankings = hybrid_rankings(seed, DEPTH_TYPES)
    rankings.block_importance[0] = 2.0  # the others are in [0, 1)
    rng = random.Random(seed)
    counts = {MAMBA: rng.randint(1, 4), ATTENTION: rng.randint(1, 2), MLP: rng.randint(0, 3)}
    arch = Architecture.from_dict({"num_mamba_layers": counts[MAMBA], "num_attention_layers": counts[ATTENTION], "num_mlp_layers": counts[MLP]}, teacher)
    assert arch.num_hidden_layers == sum(counts.values())
    student = prune(model, rankings, arch)
    expected = sorted(set().union(*(best_subset(rankings.block_importance, DEPTH_TYPES, kind, n) for kind, n in counts.items() if n)))
    assert expected != layers_of_types(counts, DEPTH_TYPES)  # not merely the first layers of each type
    assert student.config.layers_block_type == [DEPTH_TYPES[i] for i in expected]
    assert_layers_are_the_teachers(student, model, expected)


def test_a_layer_list_that_disagrees_with_the_counts_per_type_is_refused():
    model = tiny_hybrid()
    teacher = Architecture.from_config(model.config)
    # layers 0, 1, 2 are Mamba, MLP, Mamba: not one Mamba, one attention and one MLP layer
    arch = Architecture.from_dict({"layers": [0, 1, 2], "num_mamba_layers": 1, "num_attention_layers": 1, "num_mlp_layers": 1}, teacher)
    with pytest.raises(MinitronError, match=r"the layers \[0, 1, 2\] are not the layers per type") as err:
        prune(model, hybrid_rankings(), arch)
    assert "make them agree" in one_line(err)
    agreeing = Architecture.from_dict({"layers": [0, 1, 3], "num_mamba_layers": 1, "num_attention_layers": 1, "num_mlp_layers": 1}, teacher)
    assert prune(model, hybrid_rankings(), agreeing).config.layers_block_type == [MAMBA, MLP, ATTENTION]


def test_a_student_whose_least_important_layer_is_the_first_still_runs_with_a_cache():
    model = tiny_hybrid()
    rankings = hybrid_rankings()
    rankings.block_importance = torch.tensor([0.1, 0.9, 0.5, 0.8, 0.7, 0.6])  # layer 0, a Mamba layer, matters least
    student = prune(model, rankings, Architecture.from_dict({"num_mamba_layers": 2}, Architecture.from_config(model.config)))
    with torch.no_grad():
        assert torch.equal(student(input_ids=HYBRID_IDS).logits, logits(student))  # use_cache from the config: True
        assert student.generate(HYBRID_IDS[:, :8], max_new_tokens=3, do_sample=False).shape == (2, 11)


def test_a_student_without_attention_layers_is_refused_in_one_line():
    model = tiny_hybrid()
    teacher = Architecture.from_config(model.config)
    with pytest.raises(MinitronError, match="num_attention_layers") as err:
        prune(model, hybrid_rankings(), Architecture.from_dict({"layers": [0, 1, 2, 4], "num_attention_layers": 0, "num_mamba_layers": 2}, teacher))
    one_line(err)


# --- Mamba heads, group-aware ---------------------------------------------------------------------


def group_best(scores: torch.Tensor, n_groups: int, per_group: int) -> list[int]:
    """Oracle: in each group of consecutive heads, its best per_group heads."""
    size = len(scores) // n_groups
    kept = []
    for g in range(n_groups):
        own = range(g * size, (g + 1) * size)
        kept += sorted(own, key=lambda h: -scores[h].item())[:per_group]
    return sorted(kept)


@pytest.mark.parametrize("keep_heads, keep_head_dim", [(2, 6), (4, 6), (4, 3)], ids=["one-head-a-group", "two-heads-a-group", "heads-and-head-dim"])
def test_mamba_heads_are_cut_inside_their_groups_and_the_student_is_the_gated_off_teacher(keep_heads, keep_head_dim):
    model = tiny_hybrid()
    teacher = Architecture.from_config(model.config)
    rankings = hybrid_rankings(seed=3)
    for layer in (0, 2, 5):  # the two best heads of every Mamba layer are both in group 0 (heads 0-3)
        rankings.mamba_heads[layer] = torch.tensor([0.5, 9.0, 8.0, 0.4, 0.1, 0.3, 0.2, 0.05])
    arch = Architecture.from_dict({"mamba_num_heads": keep_heads, "mamba_head_dim": keep_head_dim}, teacher)
    student = prune(model, rankings, arch)
    oracle = copy.deepcopy(model)
    for layer in (0, 2, 5):
        heads = group_best(rankings.mamba_heads[layer], n_groups=2, per_group=keep_heads // 2)
        assert heads[-1] >= 4  # group 1 kept one, however much better both of group 0's were
        dims = sorted(torch.topk(rankings.mamba_dims[layer], keep_head_dim).indices.tolist())
        mixer = student.model.layers[layer].mixer
        assert torch.equal(mixer.A_log, model.model.layers[layer].mixer.A_log[heads])
        assert mixer.in_proj.weight.shape[0] == 2 * keep_heads * keep_head_dim + 2 * 2 * 8 + keep_heads
        gate_off(oracle.model.layers[layer].mixer, torch.tensor(heads), torch.tensor(dims))
    assert (logits(student) - logits(oracle)).abs().max() < 1e-4
    assert (logits(student) - logits(model)).abs().max() > 1e-3  # the cut did change the model


# --- rankings -------------------------------------------------------------------------------------


def test_rankings_score_each_part_only_in_its_own_layers_and_survive_a_round_trip(tmp_path):
    model = tiny_hybrid()
    r = compute_rankings(model, random_blocks(4, 20), progress=False, batch_size=2)
    assert r.heads.shape == (6, 6) and r.neurons.shape == (6, 64)
    assert r.mamba_heads.shape == (6, 8) and r.mamba_dims.shape == (6, 6)
    for part, kind in ((r.heads, ATTENTION), (r.neurons, MLP), (r.mamba_heads, MAMBA), (r.mamba_dims, MAMBA)):
        for layer, t in enumerate(TYPES):
            if t == kind:
                assert (part[layer] > 0).all(), (kind, layer)
            else:
                assert (part[layer] == 0).all(), (kind, layer)
    assert (r.channels > 0).all() and torch.isfinite(r.block_importance).all()
    r.save(tmp_path / "r")
    back = Rankings.load(tmp_path / "r")
    assert torch.equal(back.mamba_heads, r.mamba_heads) and torch.equal(back.mamba_dims, r.mamba_dims)
    arch = Architecture.from_dict({"mamba_num_heads": 4, "num_mamba_layers": 2, "num_mlp_layers": 1}, Architecture.from_config(model.config))
    assert torch.equal(logits(prune(model, back, arch)), logits(prune(model, r, arch)))


def test_norm_correction_rescales_the_hidden_norms_and_not_the_mamba_mixers_norms():
    model = tiny_hybrid()
    r = compute_rankings(model, random_blocks(4, 20), progress=False, batch_size=2)
    arch = Architecture.from_dict({"hidden_size": 32}, Architecture.from_config(model.config))
    plain, corrected = prune(model, r, arch), prune(model, r, arch, norm_correction=True)
    channels = torch.topk(r.channels, 32).indices
    # rows of norm_inputs: each layer's one norm, then the final norm
    norms = [f"model.layers.{i}.norm.weight" for i in range(6)] + ["model.norm_f.weight"]
    before, after = plain.state_dict(), corrected.state_dict()
    for row, name in enumerate(norms):
        squares = r.norm_inputs[row].double()
        ratio = (squares[channels].mean() / squares.mean()).sqrt().item()
        assert torch.allclose(after[name], before[name] * ratio), name
    for name in before.keys() - set(norms):
        assert torch.equal(after[name], before[name]), name


# --- cache memory of a candidate -----------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes",
    [
        {},
        {"mamba_num_heads": 4, "mamba_head_dim": 5, "layers": [0, 1, 3, 5], "num_mamba_layers": 2, "num_mlp_layers": 1},
        {"num_key_value_heads": 1, "num_attention_heads": 3, "layers": [3, 4, 5], "num_mamba_layers": 1, "num_mlp_layers": 1},
    ],
    ids=["teacher", "mamba-cut", "attention-first"],
)
def test_memory_is_the_weights_and_the_cache_a_forward_fills(sizes):
    model = tiny_hybrid()
    arch = Architecture.from_dict(sizes, Architecture.from_config(model.config))
    student = prune(model, hybrid_rankings(), arch)
    assert_memory_is_the_weights_and_the_cache(model.config, arch, student)


# --- a saved student reloads with plain transformers ---------------------------------------------


def test_saved_student_reloads_in_a_fresh_process_with_the_same_logits(tmp_path):
    model = tiny_hybrid(use_bias=True)
    teacher = Architecture.from_config(model.config)
    arch = Architecture.from_dict(
        {"hidden_size": 40, "intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1}
        | {"mamba_num_heads": 4, "mamba_head_dim": 5, "num_mamba_layers": 2, "num_attention_layers": 1, "num_mlp_layers": 1},
        teacher,
    )
    rankings = hybrid_rankings(seed=2)
    rankings.block_importance[0] = 2.0  # a Mamba layer first: transformers runs the student with a cache
    student = prune(model, rankings, arch)
    reloaded = reload_in_fresh_process(student, "nemotron_h", tmp_path, "layers_block_type")  # same logits and greedy tokens
    assert reloaded["class"] == "NemotronHForCausalLM"
    assert reloaded["config"]["layers_block_type"] == student.config.layers_block_type
    assert Architecture.from_config(student.config) == arch


# --- what is not supported yet --------------------------------------------------------------------


def test_a_teacher_with_moe_layers_is_refused_in_one_line():
    config = tiny_config(
        hybrid_override_pattern="M*E-", n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, moe_shared_expert_intermediate_size=16
    )
    with pytest.raises(MinitronError, match="nemotron_h layers of type moe are not supported yet") as err:
        ParamCounter(config)
    one_line(err)
