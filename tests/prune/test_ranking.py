"""Rankings: every score measures what it claims, reductions are right, files are safe."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import expert_width, random_blocks, tiny_model

from minitron_nas.config.settings import REDUCTIONS, Aggregation
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.families import layers_of
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, compute_rankings

HEAD_DIM = 8


def rank(model, blocks=None, **kwargs) -> Rankings:
    blocks = random_blocks(6, 24) if blocks is None else blocks
    return compute_rankings(model, blocks, progress=False, batch_size=4, **kwargs)


def test_score_shapes(family_name):
    model = tiny_model(family_name)
    r = rank(model)
    teacher = Architecture.from_config(model.config)
    assert r.heads.shape == (4, 6)
    assert r.channels.shape == (48,)
    assert r.block_importance.shape == (4,)
    assert r.layer_loss is None
    if teacher.num_experts is None:
        assert r.neurons.shape == (4, 96)
        ffn = [r.neurons]
    else:  # an MoE teacher's FFN neurons are its experts' (and its shared expert's)
        assert r.neurons is None
        assert r.experts.shape == r.expert_activation.shape == (4, 4)
        assert r.expert_neurons.shape == (4, 4, expert_width(teacher))
        ffn = [r.experts, r.expert_activation, r.expert_neurons]
        if teacher.shared_expert_intermediate_size is not None:
            assert r.shared_neurons.shape == (4, 40)
            ffn.append(r.shared_neurons)
        else:
            assert r.shared_neurons is None
    for scores in (r.heads, *ffn, r.channels, r.block_importance):
        assert torch.isfinite(scores).all()
    assert (r.heads > 0).all() and (r.channels > 0).all()
    assert all((scores > 0).all() for scores in ffn)  # 144 tokens: every expert is chosen by some
    assert r.meta["samples"] == 6 and r.meta["seq_len"] == 24
    assert r.meta["model_type"] == model.config.model_type
    assert r.meta["aggregation"] == {"batch": "l2", "seq": "mean"}


def _zero_v_rows(attn, units):
    rows = [u * HEAD_DIM + d for u in units for d in range(HEAD_DIM)]
    with torch.no_grad():
        attn.v_proj.weight[rows] = 0
        if attn.v_proj.bias is not None:
            attn.v_proj.bias[rows] = 0


def test_silent_head_scores_zero_and_lowest(family_name):
    # one KV group per head (MHA), so zeroing one head's value rows silences only that head
    model = tiny_model(family_name, num_key_value_heads=6)
    _zero_v_rows(layers_of(model)[1].self_attn, [4])
    heads = rank(model).heads
    assert heads[1, 4] == 0
    assert heads[1].argmin() == 4
    assert (heads[1, [0, 1, 2, 3, 5]] > 0).all()
    assert (heads[[0, 2, 3]] > 0).all()


def test_silent_kv_group_silences_its_query_heads(family_name):
    model = tiny_model(family_name)  # 6 heads in 2 groups
    _zero_v_rows(layers_of(model)[2].self_attn, [1])
    heads = rank(model).heads
    assert (heads[2, 3:] == 0).all()
    assert (heads[2, :3] > 0).all()


def test_silent_neuron_scores_zero(family_name):
    model = tiny_model(family_name)
    mlp = layers_of(model)[0].mlp
    if Architecture.from_config(model.config).num_experts is not None:
        return _silent_expert_neuron_scores_zero(model)
    with torch.no_grad():
        mlp.up_proj.weight[17] = 0
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias[17] = 0
    neurons = rank(model).neurons
    assert neurons[0, 17] == 0
    assert neurons[0].argmin() == 17
    assert (neurons[0, torch.arange(96) != 17] > 0).all()


def _silent_expert_neuron_scores_zero(model):
    """Expert 2's neuron 17 (its up row zeroed) scores 0 and lowest in that expert only; a shared expert's likewise."""
    mlp = layers_of(model)[0].mlp
    width = mlp.experts.down_proj.shape[-1]
    with torch.no_grad():
        mlp.experts.gate_up_proj[2, width + 17] = 0  # [gate rows; up rows]
        if hasattr(mlp, "shared_expert"):
            mlp.shared_expert.up_proj.weight[17] = 0
    r = rank(model)
    neurons = r.expert_neurons[0]  # [experts, width]
    assert neurons[2, 17] == 0
    assert neurons[2].argmin() == 17
    assert (neurons[2, torch.arange(width) != 17] > 0).all()
    assert (neurons[[0, 1, 3]] > 0).all()
    if hasattr(mlp, "shared_expert"):
        assert r.shared_neurons[0, 17] == 0 and r.shared_neurons[0].argmin() == 17
        assert (r.shared_neurons[0, torch.arange(40) != 17] > 0).all()


def test_block_importance_is_one_minus_mean_cosine(family_name):
    model = tiny_model(family_name)
    blocks = random_blocks(6, 24, seed=1)
    r = rank(model, blocks)
    with torch.no_grad():
        hidden = model(input_ids=blocks, output_hidden_states=True, use_cache=False).hidden_states
    assert len(hidden) == 5
    for i in range(3):  # the last hidden state has the final norm applied
        cos = F.cosine_similarity(hidden[i].double(), hidden[i + 1].double(), dim=-1)
        assert r.block_importance[i].item() == pytest.approx(1 - cos.mean().item(), abs=1e-5)
    assert len(set(r.block_importance.tolist())) == 4


def _captured(model, blocks):
    """Per-sample, per-position activations the scores are made of."""
    seen = {"attn": [], "ffn": [], "norms": []}
    attn, mlp = layers_of(model)[1].self_attn, layers_of(model)[1].mlp
    handles = [
        attn.o_proj.register_forward_pre_hook(lambda m, a: seen["attn"].append(a[0].detach().clone())),
        mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["ffn"].append(a[0].detach().clone())),
    ]
    norms = [n for layer in layers_of(model) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    for k, norm in enumerate(norms):
        handles.append(norm.register_forward_hook(lambda m, a, out, k=k: seen["norms"].append((k, out.detach().clone()))))
    try:
        with torch.no_grad():
            model(input_ids=blocks, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, len(norms)


def _by_hand(values: torch.Tensor, batch: str, seq: str) -> torch.Tensor:
    """[B, S, N] -> [N], written out without the library's helpers."""
    values = values.double()
    B, S, N = values.shape
    per_sample = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            column = values[b, :, n]
            mean = column.sum() / S
            if seq == "mean":
                per_sample[b, n] = mean
            elif seq == "l2":
                per_sample[b, n] = (column**2).sum().sqrt()
            else:
                per_sample[b, n] = ((column - mean) ** 2).sum() / S
    mean = per_sample.sum(0) / B
    if batch == "mean":
        return mean
    if batch == "l2":
        return (per_sample**2).sum(0).sqrt()
    return ((per_sample - mean) ** 2).sum(0) / B


