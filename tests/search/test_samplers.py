"""Rung 0's pool samplers: the whole grid by default; under a cap, TPE's proposals or a seeded sample."""

from __future__ import annotations

import itertools
import random

import optuna
import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.search.samplers import GridPool, RandomPool, TPEPool, nearest, sampler_named


def test_the_grid_is_every_feasible_candidate_in_order():
    assert GridPool().pool(range(500), trials=None, seed=0) == list(range(500))


def test_a_random_pool_is_a_seeded_sample_of_distinct_candidates():
    first = RandomPool().pool(range(1000), trials=20, seed=3)
    assert len(set(first)) == 20 and first == RandomPool().pool(range(1000), trials=20, seed=3)
    assert first != RandomPool().pool(range(1000), trials=20, seed=4)
    assert sorted(RandomPool().pool(range(30), trials=None, seed=0)) == list(range(30))


def test_auto_scores_the_whole_grid_unless_trials_caps_it_and_then_tpe_proposes():
    auto = sampler_named("auto")
    assert auto.pool(range(5000), trials=None, seed=0) == list(range(5000))  # no silent cap
    assert auto.size(range(5000), None) == 5000 and auto.size(range(40), 40) == 40
    assert auto.adaptive and auto.size(range(41), 10) == 10  # ten of 41, proposed one at a time
    assert not sampler_named("random").adaptive and sampler_named("random").size(range(41), 10) == 10


AXES = {"a": (1, 2, 3, 4, 5, 6), "b": (10, 20, 30, 40, 50, 60), "c": (1, 2, 3, 4, 5, 6), "d": (7, 8, 9, 10, 11, 12)}
DISTRIBUTIONS = {k: optuna.distributions.CategoricalDistribution(v) for k, v in AXES.items()}
GRID = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]  # 1,296 candidates
TARGET = {"a": 4, "b": 20, "c": 5, "d": 9}


def bowl(c: dict) -> int:
    """A known landscape: squared steps from TARGET, axis by axis (0 at TARGET)."""
    return sum((AXES[k].index(c[k]) - AXES[k].index(TARGET[k])) ** 2 for k in AXES)


def tpe_run(n: int, seed: int, candidates=GRID) -> list[dict]:
    scored, left = [], list(candidates)
    for i in range(n):
        c = TPEPool().propose([(x, bowl(x)) for x in scored], left, dict, DISTRIBUTIONS, seed * 1000 + i)
        left.remove(c)
        scored.append(c)
    return scored


def test_tpe_proposes_distinct_unscored_candidates_the_same_for_a_seed():
    first = tpe_run(15, seed=1)
    assert len({tuple(c.values()) for c in first}) == 15
    assert first == tpe_run(15, seed=1) and first != tpe_run(15, seed=2)


def test_tpe_finds_lower_scores_than_a_uniform_sample_of_the_same_size():
    """On a known bowl, the best of 30 TPE proposals beats the best of 30 uniform draws on
    average over six seeds (each run is deterministic: this is a fixed computation)."""
    tpe = [min(map(bowl, tpe_run(30, seed))) for seed in range(6)]
    uniform = [min(map(bowl, random.Random(seed).sample(GRID, 30))) for seed in range(6)]
    assert sum(tpe) < sum(uniform), (tpe, uniform)


def test_a_proposal_is_mapped_to_the_nearest_candidate_axis_steps_over_the_span():
    wanted = dict(a=6, b=10, c=1, d=7)
    one_step_each = dict(a=5, b=20, c=1, d=7)  # 1/5 + 1/5 = 0.4
    three_steps = dict(a=6, b=40, c=1, d=7)  # 3/5 = 0.6
    assert nearest(wanted, [three_steps, one_step_each], dict, DISTRIBUTIONS) == one_step_each
    level = dict(a=6, b=10, c=2, d=7)  # 0.2, as is the next one: the first of equals wins
    assert nearest(wanted, [level, dict(a=6, b=10, c=1, d=8)], dict, DISTRIBUTIONS) == level
    assert nearest(wanted, [three_steps, wanted], dict, DISTRIBUTIONS) == wanted
    with pytest.raises(MinitronError, match="nothing left to propose"):
        TPEPool().propose([], [], dict, DISTRIBUTIONS, seed=0)


def test_an_unknown_sampler_is_refused_in_one_line():
    with pytest.raises(MinitronError, match="unknown sampler 'nsga'"):
        sampler_named("nsga")
