"""What a candidate is judged on: small metrics behind one interface, each value with its error.

A `Metric` has a name, a direction and `measure(model) -> Measurement`. Held-out metrics
keep one value per held-out block (`per_item`), so two candidates measured on the same
blocks are compared by the standard error of their *paired* difference, which is far
smaller than either error alone. lm-eval metrics carry lm-eval's own standard errors.

- `HeldoutKLD`: KL(teacher || student) per token on held-out blocks, against the teacher's
  cached top-k log-probabilities plus one tail bucket (what the retraining optimises;
  a lower bound of the full-vocabulary KL, exact at k = vocabulary), or against the live
  teacher's full distribution (`signals.LiveFull`, the distillation summary).
- `HeldoutLoss`: next-token cross-entropy (nats) on the same blocks.
- `LmEval`: the space's lm-eval objective (tasks, metric, weights) with its standard error.
"""

from __future__ import annotations

import functools
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from minitron_nas.distill.signals import CachedTopK, TeacherSignal
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.harness import lm_eval_scores
from minitron_nas.evaluate.heldout import block_lm_losses, score_blocks
from minitron_nas.evaluate.objective import lm_eval_higher_is_better, lm_eval_objective

__all__ = [
    "HeldoutKLD",
    "HeldoutLoss",
    "LmEval",
    "Measurement",
    "Metric",
    "mean_and_stderr",
    "one_se_t",
    "paired_stderr",
    "tied",
]


@dataclass
class Measurement:
    """One metric on one model: value, its standard error, what it cost."""

    value: float
    stderr: float | None
    seconds: float
    per_item: list[float] | None = None  # per held-out block, for paired comparisons
    details: dict = field(default_factory=dict)


def mean_and_stderr(values: list[float]) -> tuple[float, float | None]:
    """Mean and the standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def paired_stderr(a: Measurement, b: Measurement) -> float | None:
    """Standard error of a.value - b.value: paired over shared items when both have them."""
    if a.per_item is not None and b.per_item is not None and len(a.per_item) == len(b.per_item) > 1:
        return mean_and_stderr([x - y for x, y in zip(a.per_item, b.per_item)])[1]
    if a.stderr is None or b.stderr is None:
        return None
    return math.hypot(a.stderr, b.stderr)


def tied(a: Measurement, b: Measurement, extra_variance: float = 0.0, extra_dof: int | None = None) -> bool:
    """Within one standard error of the difference: neither is better on this evidence.

    `extra_variance` adds noise the blocks do not show (the data order of a retraining),
    estimated from `extra_dof` degrees of freedom. A variance from a few draws can be small by
    luck, so the error is then widened to Student's t quantile of one standard error's coverage
    (68% two-sided) at those degrees of freedom, the fewer of the two terms' (conservative:
    x1.84 for 1, x1.32 for 2, x1.20 for 3).
    """
    se = paired_stderr(a, b)
    if se is None:
        return False
    width = math.sqrt(se**2 + extra_variance)
    return abs(a.value - b.value) <= width * (one_se_t(extra_dof) if extra_dof else 1.0)


@functools.cache
def one_se_t(dof: int) -> float:
    """Student's t quantile with the coverage of one standard error under the normal (84.1% one-sided)."""
    from scipy.stats import norm, t  # scipy is slow to import: only when a few-draw error is judged

    return float(t.ppf(norm.cdf(1.0), dof))


class Metric(ABC):
    """A score of a model; `maximize` says which way is better."""

    name: str
    maximize: bool = False

    @abstractmethod
    def measure(self, model) -> Measurement: ...


class _PerBlock(Metric):
    """A metric averaged per held-out block of [N, S] token ids, N >= 2 for an error."""

    def __init__(self, blocks: torch.Tensor, batch_size: int = 8):
        self.blocks = blocks  # [N, S]
        self.batch_size = batch_size

    @abstractmethod
    def _per_block(self, logits: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[B] values for the [B, S, V] logits of the [B, S] ids at block `rows`."""

    def measure(self, model) -> Measurement:
        start = time.perf_counter()
        values = score_blocks(model, self.blocks, self.batch_size, self._per_block)
        mean, se = mean_and_stderr(values)
        return Measurement(mean, se, time.perf_counter() - start, values)


class HeldoutLoss(_PerBlock):
    name = "heldout_loss"

    def _per_block(self, logits, ids, rows):
        return block_lm_losses(logits, ids)


class HeldoutKLD(_PerBlock):
    """Per-token KL to the teacher on these blocks: against its cached top-k (+ tail) of exactly
    these blocks (a `TeacherLogitCache`), or any teacher signal (`LiveFull`: the full vocabulary)."""

    name = "kld"

    def __init__(self, blocks: torch.Tensor, teacher: TeacherLogitCache | TeacherSignal, batch_size: int = 8, temperature: float | None = None):
        super().__init__(blocks, batch_size)
        if isinstance(teacher, TeacherLogitCache):
            if not teacher.matches(blocks):
                raise MinitronError("the teacher cache was not made for these held-out blocks: build it from exactly those blocks")
            temperature = teacher.temperature if temperature is None else temperature
            teacher = CachedTopK(teacher)
        self.signal, self.temperature = teacher, 1.0 if temperature is None else temperature

    def _per_block(self, logits, ids, rows):
        return self.signal.per_token(logits, ids, rows, self.temperature).mean(dim=1)  # [B, S] -> [B]


class LmEval(Metric):
    """The space's lm-eval objective (tasks, metric, weights), scored on the in-memory model.

    Its direction is lm-eval's `higher_is_better` of the objective's metrics.
    """

    name = "lm_eval"

    def __init__(self, scoring, tokenizer):
        self.scoring = scoring
        self.tokenizer = tokenizer
        self.maximize = lm_eval_higher_is_better(scoring)

    def measure(self, model) -> Measurement:
        start = time.perf_counter()
        results = lm_eval_scores(model, self.tokenizer, self.scoring)
        value, stderr, self.maximize = lm_eval_objective(results, self.scoring)
        return Measurement(value, stderr, time.perf_counter() - start, None, results)
