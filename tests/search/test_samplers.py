"""Rung 0's pool samplers: the whole grid by default, a seeded sample under a cap."""

from __future__ import annotations

import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.search.samplers import AutoPool, GridPool, RandomPool, sampler_named


def test_the_grid_is_every_feasible_candidate_in_order():
    assert GridPool().pool(range(500), trials=None, seed=0) == list(range(500))


def test_a_random_pool_is_a_seeded_sample_of_distinct_candidates():
    first = RandomPool().pool(range(1000), trials=20, seed=3)
    assert len(set(first)) == 20 and first == RandomPool().pool(range(1000), trials=20, seed=3)
    assert first != RandomPool().pool(range(1000), trials=20, seed=4)
    assert sorted(RandomPool().pool(range(30), trials=None, seed=0)) == list(range(30))


def test_auto_scores_the_whole_grid_unless_trials_caps_it():
    assert AutoPool().pool(range(5000), trials=None, seed=0) == list(range(5000))  # no silent cap
    assert AutoPool().pool(range(40), trials=40, seed=0) == list(range(40))
    capped = AutoPool().pool(range(41), trials=10, seed=0)
    assert len(capped) == 10 and capped == RandomPool().pool(range(41), trials=10, seed=0)


def test_an_unknown_sampler_is_refused_in_one_line():
    with pytest.raises(MinitronError, match="unknown sampler 'tpe'"):
        sampler_named("tpe")
