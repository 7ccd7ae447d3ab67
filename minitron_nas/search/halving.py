"""Synchronous successive halving: the rung schedule, who goes on, and who wins a tie.

Rung 0 is free: every candidate is scored pruned (held-out KL to the teacher, forward
passes only), so the whole feasible set is looked at. The best `retrained` go on to the
retraining rungs: rung 1 trains each for T_1 steps, and each later rung keeps the best 1/eta
and trains them up to T_i = eta x T_(i-1) steps, the last rung reaching `retrain.tokens`.

A candidate's run is one warmup-stable-decay schedule: its value at rung i is taken after
T_i steps whose last D_i (a fifth, at least one) decay the learning rate, but the decay is a
branch: the state before it (step S_i = T_i - D_i) is kept, and a promoted candidate
continues from there, so rung i costs it T_i - S_(i-1) steps, not T_i. Its value at rung i is
exactly what one run of T_i steps would give (trainer.retrain's continuation test), and
the winner's final distillation starts from its last stable state.

Cuts respect the noise: a rung value's standard error is the paired error over the
held-out blocks plus a data-order term measured once per search (`order_pilot` more data
orders of one candidate at rung 1, one when the budget allows no more, plus one for each of
rung 1's reserved places that rung 0's cut leaves unused; so few draws widen the error to
Student's t, see metrics.tied). Candidates within one standard error of the
cut line go on too, up to `within_noise` x the planned number (their tokens are reserved in
the plan, so the budget holds). At the last rung, candidates within noise of the best are
a tie, broken by `TIE_RULE` and reported as a tie.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import Measurement, tied

__all__ = [
    "DECAY_SHARE",
    "MIN_STEPS",
    "TAU_MIN_N",
    "TIE_RULE",
    "Rung",
    "Schedule",
    "break_tie",
    "pilot_orders",
    "plan_schedule",
    "promote",
    "rung_tau",
    "tie_keys",
]

TAU_MIN_N = 5  # Kendall tau over fewer pairs than this says nothing; it is not reported
DECAY_SHARE = 0.2  # the closing decay of a warmup-stable-decay run: a fifth of its steps
MIN_STEPS = 4  # fewest optimizer steps of a retraining rung: warm-up, stable and decay each need some
TIE_RULE = "fewer layers (faster decoding), then lower pruned score (rung 0), then faster decoding when measured, then fewer parameters"


def tie_keys(attrs: dict) -> tuple:
    """TIE_RULE as an ascending sort key over a candidate's recorded attributes (a trial's user attributes).

    Among candidates whose quality is tied, the one with fewer layers decodes faster (layers
    run one after another), which a user values whatever the quality. It is also what the
    oracle benchmark found: at both budgets of SmolLM2-135M the shallower, wider of the tied
    top pair was the better after full distillation, and the lower pruned score picked the
    other (reports/benchmarks/oracle.md)."""
    layers = (attrs.get("architecture") or {}).get("num_hidden_layers", math.inf)
    return (layers, attrs.get("pruned", math.inf), -(attrs.get("decode_tokens_per_s") or 0.0), attrs.get("params_total", 0))


@dataclass(frozen=True)
class Rung:
    index: int
    candidates: int  # promoted by rank into this rung
    extra: int  # room for candidates within noise of the cut line
    steps: int  # optimizer steps trained when the value is taken (0: rung 0, scored pruned)
    decay: int  # the last `decay` of them are the closing decay branch
    tokens: int  # steps * tokens per step

    @property
    def stable(self) -> int:
        """The step whose state a promoted candidate continues from."""
        return self.steps - self.decay


@dataclass(frozen=True)
class Schedule:
    rungs: tuple[Rung, ...]
    eta: int
    budget_tokens: int | None  # what the schedule had to fit in; None: no limit
    tokens_per_step: int = 1
    pilot_orders: int = 0  # more data orders of one candidate at rung 1, for the data-order error

    def cost_steps(self, index: int) -> int:
        """Optimizer steps one candidate trains at rung `index` (continuing from the rung before)."""
        if index == 0:
            return 0
        previous = self.rungs[index - 1].stable if index > 1 else 0
        return self.rungs[index].steps - previous

    @property
    def total_tokens(self) -> int:
        """Training tokens of the whole search if every reserved place of every rung is used."""
        steps = sum((r.candidates + r.extra) * self.cost_steps(r.index) for r in self.rungs)
        if len(self.rungs) > 1:
            steps += self.pilot_orders * self.rungs[1].steps
        return steps * self.tokens_per_step

    def describe(self) -> str:
        parts = [f"{self.rungs[0].candidates} scored pruned"]
        parts += [f"{r.candidates}(+{r.extra}) x {r.tokens:,}" for r in self.rungs[1:]]
        pilot = f" + data-order pilot {self.pilot_orders} x {self.rungs[1].tokens:,}" if self.pilot_orders and len(self.rungs) > 1 else ""
        return f"{len(self.rungs)} rung(s), eta={self.eta}: {', '.join(parts)} tokens{pilot} = at most {self.total_tokens:,}"


def pilot_orders(schedule: Schedule, within_noise: int) -> int:
    """More data orders of the pilot, once rung 0's cut has filled `within_noise` of rung 1's
    reserved places: the planned ones, plus one for each place left unused (a pilot order and a
    place of rung 1 cost the same steps). A pilot of one more order gives the data-order error a
    single degree of freedom, small by luck in some searches; the unused tokens buy a second."""
    if not schedule.pilot_orders or len(schedule.rungs) < 2:
        return schedule.pilot_orders
    return schedule.pilot_orders + max(0, schedule.rungs[1].extra - within_noise)


def _retraining_rungs(n: int, eta: int, levels: int, full_steps: int, min_steps: int, within_noise: float) -> list[tuple[int, int, int]]:
    """(candidates, extra, steps) of retraining rungs 1..levels+1."""
    rungs = []
    for i in range(levels + 1):
        candidates = math.ceil(n / eta**i)
        extra = math.ceil(candidates * within_noise)
        rungs.append((candidates, extra, max(min_steps, round(full_steps / eta ** (levels - i)))))
    return rungs


def _build(n0: int, n: int, eta: int, levels: int, full_steps: int, tokens_per_step: int, min_steps: int, within_noise: float, pilot: int, budget) -> Schedule:
    rungs = [Rung(0, n0, 0, 0, 0, 0)]
    for i, (candidates, extra, steps) in enumerate(_retraining_rungs(n, eta, levels, full_steps, min_steps, within_noise), start=1):
        extra = min(extra, max(0, n0 - candidates) if i == 1 else max(0, rungs[-1].candidates + rungs[-1].extra - candidates))
        decay = max(1, math.ceil(DECAY_SHARE * steps))
        rungs.append(Rung(i, candidates, extra, steps, decay, steps * tokens_per_step))
    return Schedule(tuple(rungs), eta, budget, tokens_per_step, pilot if n > 0 else 0)


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
    min_steps: int = MIN_STEPS,
    final_candidates: int = 2,
    retrained: int | None = None,
    within_noise: float = 0.5,
    pilot_orders: int = 2,
) -> Schedule:
    """The rungs for `n` candidates scored pruned, of which `retrained` (default: eta^2 x
    `final_candidates`) are retrained, the last rung for `full_steps` steps.

    Without a budget, as many halvings as keep `final_candidates` at the last rung. With one,
    the most candidates retrained, then the longest last rung, then the fewest halvings whose
    total (every reserved place used) fits; when none fits, the same with a pilot of one more
    order (if `pilot_orders` > 1) before refusing. `retrained=0` retrains nothing: the search is
    rung 0 alone, pruned scoring over the whole set. The total never exceeds the budget.
    """
    if n < 1 or full_steps < 1 or tokens_per_step < 1:
        raise MinitronError(f"a search needs candidates and steps, got {n} candidates and {full_steps} steps: widen the space")
    if eta < 2:
        raise MinitronError(f"halving.eta is {eta}: use 2 or more (each rung keeps 1/eta of the candidates)")
    if min_steps < MIN_STEPS:
        raise MinitronError(f"halving.min_steps is {min_steps}: a retraining rung of fewer than {MIN_STEPS} steps barely trains; use {MIN_STEPS} or more")
    if full_steps < min_steps:
        raise MinitronError(
            f"the last rung would train {full_steps} steps, below halving.min_steps {min_steps}: raise retrain.tokens to "
            f"{min_steps * tokens_per_step:,} or more, or set halving.retrained: 0 to score pruned only"
        )
    wanted = min(n, final_candidates * eta**2 if retrained is None else retrained)
    if wanted == 0:
        return _build(n, 0, eta, -1, full_steps, tokens_per_step, min_steps, within_noise, pilot_orders, budget_tokens)

    def build(k: int, steps: int, levels: int, pilot: int = pilot_orders) -> Schedule:
        return _build(n, k, eta, levels, steps, tokens_per_step, min_steps, within_noise, pilot, budget_tokens)

    if budget_tokens is None:
        return build(wanted, full_steps, _max_levels(wanted, eta, full_steps, min_steps, final_candidates))
    # A pilot of one more order (one degree of freedom) before a refusal: a noisier data-order
    # term is still a data-order term, and the search can run.
    for pilot in dict.fromkeys((pilot_orders, min(pilot_orders, 1))):
        for k in range(wanted, min(wanted, max(1, final_candidates)) - 1, -1):
            for steps in range(full_steps, min_steps - 1, -1):
                for levels in range(_max_levels(k, eta, steps, min_steps, final_candidates) + 1):
                    schedule = build(k, steps, levels, pilot)
                    if schedule.total_tokens <= budget_tokens:
                        return schedule
    cheapest = build(min(wanted, max(1, final_candidates)), min_steps, 0, min(pilot_orders, 1))
    raise MinitronError(
        f"a search budget of {budget_tokens:,} tokens cannot retrain {cheapest.rungs[1].candidates} candidates for {min_steps} steps: the "
        f"cheapest schedule ({cheapest.describe()}) needs {cheapest.total_tokens:,}; raise halving.budget_tokens or "
        "halving.budget_fraction, or set halving.retrained: 0 to score pruned only"
    )


def promote(
    values: dict[str, Measurement],
    keep: int,
    extra: int,
    order_stderr: float = 0.0,
    order: dict[str, tuple] | None = None,
    order_dof: int | None = None,
) -> tuple[list[str], list[str]]:
    """(the `keep` best keys, up to `extra` more within noise of the last of them), lower is better.

    Within noise: the difference to the cut line's candidate is within one standard error,
    paired over blocks, with each value's data-order error `order_stderr` (measured on
    `order_dof` degrees of freedom: see metrics.tied) added. Equal values are ordered by
    `order[key]` (the tie rule's keys), never by the key's text.
    """
    order = order or {}
    ranked = sorted(values, key=lambda k: (values[k].value, order.get(k, ())))
    kept = ranked[:keep]
    if not kept:
        return [], []
    line = values[kept[-1]]
    near = [k for k in ranked[keep:] if tied(line, values[k], 2 * order_stderr**2, order_dof)]
    return kept, near[:extra]


def break_tie(
    values: dict[str, Measurement], order: dict[str, tuple], maximize: bool, order_stderr: float = 0.0, order_dof: int | None = None
) -> tuple[str, list[str], str | None]:
    """(winner, the others tied with the best, what decided): the best value wins unless others
    are within noise of it; then `order[key]` (see TIE_RULE) picks among the tied."""
    sign = -1 if maximize else 1
    best = min(values, key=lambda k: (sign * values[k].value, order.get(k, ())))
    tied_keys = [k for k in values if k != best and tied(values[best], values[k], 2 * order_stderr**2, order_dof)]
    if not tied_keys:
        return best, [], None
    group = [best, *tied_keys]
    winner = min(group, key=lambda k: order.get(k, ()))
    return winner, [k for k in group if k != winner], TIE_RULE


def rung_tau(before: dict[str, float], after: dict[str, float], resamples: int = 1000, seed: int = 0) -> dict:
    """Kendall tau between two rungs over the candidates in both, with a 95% bootstrap interval
    (candidates resampled with replacement); tau None when fewer than TAU_MIN_N are shared."""
    shared = sorted(set(before) & set(after))
    out = {"tau": None, "n": len(shared), "low": None, "high": None}
    if len(shared) < TAU_MIN_N:
        return out
    from scipy.stats import kendalltau  # scipy is slow to import: only when a tau is asked for

    x, y = [before[k] for k in shared], [after[k] for k in shared]
    tau = kendalltau(x, y).statistic
    if math.isnan(tau):
        return out
    rng, draws = random.Random(seed), []
    for _ in range(resamples):
        pick = [rng.randrange(len(shared)) for _ in shared]
        value = kendalltau([x[i] for i in pick], [y[i] for i in pick]).statistic
        if not math.isnan(value):
            draws.append(value)
    draws.sort()
    low, high = (draws[int(0.025 * (len(draws) - 1))], draws[int(0.975 * (len(draws) - 1))]) if draws else (None, None)
    return {"tau": float(tau), "n": len(shared), "low": low, "high": high}
