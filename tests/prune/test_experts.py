"""Mixture-of-experts scores and pruning, against a brute force that routes every token by hand.

The oracles are written here without the library: per token, the router's logits, a softmax,
the top-k, the renormalisation of the chosen weights where the family does it, and each
expert's gated MLP from its fused [gate; up] rows. The tiny models' routers (std 0.02) are
nearly uniform, so they are scaled up here and every token's choice is decisive; each oracle
asserts that no token sits on a tie (the k-th and (k+1)-th logits differ by more than 1e-5).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import MOE_FAMILY_NAMES, TINY_CONFIGS, expert_width, random_blocks, random_rankings, tiny_model

from minitron_nas.config.settings import Aggregation
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.families import family_for, layers_of
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import compute_rankings

ROUTER_SCALE = 10.0
# Whether the top-k router weights are renormalised to sum to 1: Mixtral always, the others by
# norm_topk_prob (the tiny configs in helpers.py set it so).
RENORMALISES = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True, "olmoe": False}
TOP_K = 2
TIE = 1e-5


def moe_model(name: str, seed: int = 0, **overrides):
    model = tiny_model(name, seed=seed, **overrides)
    with torch.no_grad():
        for layer in layers_of(model):
            layer.mlp.gate.weight.mul_(ROUTER_SCALE)
    return model


def test_the_tiny_configs_route_as_the_oracle_assumes():
    for name in MOE_FAMILY_NAMES:
        config = TINY_CONFIGS[name]()
        assert config.num_experts_per_tok == TOP_K
        assert getattr(config, "norm_topk_prob", True) == RENORMALISES[name], name


# --------------------------------------------------------------------------- the brute force


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x / (1 + torch.exp(-x))


def route(router: torch.Tensor, x: torch.Tensor, renormalise: bool, top_k: int = TOP_K) -> tuple[list[int], list[float]]:
    """One token: (chosen experts, their weights) from router rows [E, hidden] and x [hidden], float64."""
    logits = [float(router[e] @ x) for e in range(router.shape[0])]
    top = max(logits)
    exps = [math.exp(z - top) for z in logits]
    probs = [v / sum(exps) for v in exps]
    order = sorted(range(len(probs)), key=lambda e: -probs[e])
    chosen = order[:top_k]
    if top_k < len(order):
        assert logits[order[top_k - 1]] - logits[order[top_k]] > TIE, "a tie in the router: change the seed"
    weights = [probs[e] for e in chosen]
    if renormalise:
        weights = [w / sum(weights) for w in weights]
    return chosen, weights


def expert_inner(gate_up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of one expert from its fused rows [2 x width, hidden]: gate rows first."""
    width = gate_up.shape[0] // 2
    return _silu(gate_up[:width] @ x) * (gate_up[width:] @ x)


def _reduce(values: torch.Tensor, batch: str, seq: str) -> torch.Tensor:
    """[B, S, N] -> [N]: over the sequence, then over the batch, written out."""
    B, S, N = values.shape
    per_sample = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        column = values[b]  # [S, N]
        mean = column.sum(0) / S
        per_sample[b] = {"mean": mean, "l2": (column**2).sum(0).sqrt(), "var": ((column - mean) ** 2).sum(0) / S}[seq]
    mean = per_sample.sum(0) / B
    return {"mean": mean, "l2": (per_sample**2).sum(0).sqrt(), "var": ((per_sample - mean) ** 2).sum(0) / B}[batch]


