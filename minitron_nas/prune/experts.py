"""Mixture-of-experts importance: which experts, and which neurons inside each, matter.

transformers' fused expert modules return only the routed, weighted sum, so one forward hook
per sparse MoE block recomputes from the block's input the router's choice and every routed
expert's output, and scores:
- experts by REAP saliency (router-weighted expert activation pruning, Lasby et al. 2025):
  the mean, over the tokens routed to an expert, of router weight x ||expert output||;
- experts by the Minitron activation score: the same per-token magnitude, zero where the
  expert was not chosen, reduced over the sequence and then the batch as neurons are, so an
  expert that is seldom chosen scores low whatever it does when chosen;
- each expert's neurons: |act(gate) * up| on its routed tokens (zero elsewhere), reduced as
  the dense MLP's neurons are;
- the shared expert's neurons (Qwen2-MoE), as a dense MLP's.
The recomputation costs about one more pass through the experts; calibration is single-shot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minitron_nas.config.settings import Aggregation
from minitron_nas.prune.aggregate import BatchAccumulator, reduce_seq

EXPERT_CRITERIA = ("reap", "activation")

__all__ = ["EXPERT_CRITERIA", "ExpertScores"]


class ExpertScores:
    """Forward hooks on every layer's sparse MoE block and the scores they gather."""

    def __init__(self, blocks: list, aggregation: Aggregation):
        self.blocks, self.aggregation = blocks, aggregation
        n_experts = blocks[0].experts.gate_up_proj.shape[0]
        self.reap_sum = [torch.zeros(n_experts, dtype=torch.float64) for _ in blocks]
        self.reap_count = [torch.zeros(n_experts, dtype=torch.float64) for _ in blocks]
        self.activation = [BatchAccumulator(aggregation.batch) for _ in blocks]
        self.neurons = [[BatchAccumulator(aggregation.batch) for _ in range(n_experts)] for _ in blocks]
        self.shared = [BatchAccumulator(aggregation.batch) for _ in blocks]

    def register(self) -> list:
        """The hook handles (remove them when the pass is over)."""
        return [block.register_forward_hook(self._hook(i)) for i, block in enumerate(self.blocks)]

    def _hook(self, index: int):
        seq = self.aggregation.seq

        def hook(module, args, output):
            x = args[0]  # [B, S, hidden]
            batch, length, hidden = x.shape
            flat = x.reshape(-1, hidden)  # [T, hidden]
            _, weights, chosen = module.gate(flat)  # [T, top-k] router weights and expert indices
            experts = module.experts
            magnitude = torch.zeros(flat.shape[0], experts.gate_up_proj.shape[0], device=x.device)  # [T, experts]
            for e in range(experts.gate_up_proj.shape[0]):
                token, slot = torch.where(chosen == e)  # [n] each
                gate, up = F.linear(flat[token], experts.gate_up_proj[e]).chunk(2, dim=-1)
                inner = experts.act_fn(gate) * up  # [n, width]
                out = F.linear(inner, experts.down_proj[e])  # [n, hidden]
                value = weights[token, slot].float() * out.float().norm(dim=-1)  # [n]
                magnitude[token, e] = value
                per_token = torch.zeros(flat.shape[0], inner.shape[-1], device=x.device)  # [T, width]
                per_token[token] = inner.abs().float()
                self.neurons[index][e].add(reduce_seq(per_token.view(batch, length, -1), seq))
            self.reap_sum[index] += magnitude.double().sum(0).cpu()  # [experts]
            self.reap_count[index] += torch.bincount(chosen.flatten(), minlength=magnitude.shape[1]).double().cpu()
            self.activation[index].add(reduce_seq(magnitude.view(batch, length, -1), seq))
            shared = getattr(module, "shared_expert", None)
            if shared is not None:
                inner = shared.act_fn(shared.gate_proj(flat)) * shared.up_proj(flat)  # [T, shared width]
                self.shared[index].add(reduce_seq(inner.abs().view(batch, length, -1), seq))

        return hook

    def result(self) -> dict[str, torch.Tensor]:
        """experts and expert_activation [layers, experts], expert_neurons [layers, experts, width],
        shared_neurons [layers, shared width] (MoE blocks with a shared expert only)."""
        scores = {
            # an expert never routed to has saliency 0: nothing is lost without it
            "experts": torch.stack([s / c.clamp_min(1) for s, c in zip(self.reap_sum, self.reap_count)]).float(),
            "expert_activation": torch.stack([a.result() for a in self.activation]),
            "expert_neurons": torch.stack([torch.stack([a.result() for a in layer]) for layer in self.neurons]),
        }
        if getattr(self.blocks[0], "shared_expert", None) is not None:
            scores["shared_neurons"] = torch.stack([a.result() for a in self.shared])
        return scores
