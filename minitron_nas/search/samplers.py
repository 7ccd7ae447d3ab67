"""Which feasible candidates rung 0 scores: small parts behind one interface.

Rung 0 costs forward passes only, so by default it scores every feasible candidate (the
grid). A space's `trials` caps it: beyond that many, Optuna's TPE proposes each next
candidate from the scores so far (`tpe`, and `auto`; an adaptive sampler: its candidates are
not known in advance), or a seeded uniform sample is scored (`random`). Adding a sampler is a
subclass of `PoolSampler` and one entry in `SAMPLERS`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import optuna

from minitron_nas.errors import MinitronError

__all__ = ["SAMPLERS", "GridPool", "PoolSampler", "RandomPool", "TPEPool", "nearest", "sampler_named"]

T = TypeVar("T")


class PoolSampler(ABC):
    """Chooses rung 0's candidates from the feasible ones, deterministically for a seed."""

    adaptive = False  # True: `pool` is what may be proposed, and `size` of it are, one at a time

    @abstractmethod
    def pool(self, feasible: Sequence[T], trials: int | None, seed: int) -> list[T]:
        """The candidates of rung 0, in the order they are scored (adaptive: those it may propose)."""

    def size(self, feasible: Sequence, trials: int | None) -> int:
        """How many candidates rung 0 scores."""
        return len(self.pool(feasible, trials, 0))


class GridPool(PoolSampler):
    """Every feasible candidate."""

    def pool(self, feasible, trials, seed):
        return list(feasible)


class RandomPool(PoolSampler):
    """A seeded uniform sample of `trials` candidates (all of them when `trials` is not given)."""

    def pool(self, feasible, trials, seed):
        return random.Random(seed).sample(list(feasible), min(len(feasible), trials or len(feasible)))


class TPEPool(PoolSampler):
    """Optuna's TPE proposes each next candidate from the scores so far; the grid when `trials` covers it.

    TPE models the five axes (each a categorical of the space's values) from rung 0's scored
    candidates, as Optuna trials with the architecture as params. Its proposal is mapped to the
    nearest candidate not scored yet (axis by axis, in steps of the axis' values; ties to the one
    closest to the budget), so an infeasible or repeated proposal costs no forward pass.
    """

    adaptive = True
    STARTUP = 10  # TPE's random proposals before it models the scores (Optuna's default)

    def pool(self, feasible, trials, seed):
        return list(feasible)

    def size(self, feasible, trials):
        return len(feasible) if trials is None else min(trials, len(feasible))

    def propose(
        self,
        history: Sequence[tuple[dict, float]],
        unscored: Sequence[T],
        params_of: Callable[[T], dict],
        distributions: dict[str, optuna.distributions.CategoricalDistribution],
        seed: int,
    ) -> T:
        """The next candidate to score: TPE's proposal given `history` (params, value; lower is better),
        mapped to the nearest of `unscored` (which is in the order of closeness to the budget)."""
        if not unscored:
            raise MinitronError("every feasible candidate is scored: nothing left to propose")
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.STARTUP, multivariate=True))
        study.add_trials([optuna.trial.create_trial(params=params, distributions=distributions, value=value) for params, value in history])
        return nearest(study.ask(distributions).params, unscored, params_of, distributions)


def nearest(wanted: dict, candidates: Sequence[T], params_of: Callable[[T], dict], distributions: dict) -> T:
    """The candidate closest to `wanted`: summed over axes, steps between the axis' values over
    its span (each axis counts the same); of equals, the first (the closest to the budget)."""
    position = {name: {v: i for i, v in enumerate(d.choices)} for name, d in distributions.items()}
    span = {name: max(1, len(d.choices) - 1) for name, d in distributions.items()}

    def distance(candidate) -> float:
        params = params_of(candidate)
        return sum(abs(position[n][params[n]] - position[n][wanted[n]]) / span[n] for n in distributions)

    return min(candidates, key=distance)


SAMPLERS: dict[str, PoolSampler] = {"auto": TPEPool(), "grid": GridPool(), "random": RandomPool(), "tpe": TPEPool()}  # auto: the grid unless `trials` caps it


def sampler_named(name: str) -> PoolSampler:
    if name not in SAMPLERS:
        raise MinitronError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