@pytest.fixture(scope="module")
def llama_and_activations():
    model = tiny_model("llama", seed=3)
    blocks = random_blocks(5, 12, seed=2)  # 5 samples in batches of 2: uneven streaming
    seen, n_norms = _captured(model, blocks)
    return model, blocks, seen, n_norms


@pytest.mark.parametrize("batch", REDUCTIONS)
@pytest.mark.parametrize("seq", REDUCTIONS)
def test_head_aggregation_by_hand(llama_and_activations, batch, seq):
    model, blocks, seen, _ = llama_and_activations
    x = seen["attn"][0]  # [B, S, heads * head_dim]
    per_head = torch.stack([x[..., h * HEAD_DIM : (h + 1) * HEAD_DIM].pow(2).sum(-1).sqrt() for h in range(6)], dim=-1)
    want = _by_hand(per_head, batch, seq)
    r = compute_rankings(model, blocks, Aggregation(batch=batch, seq=seq), batch_size=2, progress=False)
    assert torch.allclose(r.heads[1].double(), want, rtol=1e-4, atol=1e-6)
    assert r.meta["aggregation"] == {"batch": batch, "seq": seq}


def test_neuron_and_channel_scores_by_hand(llama_and_activations):
    model, blocks, seen, n_norms = llama_and_activations
    r = compute_rankings(model, blocks, Aggregation(batch="l2", seq="mean"), batch_size=2, progress=False)
    assert torch.allclose(r.neurons[1].double(), _by_hand(seen["ffn"][0].abs(), "l2", "mean"), rtol=1e-4, atol=1e-6)
    assert len(seen["norms"]) == n_norms == 9
    channels = sum(_by_hand(out.abs(), "l2", "mean") for _, out in seen["norms"])
    assert torch.allclose(r.channels.double(), channels, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"batch": "max"}, {"seq": "sum"}, {"batch": "L2"}])
def test_unknown_aggregation(kwargs):
    with pytest.raises(MinitronError, match="unknown .* aggregation") as info:
        Aggregation(**kwargs)
    assert "\n" not in str(info.value)