def block_inputs(model, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's MoE block input [B, S, hidden] on `blocks` (float64)."""
    seen = []
    handles = [layer.mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].double())) for layer in layers_of(model)]
    try:
        with torch.no_grad():
            model(input_ids=blocks, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@torch.no_grad()
def brute_force_scores(model, name: str, blocks: torch.Tensor, batch: str, seq: str) -> dict[str, torch.Tensor]:
    """REAP, activation, expert-neuron and shared-neuron scores, token by token."""
    reap, activation, neurons, shared = [], [], [], []
    for layer, x in zip(layers_of(model), block_inputs(model, blocks)):
        mlp = layer.mlp
        router = mlp.gate.weight.double()
        gate_up, down = mlp.experts.gate_up_proj.double(), mlp.experts.down_proj.double()
        n_experts, width = gate_up.shape[0], down.shape[-1]
        B, S, _ = x.shape
        magnitude = torch.zeros(B, S, n_experts, dtype=torch.float64)
        inner = torch.zeros(n_experts, B, S, width, dtype=torch.float64)
        total, count = [0.0] * n_experts, [0] * n_experts
        for b in range(B):
            for s in range(S):
                chosen, weights = route(router, x[b, s], RENORMALISES[name])
                for e, w in zip(chosen, weights):
                    h = expert_inner(gate_up[e], x[b, s])
                    value = w * float((down[e] @ h).norm())
                    magnitude[b, s, e] = value
                    inner[e, b, s] = h.abs()
                    total[e] += value
                    count[e] += 1
        assert all(count), "every expert is chosen by some token"
        reap.append(torch.tensor([t / c for t, c in zip(total, count)], dtype=torch.float64))
        activation.append(_reduce(magnitude, batch, seq))
        neurons.append(torch.stack([_reduce(inner[e], batch, seq) for e in range(n_experts)]))
        if hasattr(mlp, "shared_expert"):
            sx = mlp.shared_expert
            g, u = sx.gate_proj.weight.double(), sx.up_proj.weight.double()
            shared.append(_reduce((_silu(x @ g.T) * (x @ u.T)).abs(), batch, seq))
    scores = {"experts": torch.stack(reap), "expert_activation": torch.stack(activation), "expert_neurons": torch.stack(neurons)}
    if shared:
        scores["shared_neurons"] = torch.stack(shared)
    return scores


# --------------------------------------------------------------------------- scores


@pytest.mark.parametrize("batch, seq", [("l2", "mean"), ("mean", "l2"), ("var", "mean")])
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_expert_scores_equal_brute_force(name, batch, seq):
    """Mixtral renormalises its top-2 weights, Qwen2-MoE does not and has a shared expert."""
    model = moe_model(name, seed=3)
    blocks = random_blocks(5, 12, seed=2)  # 5 samples in batches of 2: uneven streaming
    r = compute_rankings(model, blocks, Aggregation(batch=batch, seq=seq), batch_size=2, progress=False)
    want = brute_force_scores(model, name, blocks, batch, seq)
    assert r.neurons is None
    assert (r.shared_neurons is None) == (name != "qwen2_moe")
    for key, expected in want.items():
        got = getattr(r, key).double()
        assert got.shape == expected.shape, key
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6), (key, (got - expected).abs().max())
    # REAP and activation disagree on which experts matter somewhere: they are different scores
    assert not torch.equal(r.experts.argsort(dim=1), r.expert_activation.argsort(dim=1))


# --------------------------------------------------------------------------- pruning


@torch.no_grad()
def pruned_block_reference(
    teacher_mlp, x: torch.Tensor, experts: list[int], neurons: list[list[int]], shared: list[int] | None, renormalise: bool
) -> torch.Tensor:
    """The teacher's block restricted to kept experts and neurons, token by token: the router's
    softmax is over the kept experts only. x [T, hidden] -> [T, hidden], float64."""
    router = teacher_mlp.gate.weight.double()[experts]
    gate_up, down = teacher_mlp.experts.gate_up_proj.double(), teacher_mlp.experts.down_proj.double()
    width = down.shape[-1]
    top_k = min(TOP_K, len(experts))
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        chosen, weights = route(router, x[t], renormalise, top_k)
        for slot, w in zip(chosen, weights):
            e, kept = experts[slot], neurons[slot]
            rows = gate_up[e][kept + [width + n for n in kept]]
            out[t] += w * (down[e][:, kept] @ expert_inner(rows, x[t]))
        if shared is not None:
            sx = teacher_mlp.shared_expert
            g, u, d = sx.gate_proj.weight.double()[shared], sx.up_proj.weight.double()[shared], sx.down_proj.weight.double()[:, shared]
            gate = torch.sigmoid(teacher_mlp.shared_expert_gate.weight.double() @ x[t])
            out[t] += gate * (d @ (_silu(g @ x[t]) * (u @ x[t])))
    return out


def _best(scores: torch.Tensor, k: int) -> list[int]:
    """The k highest scores' indices, ascending (python sorting, not the library's)."""
    return sorted(sorted(range(len(scores)), key=lambda i: -float(scores[i]))[:k])


@pytest.mark.parametrize("name", MOE_FAMILY_NAMES)
def test_pruned_moe_block_equals_the_teacher_restricted_to_kept_experts_and_neurons(name):
    model = moe_model(name)
    teacher = Architecture.from_config(model.config)
    rankings = random_rankings(teacher, seed=4)
    width = expert_width(teacher) * 5 // 8  # 20 of 32, 60 of 96
    sizes = {"num_experts": 3, family_for(model.config).moe.width_key: width}
    if teacher.shared_expert_intermediate_size is not None:
        sizes["shared_expert_intermediate_size"] = 24
    student = prune(model, rankings, Architecture.from_dict(sizes, teacher))
    assert student.config.num_experts_per_tok == TOP_K
    x = torch.randn(2, 16, 48, generator=torch.Generator().manual_seed(5))
    for layer in range(4):
        experts = _best(rankings.experts[layer], 3)
        neurons = [_best(rankings.expert_neurons[layer, e], width) for e in experts]
        shared = _best(rankings.shared_neurons[layer], 24) if "shared_expert_intermediate_size" in sizes else None
        with torch.no_grad():
            got = layers_of(student)[layer].mlp(x).double().view(-1, 48)
            full = layers_of(model)[layer].mlp(x).double().view(-1, 48)
        want = pruned_block_reference(layers_of(model)[layer].mlp, x.double().view(-1, 48), experts, neurons, shared, RENORMALISES[name])
        assert (got - want).abs().max() <= 1e-5, (layer, (got - want).abs().max())
        assert (got - full).abs().max() > 1e-3  # experts and neurons really were dropped


# --------------------------------------------------------------------------- an expert never routed to

C0 = 0  # the residual channel held at a constant 1 in every layer


