"""Group-aware slicing of hybrid models' Mamba-2 mixers (Minitron-SSM, Taghibakhshi et al. 2025).

NemotronH and Bamba share the layout below; their configs name the sizes differently
(families.Hybrid maps them).

A mixer with H heads of P channels, G groups and state size N (I = H*P, conv_dim = I + 2GN):
  in_proj.weight   [I + conv_dim + H, hidden]  rows: z (gate) I | x I | B GN | C GN | dt H
  conv1d.weight    [conv_dim, 1, K], conv1d.bias [conv_dim]  depthwise over x | B | C
  A_log, D, dt_bias [H]
  norm.weight      [I]  gated RMSNorm: RMS over each group's I/G channels
  out_proj.weight  [hidden, I]
Channel c of z, x, the norm and out_proj's input is dim c % P of head c // P; head h reads the B
and C of group h // (H/G), so the heads of a group are contiguous. Heads are pruned inside their
group (every group keeps as many, none moves), head_dim is cut to the same channels in every head;
B, C, the state size and G stay whole. The scan, the depthwise conv and the gate act per channel,
so a kept channel sees exactly what it saw in the teacher. Only the gated norm changes: the
student's RMS runs over the kept channels of a group, the teacher's over all of them. The student
equals the teacher with the dropped channels' gates z zeroed, its norm gain times sqrt(r) and eps
times r, r = kept / all channels of a group (tests/prune/test_mamba.py checks this).
"""

from __future__ import annotations

import torch

from minitron_nas.errors import MinitronError
from minitron_nas.model.families import family_for
from minitron_nas.prune.aggregate import BatchAccumulator, reduce_seq


def mamba_head_scores(out_proj_input: torch.Tensor, n_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitudes of heads and of head_dim channels, to be reduced over sequence and batch.

    A head scores the L2 norm of its P channels, as attention heads do. A head_dim channel is
    kept in every head at once, so it scores the L2 norm over the heads. Any head-major
    [..., H*P] activation works: NVIDIA's ModelOpt scores in_proj's x rows instead.
    """
    y = out_proj_input.float().view(*out_proj_input.shape[:-1], n_heads, head_dim)  # [B, S, H, P]
    return y.norm(dim=-1), y.norm(dim=-2)  # [B, S, H], [B, S, P]


def select_mamba(head_scores: torch.Tensor, dim_scores: torch.Tensor, n_groups: int, keep_heads: int, keep_head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept heads (the best keep_heads/G of every group) and kept head_dim channels, both ascending."""
    n_heads, head_dim = head_scores.numel(), dim_scores.numel()
    if keep_heads % n_groups or not 0 < keep_heads <= n_heads:
        raise MinitronError(
            f"cannot keep {keep_heads} of {n_heads} Mamba heads: each of the {n_groups} groups keeps as many, "
            f"so choose a multiple of {n_groups} up to {n_heads}"
        )
    if not 0 < keep_head_dim <= head_dim:
        raise MinitronError(f"cannot keep {keep_head_dim} of {head_dim} Mamba head channels: choose between 1 and {head_dim}")
    per_group = head_scores.float().view(n_groups, -1)  # [G, H/G]
    best = per_group.topk(keep_heads // n_groups, dim=1, sorted=False).indices  # [G, h/G] positions inside each group
    heads = (best + torch.arange(n_groups)[:, None] * per_group.shape[1]).reshape(-1).sort().values
    dims = dim_scores.float().topk(keep_head_dim, sorted=False).indices.sort().values
    return heads, dims


def slice_mamba_mixer(
    state: dict[str, torch.Tensor], config, kept_heads: torch.Tensor, kept_dims: torch.Tensor, hidden_index: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The student mixer's parameters (fresh tensors), names as in `state` (relative to the mixer).

    Student head j must belong to group j // (h/G): kept heads come ascending, the same number
    from every group, as `select_mamba` returns them. `hidden_index` ([hidden'] kept hidden
    channels) cuts in_proj's input and out_proj's output.
    """
    sizes = family_for(config).hybrid.sizes(config)
    n_heads, head_dim, n_groups = sizes.heads, sizes.head_dim, sizes.groups
    inner, bc = n_heads * head_dim, 2 * n_groups * sizes.state
    kept_heads, kept_dims = kept_heads.long().cpu(), kept_dims.long().cpu()
    kept = len(kept_heads)
    groups = kept_heads // (n_heads // n_groups)  # [h] teacher group of each kept head
    if not kept or kept % n_groups or not torch.equal(groups, torch.arange(kept) // (kept // n_groups)):
        raise MinitronError(
            f"kept Mamba heads {kept_heads.tolist()} are not the same number from each of the {n_groups} groups in ascending order: "
            "choose them with select_mamba"
        )
    channels = (kept_heads[:, None] * head_dim + kept_dims[None, :]).reshape(-1)  # [h*p] of z, x, norm, out_proj input
    conv = torch.cat([channels, inner + torch.arange(bc)])  # [h*p + 2GN] x | B | C
    in_rows = torch.cat([channels, inner + conv, 2 * inner + bc + kept_heads])  # z | x B C | dt
    hidden = torch.arange(config.hidden_size) if hidden_index is None else hidden_index
    plan = {  # name -> kept indices along each leading dimension
        "in_proj.weight": (in_rows, hidden),
        "in_proj.bias": (in_rows,),
        "conv1d.weight": (conv,),
        "conv1d.bias": (conv,),
        "A_log": (kept_heads,),
        "D": (kept_heads,),
        "dt_bias": (kept_heads,),
        "norm.weight": (channels,),
        "out_proj.weight": (hidden, channels),
        "out_proj.bias": (hidden,),
    }
    sliced = {}
    for name, tensor in state.items():
        if name not in plan:
            raise MinitronError(f"unknown Mamba mixer parameter '{name}': pass the mixer's own parameters, named relative to the mixer")
        for dim, index in enumerate(plan[name]):
            tensor = tensor.index_select(dim, index.to(tensor.device))
        sliced[name] = tensor
    return sliced


class MambaScores:
    """Forward pre-hooks on the Mamba mixers' out_proj: head and head_dim scores per layer.

    out_proj's input is the gated, normalised mixer output [B, S, H*P], head-major, what the
    attention heads' score is taken from too. Layers that are not Mamba score zeros.
    """

    def __init__(self, mixers: list, n_heads: int, head_dim: int, aggregation):
        self.mixers, self.n_heads, self.head_dim, self.seq = mixers, n_heads, head_dim, aggregation.seq
        self.heads = [BatchAccumulator(aggregation.batch) for _ in mixers]
        self.dims = [BatchAccumulator(aggregation.batch) for _ in mixers]

    def register(self) -> list:
        return [m.out_proj.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.mixers) if m is not None]

    def _hook(self, index: int):
        def hook(module, args):
            heads, dims = mamba_head_scores(args[0], self.n_heads, self.head_dim)  # [B, S, H], [B, S, P]
            self.heads[index].add(reduce_seq(heads, self.seq))
            self.dims[index].add(reduce_seq(dims, self.seq))

        return hook

    def result(self) -> dict[str, torch.Tensor]:
        """mamba_heads [layers, H] and mamba_dims [layers, P]."""
        zeros = torch.zeros
        return {
            "mamba_heads": torch.stack([a.result() if a.n else zeros(self.n_heads) for a in self.heads]),
            "mamba_dims": torch.stack([a.result() if a.n else zeros(self.head_dim) for a in self.dims]),
        }
