"""The rung schedule, promotion and the tie rule: budgets kept, continuation costed, noise respected."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import Measurement
from minitron_nas.search.halving import DECAY_SHARE, MIN_STEPS, TAU_MIN_N, TIE_RULE, break_tie, pilot_orders, plan_schedule, promote, rung_tau, tie_keys


def m(value: float, stderr: float = 0.01, per_item=None) -> Measurement:
    return Measurement(value, stderr, 0.0, per_item)


def _cost_by_hand(schedule) -> int:
    """Tokens if every reserved place is used: a promoted candidate continues from its previous rung's stable step."""
    steps, previous_stable = 0, 0
    for r in schedule.rungs[1:]:
        steps += (r.candidates + r.extra) * (r.steps - previous_stable)
        previous_stable = r.steps - r.decay
    if len(schedule.rungs) > 1:
        steps += schedule.pilot_orders * schedule.rungs[1].steps
    return steps * schedule.tokens_per_step


def test_rung_zero_is_free_and_the_retraining_rungs_halve_up_to_the_full_run():
    schedule = plan_schedule(40, full_steps=16, tokens_per_step=512, eta=2, final_candidates=2, retrained=8, within_noise=0.0, pilot_orders=0)
    assert [(r.candidates, r.steps) for r in schedule.rungs] == [(40, 0), (8, 4), (4, 8), (2, 16)]
    assert schedule.rungs[0].tokens == 0
    # decay: a fifth, at least one step; a promoted candidate pays only what it has not trained yet
    assert [r.decay for r in schedule.rungs[1:]] == [1, 2, 4]
    assert [schedule.cost_steps(i) for i in range(4)] == [0, 4, 8 - 3, 16 - 6]
    assert schedule.total_tokens == (8 * 4 + 4 * 5 + 2 * 10) * 512 == _cost_by_hand(schedule)


@pytest.mark.parametrize(
    "n, steps, eta, budget_steps, within, pilot",
    list(itertools.product([2, 5, 27, 300], [4, 9, 32, 100], [2, 3], [3, 40, 300, 5000], [0.0, 0.5], [0, 2])),
)
def test_a_schedule_never_spends_more_than_its_budget(n, steps, eta, budget_steps, within, pilot):
    per_step = 128
    budget = budget_steps * per_step
    try:
        schedule = plan_schedule(n, steps, per_step, eta=eta, budget_tokens=budget, within_noise=within, pilot_orders=pilot)
    except MinitronError as err:
        assert "cannot retrain" in str(err)
        # refused only when even the smallest retraining (final_candidates x MIN_STEPS, pilot and reserve included) is too much
        k = min(n, 2)
        assert budget < (k + min(math.ceil(k * within), n - k) + min(pilot, 1)) * MIN_STEPS * per_step
        return
    assert _cost_by_hand(schedule) == schedule.total_tokens <= budget
    rungs = schedule.rungs
    assert rungs[0].candidates == n and rungs[0].steps == 0
    for a, b in zip(rungs[1:], rungs[2:]):
        assert b.candidates == math.ceil(rungs[1].candidates / eta ** (b.index - 1))  # the best 1/eta go on
        assert b.steps >= a.steps and b.stable >= a.stable and b.tokens == b.steps * per_step
    for r in rungs[1:]:
        assert r.steps >= MIN_STEPS and 1 <= r.decay == max(1, math.ceil(DECAY_SHARE * r.steps))


def test_the_most_candidates_retrained_then_the_longest_last_rung_fit():
    roomy = plan_schedule(100, 32, 1, eta=3, budget_tokens=10_000, within_noise=0.0, pilot_orders=0)
    assert roomy.rungs[1].candidates == 18 and roomy.rungs[-1].steps == 32  # final_candidates x eta^2, full length
    tight = plan_schedule(100, 32, 1, eta=3, budget_tokens=150, within_noise=0.0, pilot_orders=0)
    assert tight.total_tokens <= 150 and tight.rungs[1].candidates == 18 and tight.rungs[-1].steps < 32


def test_a_tight_budget_shrinks_the_pilot_to_one_more_order_before_refusing():
    # 2 candidates + 1 within-noise place, 4 steps of 512 each: 6,144 tokens; each pilot order 2,048 more
    assert plan_schedule(8, 160, 512, budget_tokens=10_240, pilot_orders=2).pilot_orders == 2
    shrunk = plan_schedule(8, 160, 512, budget_tokens=8_192, pilot_orders=2)
    assert shrunk.pilot_orders == 1 and shrunk.total_tokens == 8_192 == _cost_by_hand(shrunk)
    assert "data-order pilot 1 x 2,048" in shrunk.describe()
    with pytest.raises(MinitronError, match="pilot 1 x 2,048 = at most 8,192"):
        plan_schedule(8, 160, 512, budget_tokens=8_191, pilot_orders=2)
    assert plan_schedule(8, 160, 512, budget_tokens=6_144, pilot_orders=0).pilot_orders == 0  # off stays off


