"""Synchronous successive halving by retraining tokens: the rung schedule and who goes on.

Rung 0 retrains every candidate on r tokens; the best 1/eta, compared at equal tokens once
the whole rung is done, go on to eta x r, and so on until the last rung reaches the full
lightweight-retraining budget (`retrain.tokens`). Unlike Optuna's asynchronous pruner, a
candidate is never judged against whichever trials happened to finish before it: the
survivors of a rung depend only on the rung's values, not on trial order or workers.

A promoted candidate restarts from the teacher's slice (pruning costs well under a second)
and retrains on the rung's tokens with a full warmup + cosine schedule, rather than
continuing from a saved state. Why, by total cost:
- time: with geometric rungs every rung costs n * r tokens; continuing would save the
  r_i / eta tokens a survivor already trained, i.e. restarting costs at most
  eta / (eta - 1) of continuing on the upper rungs (1.5x at eta = 3; the schedule is
  derived from the budget, so this is paid in a smaller r, not in a larger bill);
- disk: continuing needs each survivor's weights and AdamW state (12 bytes per parameter
  in float32: 0.8 GB for a 67M student, 48 GB for a 4B one) kept until the next rung, on a
  filesystem every worker can read;
- soundness: each rung's values are what a user gets from retraining that architecture on
  that many tokens with the trainer's own schedule, and a killed or retried trial simply
  runs again: no partial state to validate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MinitronError

__all__ = ["TAU_MIN_N", "Rung", "Schedule", "plan_schedule", "promote", "rung_tau"]

TAU_MIN_N = 5  # Kendall tau over fewer pairs than this says nothing; it is not reported


@dataclass(frozen=True)
class Rung:
    index: int
    candidates: int  # retrained at this rung
    steps: int  # optimizer steps of each candidate's retraining
    tokens: int  # steps * tokens per step


@dataclass(frozen=True)
class Schedule:
    rungs: tuple[Rung, ...]
    eta: int
    budget_tokens: int | None  # what the schedule had to fit in; None: no limit

    @property
    def total_tokens(self) -> int:
        """Training tokens of the whole search if every candidate of every rung runs."""
        return sum(r.candidates * r.tokens for r in self.rungs)

    def describe(self) -> str:
        parts = ", ".join(f"{r.candidates} x {r.tokens:,}" for r in self.rungs)
        return f"{len(self.rungs)} rung(s), eta={self.eta}: {parts} tokens = {self.total_tokens:,}"


def _rungs(n: int, eta: int, levels: int, full_steps: int, tokens_per_step: int, min_steps: int) -> tuple[Rung, ...]:
    rungs = []
    for i in range(levels + 1):
        steps = max(min_steps, round(full_steps / eta ** (levels - i)))
        rungs.append(Rung(i, math.ceil(n / eta**i), steps, steps * tokens_per_step))
    return tuple(rungs)


def _max_levels(n: int, eta: int, full_steps: int, min_steps: int, final_candidates: int) -> int:
    """Most halvings that keep >= final_candidates at the last rung, with rungs of distinct lengths."""

    def steps(levels_down: int) -> int:
        return max(min_steps, round(full_steps / eta**levels_down))

    levels = 0
    while math.ceil(n / eta ** (levels + 1)) >= max(1, final_candidates) and steps(levels + 1) < steps(levels):
        levels += 1
    return levels


def plan_schedule(
    n: int,
    full_steps: int,
    tokens_per_step: int,
    eta: int = 3,
    budget_tokens: int | None = None,
    min_steps: int = 1,
    final_candidates: int = 2,
) -> Schedule:
    """The rungs for `n` candidates whose last rung retrains on `full_steps` steps.

    Without a budget, as many halvings as keep `final_candidates` at the last rung and
    `min_steps` at rung 0. With one, the fewest halvings whose total fits the budget (the
    fewest candidates cut on cheap evidence);
    when even the most halvings do not fit, the last rung's steps shrink until they do.
    The total never exceeds the budget.
    """
    if n < 1 or full_steps < 1 or tokens_per_step < 1:
        raise MinitronError(f"a search needs candidates and steps, got {n} candidates and {full_steps} steps: widen the space")
    if eta < 2:
        raise MinitronError(f"halving.eta is {eta}: use 2 or more (each rung keeps 1/eta of the candidates)")
    if budget_tokens is None:
        levels = _max_levels(n, eta, full_steps, min_steps, final_candidates)
        return Schedule(_rungs(n, eta, levels, full_steps, tokens_per_step, min_steps), eta, None)
    for steps in range(full_steps, min_steps - 1, -1):
        top = _max_levels(n, eta, steps, min_steps, final_candidates)
        for levels in range(top + 1):
            schedule = Schedule(_rungs(n, eta, levels, steps, tokens_per_step, min_steps), eta, budget_tokens)
            if schedule.total_tokens <= budget_tokens:
                return schedule
    cheapest = Schedule(_rungs(n, eta, _max_levels(n, eta, min_steps, min_steps, final_candidates), min_steps, tokens_per_step, min_steps), eta, None)
    raise MinitronError(
        f"a search budget of {budget_tokens:,} tokens cannot retrain {n} candidates: the cheapest schedule "
        f"({cheapest.describe()}) needs {cheapest.total_tokens:,}; raise halving.budget_tokens or "
        "halving.budget_fraction, or narrow the space"
    )


def promote(values: dict[str, float], keep: int, maximize: bool) -> list[str]:
    """The `keep` best keys by value (ties broken by key, so the result is order-free)."""
    ranked = sorted(values, key=lambda key: (-values[key] if maximize else values[key], key))
    return ranked[:keep]


def rung_tau(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, int]:
    """(Kendall tau, n) between two rungs over the candidates in both; tau None when n < TAU_MIN_N."""
    shared = sorted(set(before) & set(after))
    if len(shared) < TAU_MIN_N:
        return None, len(shared)
    from scipy.stats import kendalltau  # scipy is slow to import: only when a tau is asked for

    tau = kendalltau([before[k] for k in shared], [after[k] for k in shared]).statistic
    return (None if math.isnan(tau) else float(tau)), len(shared)
