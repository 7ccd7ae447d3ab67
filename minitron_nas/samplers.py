"""Which feasible candidates enter the search's first rung: small parts behind one interface.

A synchronous rung needs its whole pool up front, so a sampler here proposes a set, not one
candidate at a time. Model-based samplers (TPE, NSGA-II) need each result before proposing
the next, which a synchronous rung cannot give; beyond `GRID_LIMIT` candidates the pool is
a uniform sample, and the halving spends the budget on telling its members apart. Adding a
sampler is a subclass of `PoolSampler` and one entry in `SAMPLERS`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TypeVar

from .errors import MinitronError

__all__ = ["GRID_LIMIT", "SAMPLERS", "AutoPool", "GridPool", "PoolSampler", "RandomPool", "sampler_named"]

GRID_LIMIT = 64  # "auto" starts rung 0 with every feasible candidate up to this many, else a random sample

T = TypeVar("T")


class PoolSampler(ABC):
    """Chooses rung 0's candidates from the feasible ones, deterministically for a seed."""

    @abstractmethod
    def pool(self, feasible: Sequence[T], trials: int | None, seed: int) -> list[T]:
        """The candidates of rung 0, in the order they are queued."""


class GridPool(PoolSampler):
    """Every feasible candidate."""

    def pool(self, feasible, trials, seed):
        return list(feasible)


class RandomPool(PoolSampler):
    """A seeded uniform sample of `trials` candidates (GRID_LIMIT when not given)."""

    def pool(self, feasible, trials, seed):
        return random.Random(seed).sample(list(feasible), min(len(feasible), trials or GRID_LIMIT))


class AutoPool(PoolSampler):
    """The grid when it has at most GRID_LIMIT candidates, else a random sample."""

    def pool(self, feasible, trials, seed):
        return (GridPool() if len(feasible) <= GRID_LIMIT else RandomPool()).pool(feasible, trials, seed)


SAMPLERS: dict[str, PoolSampler] = {"auto": AutoPool(), "grid": GridPool(), "random": RandomPool()}


def sampler_named(name: str) -> PoolSampler:
    if name not in SAMPLERS:
        raise MinitronError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