def test_unused_places_of_rung_1_become_pilot_orders_at_the_same_cost():
    shrunk = plan_schedule(8, 160, 512, budget_tokens=8_192, pilot_orders=2)  # 2 candidates + 1 place, pilot 1: 4 x 2,048
    assert shrunk.rungs[1].extra == 1
    assert pilot_orders(shrunk, within_noise=1) == 1  # the place taken: the planned pilot
    assert pilot_orders(shrunk, within_noise=0) == 2  # the place unused: a second order, 2,048 tokens like the place
    spent = (shrunk.rungs[1].candidates + pilot_orders(shrunk, 0)) * shrunk.rungs[1].steps * shrunk.tokens_per_step
    assert spent == shrunk.total_tokens == 8_192
    off = plan_schedule(8, 160, 512, budget_tokens=6_144, pilot_orders=0)
    assert off.rungs[1].extra == 1 and pilot_orders(off, 0) == 0  # a pilot turned off stays off


def test_too_few_steps_are_refused_in_one_line_naming_the_fix():
    with pytest.raises(MinitronError, match="halving.min_steps is 2") as err:
        plan_schedule(10, 8, 512, min_steps=2)
    assert "\n" not in str(err.value)
    with pytest.raises(MinitronError, match="raise retrain.tokens"):
        plan_schedule(10, 3, 512)
    with pytest.raises(MinitronError, match="cannot retrain 2 candidates for 4 steps"):
        plan_schedule(10, 8, 512, budget_tokens=512)


def test_retrained_zero_is_pruned_scoring_alone():
    schedule = plan_schedule(5000, 8, 512, retrained=0)
    assert len(schedule.rungs) == 1 and schedule.total_tokens == 0


def test_promotion_keeps_exactly_the_best_when_nothing_is_near_the_cut():
    rng = random.Random(0)
    values = {f"c{i}": m(v, 1e-6) for i, v in enumerate(rng.sample(range(1000), 20))}
    expected = sorted(values, key=lambda k: values[k].value)[:7]
    for _ in range(5):
        keys = list(values)
        rng.shuffle(keys)
        kept, near = promote({k: values[k] for k in keys}, 7, extra=3)
        assert kept == expected and near == []


def test_candidates_within_noise_of_the_cut_go_on_up_to_the_cap():
    # unpaired errors 0.1 each: the difference's error is 0.141; c (0.12 from the line) is within it, d (0.2) is not
    values = {"a": m(1.0, 0.1), "line": m(1.1, 0.1), "b": m(1.15, 0.1), "c": m(1.22, 0.1), "d": m(1.30, 0.1)}
    assert promote(values, 2, extra=5) == (["a", "line"], ["b", "c"])
    assert promote(values, 2, extra=1) == (["a", "line"], ["b"])  # the cap
    # a data-order error of 0.1 per value widens the band to sqrt(0.141^2 + 2 x 0.1^2) = 0.2
    assert promote(values, 2, extra=5, order_stderr=0.1) == (["a", "line"], ["b", "c", "d"])
    # an SD from one more order (1 degree of freedom) widens the band 1.84x: 0.141 x 1.84 = 0.26 takes d (0.2) in
    assert promote(values, 2, extra=5, order_stderr=1e-9, order_dof=1) == (["a", "line"], ["b", "c", "d"])


def test_paired_errors_decide_nearness_when_both_have_per_block_values():
    # d's blocks move with the line's: the paired difference has a tiny error, so 0.05 is outside the noise
    line = m(1.0, 0.5, [0.5, 1.0, 1.5])
    near = m(1.05, 0.5, [0.55, 1.05, 1.55])
    assert promote({"x": m(0.1, 0.5), "line": line, "near": near}, 2, extra=1) == (["x", "line"], [])


def test_equal_values_are_ordered_by_the_tie_rule_not_by_the_key():
    values = {"z": m(1.0), "a": m(1.0)}
    kept, _ = promote(values, 1, extra=0, order={"z": (0.5,), "a": (0.9,)})
    assert kept == ["z"]


