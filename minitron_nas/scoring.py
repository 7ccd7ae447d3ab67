"""How good is a (pruned) model: held-out language-modelling loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of `blocks`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="loss", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count
