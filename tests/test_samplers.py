"""Rung-0 samplers: the grid is everything, random is a seeded sample, auto switches at the limit."""

from __future__ import annotations

import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.samplers import GRID_LIMIT, AutoPool, GridPool, RandomPool, sampler_named


def test_grid_keeps_every_candidate_in_order():
    assert GridPool().pool(range(10), trials=3, seed=0) == list(range(10))


def test_random_is_a_seeded_sample_without_repeats():
    a = RandomPool().pool(range(100), trials=7, seed=1)
    assert a == RandomPool().pool(range(100), trials=7, seed=1) and len(set(a)) == 7 and set(a) <= set(range(100))
    assert a != RandomPool().pool(range(100), trials=7, seed=2)
    assert len(RandomPool().pool(range(5), trials=None, seed=0)) == 5  # never more than there are
    assert len(RandomPool().pool(range(GRID_LIMIT * 2), trials=None, seed=0)) == GRID_LIMIT


def test_auto_is_the_grid_up_to_the_limit_then_random():
    assert AutoPool().pool(range(GRID_LIMIT), trials=None, seed=0) == list(range(GRID_LIMIT))
    big = AutoPool().pool(range(GRID_LIMIT + 1), trials=10, seed=0)
    assert len(big) == 10 and big == RandomPool().pool(range(GRID_LIMIT + 1), trials=10, seed=0)


def test_unknown_sampler_is_named_with_the_choices():
    with pytest.raises(MinitronError, match="unknown sampler 'tpe': use one of auto, grid, random"):
        sampler_named("tpe")
