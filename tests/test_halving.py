"""The rung schedule and promotion: budgets kept, rungs geometric, survivors order-free."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.halving import TAU_MIN_N, plan_schedule, promote, rung_tau


def test_without_a_budget_the_deepest_halving_ends_at_the_full_retraining():
    schedule = plan_schedule(8, full_steps=16, tokens_per_step=512, eta=2)
    assert [(r.candidates, r.steps) for r in schedule.rungs] == [(8, 4), (4, 8), (2, 16)]
    assert schedule.total_tokens == (8 * 4 + 4 * 8 + 2 * 16) * 512
    assert len(plan_schedule(2, 16, 512).rungs) == 1  # nothing to halve


@pytest.mark.parametrize("n, steps, eta, budget_steps", list(itertools.product([2, 5, 8, 27, 64], [3, 9, 32, 100], [2, 3, 4], [1, 7, 40, 300, 5000])))
def test_a_schedule_never_spends_more_than_its_budget(n, steps, eta, budget_steps):
    per_step = 128
    budget = budget_steps * per_step
    try:
        schedule = plan_schedule(n, steps, per_step, eta=eta, budget_tokens=budget)
    except MinitronError as err:
        # Refused only when even one step for every candidate at the deepest halving is too much.
        assert "cannot retrain" in str(err)
        assert budget < n * per_step
        return
    total = sum(r.candidates * r.steps * per_step for r in schedule.rungs)  # recomputed by hand
    assert total == schedule.total_tokens <= budget
    rungs = schedule.rungs
    assert rungs[0].candidates == n
    assert rungs[-1].steps <= steps
    for a, b in zip(rungs, rungs[1:]):
        assert b.candidates == math.ceil(n / eta**b.index)  # the best 1/eta go on
        assert b.steps >= a.steps and b.tokens == b.steps * per_step
    if len(rungs) > 1:
        assert rungs[-1].candidates >= 2  # the last rung ranks at least two by the space's score


def test_the_fewest_halvings_that_fit_are_chosen():
    # 9 candidates, 27 steps each, eta 3: one rung costs 243 steps, two cost 9*9 + 3*27 = 162.
    assert len(plan_schedule(9, 27, 1, eta=3, budget_tokens=243).rungs) == 1
    two = plan_schedule(9, 27, 1, eta=3, budget_tokens=200)
    assert [(r.candidates, r.steps) for r in two.rungs] == [(9, 9), (3, 27)]
    # Below 162 the deepest halving (the last rung keeps >= 2, so 2 rungs) shrinks its steps.
    small = plan_schedule(9, 27, 1, eta=3, budget_tokens=100)
    assert small.total_tokens <= 100 and small.rungs[-1].steps < 27


def test_a_budget_too_small_for_one_step_each_is_refused_in_one_line():
    with pytest.raises(MinitronError, match="cannot retrain 10 candidates") as err:
        plan_schedule(10, 8, 512, eta=3, budget_tokens=512)
    assert "\n" not in str(err.value)


def test_promotion_keeps_exactly_the_best_regardless_of_order():
    rng = random.Random(0)
    values = {f"c{i}": rng.random() for i in range(20)}
    expected = sorted(values, key=values.get)[:7]
    for _ in range(10):
        keys = list(values)
        rng.shuffle(keys)
        shuffled = {k: values[k] for k in keys}
        assert promote(shuffled, 7, maximize=False) == expected
        assert promote(shuffled, 7, maximize=True) == sorted(values, key=values.get, reverse=True)[:7]


def test_rung_tau_is_withheld_below_the_minimum_pairs():
    few = {str(i): float(i) for i in range(TAU_MIN_N - 1)}
    assert rung_tau(few, few) == (None, TAU_MIN_N - 1)
    many = {str(i): float(i) for i in range(6)}
    reversed_ = {k: -v for k, v in many.items()}
    assert rung_tau(many, many) == (pytest.approx(1.0), 6)
    assert rung_tau(many, reversed_) == (pytest.approx(-1.0), 6)