def _attrs(layers: int, pruned: float, params: int, decode: float | None = None) -> dict:
    return {"architecture": {"num_hidden_layers": layers}, "pruned": pruned, "params_total": params, "decode_tokens_per_s": decode}


def test_a_tie_at_the_end_is_broken_by_the_rule_and_reported():
    scores = {"small": m(0.50, 0.02), "big": m(0.49, 0.02), "far": m(0.80, 0.02)}
    attrs = {"small": _attrs(30, 1.2, 10), "big": _attrs(30, 1.0, 20), "far": _attrs(20, 0.5, 5)}
    order = {k: tie_keys(a) for k, a in attrs.items()}
    assert break_tie(scores, order, maximize=False) == ("big", ["small"], TIE_RULE)  # same depth: the better pruned score
    order["small"] = tie_keys(attrs["small"] | {"pruned": 0.9})
    assert break_tie(scores, order, maximize=False) == ("small", ["big"], TIE_RULE)
    order["small"] = tie_keys(attrs["small"] | {"architecture": {"num_hidden_layers": 26}})  # fewer layers beat a better pruned score
    assert break_tie(scores, order, maximize=False) == ("small", ["big"], TIE_RULE)
    assert "far" not in break_tie(scores, order, maximize=False)[1]  # outside the noise: the rule never reaches it


def test_the_tie_rule_orders_by_layers_then_pruned_score_then_decoding_then_size():
    ranked = sorted(
        {
            "deep": _attrs(30, 0.1, 1),
            "shallow, worse pruned": _attrs(20, 0.9, 9),
            "shallow, better pruned": _attrs(20, 0.5, 9),
            "shallow, better pruned, faster": _attrs(20, 0.5, 9, decode=100.0),
            "shallow, better pruned, smaller": _attrs(20, 0.5, 8),
        }.items(),
        key=lambda kv: tie_keys(kv[1]),
    )
    assert [k for k, _ in ranked] == [
        "shallow, better pruned, faster",
        "shallow, better pruned, smaller",
        "shallow, better pruned",
        "shallow, worse pruned",
        "deep",
    ]
    assert tie_keys({"pruned": 0.1}) > tie_keys(_attrs(40, 0.9, 9))  # an attribute missing sorts last, never first
    clear = {"a": m(0.3, 0.01), "b": m(0.5, 0.01)}
    assert break_tie(clear, {}, maximize=False) == ("a", [], None)
    # a pilot spread that is small by luck (1 degree of freedom) declares no winner: 0.03 <= 1.84 x 0.0283
    assert break_tie({"a": m(0.30, 0.02), "b": m(0.33, 0.02)}, {"b": (0.1,)}, False, order_stderr=1e-9) == ("a", [], None)
    assert break_tie({"a": m(0.30, 0.02), "b": m(0.33, 0.02)}, {"a": (0.5,), "b": (0.1,)}, False, 1e-9, order_dof=1) == ("b", ["a"], TIE_RULE)
    assert break_tie(clear, {}, maximize=True) == ("b", [], None)


def test_rung_tau_is_withheld_below_the_minimum_pairs_and_has_a_bootstrap_interval():
    few = {str(i): float(i) for i in range(TAU_MIN_N - 1)}
    assert rung_tau(few, few)["tau"] is None
    many = {str(i): float(i) for i in range(12)}
    same = rung_tau(many, many)
    assert same["tau"] == pytest.approx(1.0) and same["low"] == pytest.approx(1.0) and same["n"] == 12
    rng = random.Random(1)
    noisy = {k: v + rng.gauss(0, 4) for k, v in many.items()}
    tau = rung_tau(many, noisy)
    assert tau["low"] < tau["tau"] < tau["high"] and tau["high"] - tau["low"] > 0.2  # n = 12 says little


def test_the_bootstrap_interval_covers_the_truth_at_its_level():
    """Independent check: for pairs drawn with a known correlation, the 95% interval covers the population tau most of the time."""
    rng = random.Random(7)
    rho = 0.6
    true_tau = 2 / math.pi * math.asin(rho)  # Greiner's relation for bivariate normals
    covered = 0
    for trial in range(40):
        xs = [rng.gauss(0, 1) for _ in range(30)]
        ys = [rho * x + math.sqrt(1 - rho**2) * rng.gauss(0, 1) for x in xs]
        t = rung_tau({str(i): x for i, x in enumerate(xs)}, {str(i): y for i, y in enumerate(ys)}, resamples=300, seed=trial)
        covered += t["low"] <= true_tau <= t["high"]
    assert covered >= 32  # 95% nominal; percentile intervals at n = 30 run a little narrow
