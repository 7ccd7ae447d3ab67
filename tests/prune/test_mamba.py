"""Mamba-2 mixer pruning on tiny random NemotronH models (CPU, the PyTorch scan)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import gate_off
from transformers import NemotronHConfig, NemotronHForCausalLM
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

from minitron_nas.errors import MinitronError
from minitron_nas.model.families import family_for
from minitron_nas.prune.mamba import mamba_head_scores, select_mamba, slice_mamba_mixer

MAMBA_LAYERS = (0, 3)  # the 'M's of PATTERN
PATTERN = "M*-ME"
IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))  # 11 tokens: two chunks of 8, one padded


def tiny_config(n_groups: int = 2, use_bias: bool = False) -> NemotronHConfig:
    """4 Mamba heads of 6 channels; use_bias adds in_proj.bias and out_proj.bias."""
    return NemotronHConfig(
        vocab_size=64,
        hidden_size=16,
        hybrid_override_pattern=PATTERN,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=24,
        mamba_num_heads=4,
        mamba_head_dim=6,
        n_groups=n_groups,
        ssm_state_size=4,
        conv_kernel=3,
        chunk_size=8,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=12,
        moe_shared_expert_intermediate_size=10,
        use_bias=use_bias,
    )


@torch.no_grad()
def tiny_model(config: NemotronHConfig) -> NemotronHForCausalLM:
    torch.manual_seed(0)
    model = NemotronHForCausalLM(config).eval()
    for name, param in model.named_parameters():  # away from the init's zeros, ones and aranges
        param.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return model


@torch.no_grad()
def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def mixer_state(model, layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.mixer."
    return {name.removeprefix(prefix): tensor for name, tensor in model.state_dict().items() if name.startswith(prefix)}


def updated(config: NemotronHConfig, n_heads: int, head_dim: int, **extra) -> NemotronHConfig:
    config = copy.deepcopy(config)
    for key, value in {**family_for(config).hybrid.student_updates(config, n_heads, head_dim, config.hidden_size), **extra}.items():
        setattr(config, key, value)
    return config


def prune_mambas(model, kept: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> NemotronHForCausalLM:
    """The model with every Mamba layer sliced to its (heads, dims); strict loading checks every shape."""
    heads, dims = kept[MAMBA_LAYERS[0]]
    student = NemotronHForCausalLM(updated(model.config, len(heads), len(dims))).eval()
    state = model.state_dict()
    for layer, (heads, dims) in kept.items():
        for name, tensor in slice_mamba_mixer(mixer_state(model, layer), model.config, heads, dims).items():
            state[f"model.layers.{layer}.mixer.{name}"] = tensor
    student.load_state_dict(state)
    return student


@pytest.mark.parametrize("use_bias", [False, True])
def test_identity_slicing_reproduces_mixer_and_logits(use_bias):
    model = tiny_model(tiny_config(use_bias=use_bias))
    config = model.config
    everything = (torch.arange(config.mamba_num_heads), torch.arange(config.mamba_head_dim))
    for layer in MAMBA_LAYERS:
        state = mixer_state(model, layer)
        assert ("in_proj.bias" in state) == use_bias
        sliced = slice_mamba_mixer(state, config, *everything)
        assert sliced.keys() == state.keys()
        for name, tensor in state.items():
            assert torch.equal(sliced[name], tensor), name
            assert sliced[name].data_ptr() != tensor.data_ptr(), f"{name} shares the teacher's storage"
    student = prune_mambas(model, dict.fromkeys(MAMBA_LAYERS, everything))
    assert torch.equal(logits(student), logits(model))


@pytest.mark.parametrize(
    "n_groups, keep_heads, keep_head_dim",
    [(2, 2, 4), (1, 3, 6), (2, 4, 3), (4, 4, 2)],
    ids=["heads-and-dims-2-groups", "heads-1-group", "dims-only", "dims-1-head-a-group"],
)
def test_pruned_student_matches_gated_off_teacher(n_groups, keep_heads, keep_head_dim):
    """Exact (to float rounding) for any G: the oracle rescales each group's norm, see helpers.gate_off."""
    model = tiny_model(tiny_config(n_groups))
    generator = torch.Generator().manual_seed(n_groups + keep_heads)
    kept = {
        layer: select_mamba(torch.rand(4, generator=generator), torch.rand(6, generator=generator), n_groups, keep_heads, keep_head_dim)
        for layer in MAMBA_LAYERS
    }
    student = prune_mambas(model, kept)
    oracle = copy.deepcopy(model)
    for layer, (heads, dims) in kept.items():
        gate_off(oracle.model.layers[layer].mixer, heads, dims)
    assert (logits(student) - logits(oracle)).abs().max() < 1e-4
    assert (logits(student) - logits(model)).abs().max() > 1e-2  # the pruning did change the model


