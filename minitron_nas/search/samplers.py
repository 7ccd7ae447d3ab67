"""Which feasible candidates rung 0 scores: small parts behind one interface.

Rung 0 costs forward passes only, so by default it scores every feasible candidate (the
grid). A space's `trials` caps it: beyond that many, a seeded uniform sample is scored.
Adding a sampler is a subclass of `PoolSampler` and one entry in `SAMPLERS`.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TypeVar

from minitron_nas.errors import MinitronError

__all__ = ["SAMPLERS", "AutoPool", "GridPool", "PoolSampler", "RandomPool", "sampler_named"]

T = TypeVar("T")


class PoolSampler(ABC):
    """Chooses rung 0's candidates from the feasible ones, deterministically for a seed."""

    @abstractmethod
    def pool(self, feasible: Sequence[T], trials: int | None, seed: int) -> list[T]:
        """The candidates of rung 0, in the order they are scored."""


class GridPool(PoolSampler):
    """Every feasible candidate."""

    def pool(self, feasible, trials, seed):
        return list(feasible)


class RandomPool(PoolSampler):
    """A seeded uniform sample of `trials` candidates (all of them when `trials` is not given)."""

    def pool(self, feasible, trials, seed):
        return random.Random(seed).sample(list(feasible), min(len(feasible), trials or len(feasible)))


class AutoPool(PoolSampler):
    """The grid, or a random sample of `trials` when there are more feasible candidates than that."""

    def pool(self, feasible, trials, seed):
        return (GridPool() if trials is None or len(feasible) <= trials else RandomPool()).pool(feasible, trials, seed)


SAMPLERS: dict[str, PoolSampler] = {"auto": AutoPool(), "grid": GridPool(), "random": RandomPool()}


def sampler_named(name: str) -> PoolSampler:
    if name not in SAMPLERS:
        raise MinitronError(f"unknown sampler '{name}': use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
