"""How good is a (pruned) model: held-out language-modelling loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .devices import to_model_device


@torch.no_grad()
def lm_loss(model, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token cross-entropy (nats) over all predicted tokens of `blocks`."""
    total, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc="loss", disable=not progress, unit="batch"):
        batch = to_model_device(batch, model)  # [B, S]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += targets.numel()
    return total / count


def lm_eval_scores(
    model,
    tokenizer,
    tasks: list[str],
    data_dir,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
) -> dict[str, dict[str, float]]:
    """Score an in-memory model with lm-evaluation-harness's own task definitions, offline.

    `tasks` are lm-eval names (see `lm_eval_tasks.SUPPORTED`), fed from the upstream files in
    `data_dir` (converted once into the cache). Returns {task: {metric: value}}, e.g.
    {"arc_easy": {"acc": .., "acc_norm": ..}, "wikitext": {"word_perplexity": .., ...}},
    without stderrs. `limit` scores only the first N documents of each task. Nothing is
    downloaded and nothing is saved: the model is wrapped as is. Global RNG states and the
    model's train/eval mode are restored afterwards.
    """
    import random

    import numpy as np

    from .errors import MinitronError
    from .lm_eval_tasks import clean_results, offline, prepare_tasks, task_manager

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise MinitronError(f"limit must be a positive number of documents, not {limit!r}: give e.g. 100, or None for all")
    if batch_size < 1 or num_fewshot < 0:
        raise MinitronError(f"batch_size {batch_size} / num_fewshot {num_fewshot}: give batch_size >= 1 and num_fewshot >= 0")
    prepared = prepare_tasks(tasks, data_dir)  # names and files checked before lm_eval is imported
    names = [p.name for p in prepared]

    was_training = model.training
    rng_states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        with offline():
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager(prepared),
                bootstrap_iters=0,  # no stderrs: they are dropped anyway and cost time
                log_samples=False,
            )
    finally:
        model.train(was_training)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.random.set_rng_state(rng_states[2])
    return clean_results(output["results"], names)