def test_layer_loss_equals_loss_of_model_without_that_layer(family_name):
    model = tiny_model(family_name)
    heldout = random_blocks(4, 24, seed=9)
    full = lm_loss(model, heldout)
    r = rank(model, heldout=heldout)
    assert r.layer_loss is not None and r.layer_loss.shape == (4,)
    assert r.meta["heldout_samples"] == 4
    teacher = Architecture.from_config(model.config)
    for i in range(4):
        arch = Architecture.from_dict({"layers": [j for j in range(4) if j != i]}, teacher)
        student = prune(model, r, arch)
        assert r.layer_loss[i].item() == pytest.approx(lm_loss(student, heldout), rel=1e-5, abs=1e-5)
    # the skip hooks were removed: the teacher computes exactly what it did before ranking
    assert lm_loss(model, heldout) == full


# --- save / load -----------------------------------------------------------------------------


def _rankings(layer_loss=True) -> Rankings:
    g = torch.Generator().manual_seed(0)
    return Rankings(
        heads=torch.rand(4, 6, generator=g),
        neurons=torch.rand(4, 96, generator=g),
        channels=torch.rand(48, generator=g),
        block_importance=torch.rand(4, generator=g),
        layer_loss=torch.rand(4, generator=g) if layer_loss else None,
        meta={"teacher": "tiny", "teacher_fingerprint": "abc123", "samples": 8},
    )


@pytest.mark.parametrize("layer_loss", [True, False])
def test_save_load_round_trip(tmp_path, layer_loss):
    r = _rankings(layer_loss)
    r.save(tmp_path / "r")
    back = Rankings.load(tmp_path / "r", teacher_fingerprint="abc123")
    for name in ("heads", "neurons", "channels", "block_importance"):
        assert torch.equal(getattr(back, name), getattr(r, name))
    if layer_loss:
        assert torch.equal(back.layer_loss, r.layer_loss)
    else:
        assert back.layer_loss is None
    assert back.meta == r.meta
    assert Rankings.load(tmp_path / "r").meta == r.meta  # no fingerprint: no check


def test_save_refuses_existing_folder_unless_overwrite(tmp_path):
    _rankings().save(tmp_path / "r")
    other = _rankings()
    other.meta = {"teacher_fingerprint": "new"}
    with pytest.raises(MinitronError, match="already exists"):
        other.save(tmp_path / "r")
    assert Rankings.load(tmp_path / "r").meta["teacher_fingerprint"] == "abc123"
    other.save(tmp_path / "r", overwrite=True)
    assert Rankings.load(tmp_path / "r").meta["teacher_fingerprint"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_load_refuses_other_teacher(tmp_path):
    _rankings().save(tmp_path / "r")
    with pytest.raises(MinitronError, match='teacher_fingerprint was "abc123", now "zzz".*rank this teacher first') as info:
        Rankings.load(tmp_path / "r", teacher_fingerprint="zzz")
    assert "\n" not in str(info.value)


def test_load_refuses_missing_folder(tmp_path):
    with pytest.raises(MinitronError, match="no rankings"):
        Rankings.load(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "rankings.json").write_text("{}")
    with pytest.raises(MinitronError, match="no rankings"):
        Rankings.load(tmp_path / "half")


@pytest.mark.parametrize("target, content", [("rankings.json", "{not json"), ("rankings.safetensors", "garbage bytes")])
def test_load_refuses_corrupt_files(tmp_path, target, content):
    _rankings().save(tmp_path / "r")
    (tmp_path / "r" / target).write_text(content)
    with pytest.raises(MinitronError, match="corrupt") as info:
        Rankings.load(tmp_path / "r")
    assert "\n" not in str(info.value)


def test_load_refuses_missing_tensor(tmp_path):
    from safetensors.torch import save_file

    _rankings().save(tmp_path / "r")
    save_file({"heads": torch.rand(4, 6)}, str(tmp_path / "r" / "rankings.safetensors"))
    with pytest.raises(MinitronError, match="lack 'channels'"):
        Rankings.load(tmp_path / "r")


def test_failed_save_leaves_no_folder(tmp_path):
    r = _rankings()
    r.meta = {"unserialisable": object()}  # fails after the tensors were written
    with pytest.raises(TypeError):
        r.save(tmp_path / "r")
    assert list(tmp_path.iterdir()) == []
    json.dumps(_rankings().meta)  # the good meta is fine: the failure above was the object