def with_dead_experts(name: str, dead: list[int]):
    """A tiny model in which expert `dead[l]` of layer l can never be chosen, by construction.

    Channel C0 of the embedding is 1 for every token, and neither attention (o_proj row C0)
    nor an expert (down_proj row C0, the shared expert's too) writes to it: the residual stream
    holds exactly 1 there in every layer. The router input is RMSNorm's g * h / rms(h), with
    gain g[C0] = 1, so its C0 entry is 1 / rms(h) > 0 for every token. The router's column C0
    is 0 except -1e4 in the dead expert's row: its logit is below the others' by
    1e4 / rms(h) minus what the remaining 47 channels can add, about 1e4 x 7 against O(1),
    so it is never in the top 2, and its softmax probability underflows to exactly 0.
    """
    model = tiny_model(name)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, C0] = 1.0
        for layer, expert in zip(layers_of(model), dead):
            layer.self_attn.o_proj.weight[C0] = 0
            layer.mlp.experts.down_proj[:, C0] = 0
            if hasattr(layer.mlp, "shared_expert"):
                layer.mlp.shared_expert.down_proj.weight[C0] = 0
            layer.post_attention_layernorm.weight[C0] = 1.0
            layer.mlp.gate.weight[:, C0] = 0
            layer.mlp.gate.weight[expert, C0] = -1e4
    return model


@pytest.mark.parametrize("name", MOE_FAMILY_NAMES)
def test_an_expert_never_routed_to_scores_zero_is_dropped_first_and_is_not_missed(name):
    dead = [2, 0, 3, 1]
    model = with_dead_experts(name, dead)
    blocks = random_blocks(6, 24, seed=1)
    with torch.no_grad():
        hidden = model(input_ids=blocks, use_cache=False, output_hidden_states=True).hidden_states
    assert all(torch.equal(h[..., C0], torch.ones_like(h[..., C0])) for h in hidden[:-1])  # the constant channel holds
    r = compute_rankings(model, blocks, batch_size=4, progress=False)
    teacher = Architecture.from_config(model.config)
    for layer, expert in enumerate(dead):
        alive = [e for e in range(4) if e != expert]
        assert r.experts[layer, expert] == 0 and r.expert_activation[layer, expert] == 0
        assert (r.expert_neurons[layer, expert] == 0).all()
        assert (r.experts[layer, alive] > 0).all() and (r.expert_activation[layer, alive] > 0).all()
    arch = Architecture.from_dict({"num_experts": 3}, teacher)
    for criterion in ("reap", "activation"):
        chosen = select(r, arch, teacher, expert_criterion=criterion, config=model.config)
        assert [c.tolist() for c in chosen.experts] == [[e for e in range(4) if e != d] for d in dead], criterion
    student = prune(model, r, arch)
    ids = random_blocks(2, 32, seed=6)
    with torch.no_grad():
        diff = (student(input_ids=ids, use_cache=False).logits - model(input_ids=ids, use_cache=False).logits).abs().max()
    # Renormalising families (Mixtral, Qwen3-MoE) lose nothing by dropping a never-chosen expert;
    # the others' weights are probabilities over all experts, unchanged here only because the dead
    # expert's probability is exactly 0 (one with a small non-zero probability would rescale them).
    assert diff <= 1e-5, diff


# --------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("name", MOE_FAMILY_NAMES)
def test_fewer_experts_than_the_top_k_route_every_token_to_all_of_them(name):
    model = moe_model(name)
    teacher = Architecture.from_config(model.config)
    rankings = random_rankings(teacher, seed=2)
    student = prune(model, rankings, Architecture.from_dict({"num_experts": 1}, teacher))
    assert student.config.num_experts_per_tok == 1 == getattr(student.config, family_for(model.config).moe.experts_key)
    assert all(layer.mlp.gate.top_k == 1 and layer.mlp.gate.weight.shape == (1, 48) for layer in layers_of(student))
    ids = random_blocks(2, 24, seed=3)
    with torch.no_grad():
        logits = student(input_ids=ids, use_cache=False).logits
        assert logits.shape == (2, 24, 128) and torch.isfinite(logits).all()
        generated = student.generate(ids[:, :8], max_new_tokens=3, do_sample=False)
    assert generated.shape == (2, 11)
    # one expert left: the softmax over it is 1, so the block is that expert (plus the shared one)
    x = torch.randn(1, 8, 48, generator=torch.Generator().manual_seed(7)).double()
    for layer in range(4):
        kept = _best(rankings.experts[layer], 1)
        shared = list(range(40)) if teacher.shared_expert_intermediate_size is not None else None
        t_mlp = layers_of(model)[layer].mlp
        want = pruned_block_reference(t_mlp, x.view(-1, 48), kept, [list(range(expert_width(teacher)))], shared, RENORMALISES[name])
        with torch.no_grad():
            got = layers_of(student)[layer].mlp(x.float()).double().view(-1, 48)
        assert (got - want).abs().max() <= 1e-5
    # three experts still route each token to two
    assert prune(model, rankings, Architecture.from_dict({"num_experts": 3}, teacher)).config.num_experts_per_tok == TOP_K
