"""How activations become one importance score: reduce over the sequence, then over the batch.

Shared by the dense scores (ranking.py) and the mixture-of-experts scores (experts.py).
"""

from __future__ import annotations

import torch


def reduce_seq(values: torch.Tensor, how: str) -> torch.Tensor:
    """[B, S, N] -> [B, N]."""
    values = values.float()
    if how == "mean":
        return values.mean(dim=1)
    if how == "l2":
        return values.norm(dim=1)
    return values.var(dim=1, unbiased=False)


class BatchAccumulator:
    """Streams [B, N] rows into one [N] score: mean, L2 norm or variance over all rows.

    Sums are float64 on the rows' own device: whatever the model's dtype (bf16 included),
    scores accumulate in full precision, and a GPU pass never waits on a host copy per hook.
    """

    def __init__(self, how: str):
        self.how, self.n, self.s1, self.s2 = how, 0, None, None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.detach().double()  # [B, N]
        s1, s2 = rows.sum(0), rows.pow(2).sum(0)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += rows.shape[0]

    def result(self) -> torch.Tensor:
        """[N] float32 on the CPU."""
        if self.how == "mean":
            value = self.s1 / self.n
        elif self.how == "l2":
            value = self.s2.sqrt()
        else:
            mean = self.s1 / self.n
            value = (self.s2 / self.n - mean**2).clamp_min(0)
        return value.float().cpu()