def test_hidden_index_cuts_in_proj_input_and_out_proj_output():
    config = tiny_config(use_bias=True)
    teacher = tiny_model(config).model.layers[0].mixer
    heads, dims, hidden = torch.tensor([1, 2]), torch.tensor([0, 2, 5]), torch.tensor([0, 3, 4, 7, 8, 9, 12, 15])
    student = NemotronHMamba2Mixer(updated(config, 2, 3, hidden_size=8), layer_idx=0).eval()
    student.load_state_dict(slice_mamba_mixer(teacher.state_dict(), config, heads, dims, hidden))
    x = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(1))
    only_kept = torch.zeros_like(x)
    only_kept[..., hidden] = x[..., hidden]
    gate_off(teacher, heads, dims)
    with torch.no_grad():
        assert (student(x[..., hidden]) - teacher(only_kept)[..., hidden]).abs().max() < 1e-4


def test_select_keeps_the_best_heads_of_every_group():
    head_scores, dim_scores = torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([0.5, 0.1, 0.7])
    heads, dims = select_mamba(head_scores, dim_scores, n_groups=2, keep_heads=2, keep_head_dim=2)
    assert heads.tolist() == [0, 3]  # the two best heads are both in group 0, yet group 1 keeps one
    assert dims.tolist() == [0, 2]
    assert select_mamba(head_scores, dim_scores, n_groups=1, keep_heads=2, keep_head_dim=2)[0].tolist() == [0, 1]


@pytest.mark.parametrize(
    "keep_heads, keep_head_dim, fragment",
    [(3, 2, "multiple of 2 up to 4"), (0, 2, "multiple of 2"), (6, 2, "up to 4"), (2, 0, "between 1 and 3"), (2, 4, "between 1 and 3")],
)
def test_select_rejects_impossible_counts(keep_heads, keep_head_dim, fragment):
    with pytest.raises(MinitronError, match=fragment) as err:
        select_mamba(torch.rand(4), torch.rand(3), n_groups=2, keep_heads=keep_heads, keep_head_dim=keep_head_dim)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("heads", [[0, 1], [2, 0], [0, 2, 3]])
def test_slicing_refuses_heads_that_would_change_group(heads):
    model = tiny_model(tiny_config(n_groups=2))
    with pytest.raises(MinitronError, match="select_mamba"):
        slice_mamba_mixer(mixer_state(model, 0), model.config, torch.tensor(heads), torch.arange(6))
    with pytest.raises(MinitronError, match="multiple of 2"):
        family_for(model.config).hybrid.student_updates(model.config, 3, 6, model.config.hidden_size)


def test_head_scores_are_l2_norms_over_channels_and_over_heads():
    y = torch.randn(2, 5, 4 * 6)
    per_head, per_dim = mamba_head_scores(y, n_heads=4, head_dim=6)
    assert per_head.shape == (2, 5, 4) and per_dim.shape == (2, 5, 6)
    assert torch.allclose(per_head[1, 4, 2], y[1, 4, 12:18].norm())
    assert torch.allclose(per_dim[1, 4, 3], y[1, 4, 3::6].norm())
