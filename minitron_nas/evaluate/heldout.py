"""Held-out language-modelling loss: the one loop that scores a model block by block.

Every held-out measure of the package (the LM loss of a pruned model, the layer-drop
ranking, the search's held-out metrics) runs the model over [N, S] blocks of token ids in
batches, in eval mode, and keeps one value per block; the next-token cross-entropy itself
is `distill.losses.next_token_losses`, the formula training uses.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from minitron_nas.distill.losses import next_token_losses
from minitron_nas.model.devices import to_model_device

__all__ = ["block_lm_losses", "lm_loss", "score_blocks"]

BlockScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, ids, rows) -> [B]


@torch.no_grad()
def score_blocks(model, blocks: torch.Tensor, batch_size: int, score: BlockScore, progress: bool = False) -> list[float]:
    """One value per block: `score(logits [B, S, V], ids [B, S], rows [B])` on each batch, in eval mode."""
    was_training = model.training
    model.eval()
    values: list[float] = []
    try:
        for rows in tqdm(torch.arange(len(blocks)).split(batch_size), desc="held-out", disable=not progress, unit="batch"):
            ids = to_model_device(blocks[rows], model)  # [B, S]
            logits = model(input_ids=ids, use_cache=False).logits
            values.extend(score(logits, ids, rows).tolist())
    finally:
        model.train(was_training)
    return values


def block_lm_losses(logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """[B] mean next-token cross-entropy (nats) of each block."""
    return next_token_losses(logits, ids).mean(dim=1)


def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of `blocks`.

    Blocks are of equal length, so the mean of the per-block means is the token mean."""
    values = score_blocks(model, blocks, batch_size, block_lm_losses, progress)
    return sum(values) / len(values)
