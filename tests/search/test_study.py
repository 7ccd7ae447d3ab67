"""The study's readers and storage, on small in-memory studies: the paired tie check, the Pareto front, the storage opener, the heartbeat settings."""

from __future__ import annotations

import itertools
import math
import random

import optuna
import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import paired_stderr
from minitron_nas.search.halving import TIE_RULE
from minitron_nas.search.study import decide, heartbeat_seconds, measurement, open_storage, pareto_front

# Two candidates scored on four held-out blocks: B is worse on every block by almost the same
# amount. By hand: A's mean 2.5, B's 2.625; the per-block differences -0.1, -0.1, -0.1, -0.2
# have mean -0.125 and SD 0.05, so the paired standard error is 0.05 / sqrt(4) = 0.025 and
# B is 5 standard errors worse: no tie. Unpaired, each mean's own error is about 0.65
# (SD 1.29 over 4 blocks), so the difference would be well within one standard error: a tie.
A_BLOCKS = [1.0, 2.0, 3.0, 4.0]
B_BLOCKS = [1.1, 2.1, 3.1, 4.2]


def _scored(key: str, blocks: list[float], pruned: float) -> optuna.trial.FrozenTrial:
    mean = sum(blocks) / len(blocks)
    sd = (sum((x - mean) ** 2 for x in blocks) / (len(blocks) - 1)) ** 0.5
    attrs = {"key": key, "rung": 0, "order": 0, "pruned": pruned, "params_total": 1000, "value": mean}
    attrs.update(score=mean, score_stderr=sd / len(blocks) ** 0.5, score_per_item=blocks)
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=mean, user_attrs=attrs)


def test_a_tie_is_judged_on_the_paired_per_block_values():
    study = optuna.create_study()
    study.add_trial(_scored("A", A_BLOCKS, pruned=2.0))
    study.add_trial(_scored("B", B_BLOCKS, pruned=1.0))  # B would win a tie by the tie rule
    a, b = (measurement(t, "score") for t in study.trials)
    assert paired_stderr(a, b) == pytest.approx(0.025)
    assert b.value - a.value == pytest.approx(0.125)
    assert (a.stderr**2 + b.stderr**2) ** 0.5 > 0.125  # unpaired, the gap would be within one standard error
    best, tied, rule = decide(study, maximize_score=False)
    assert (best.user_attrs["key"], tied, rule) == ("A", [], None)


def test_without_per_block_values_the_same_scores_tie_and_the_rule_decides():
    study = optuna.create_study()
    for t in (_scored("A", A_BLOCKS, pruned=2.0), _scored("B", B_BLOCKS, pruned=1.0)):
        study.add_trial(optuna.trial.create_trial(state=t.state, value=t.value, user_attrs={**t.user_attrs, "score_per_item": None}))
    best, tied, rule = decide(study, maximize_score=False)
    assert (best.user_attrs["key"], tied, rule) == ("B", ["A"], TIE_RULE)


def test_an_unsupported_storage_is_refused_in_one_line(tmp_path):
    with pytest.raises(MinitronError, match=r"unsupported storage 'redis://localhost/0': use sqlite:///FILE"):
        open_storage("redis://localhost/0", tmp_path)


def test_a_reader_never_creates_an_empty_store(tmp_path):
    with pytest.raises(MinitronError, match="no study in run folder"):
        open_storage(None, tmp_path, worker=False)
    with pytest.raises(MinitronError, match="no study in storage"):
        open_storage(str(tmp_path / "other.journal"), tmp_path, worker=False)
    assert not list(tmp_path.iterdir())


def test_a_file_that_is_no_database_is_a_one_line_error(tmp_path):
    (tmp_path / "study.db").write_text("not a database")
    with pytest.raises(MinitronError, match=r"the study database '.*study.db' is unreadable \(file is not a database\): delete it to start the search over"):
        open_storage(None, tmp_path, worker=False)


def test_a_worker_opens_sqlite_in_the_run_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_NAS_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("MINITRON_NAS_GRACE_SECONDS", "5")
    store = open_storage(None, tmp_path)
    assert isinstance(store, optuna.storages.RDBStorage) and (tmp_path / "study.db").is_file()
    assert store.heartbeat_interval == 2 and store.grace_period == 5


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MINITRON_NAS_GRACE_SECONDS": "soon"}, "MINITRON_NAS_GRACE_SECONDS='soon' is not a whole number"),
        ({"MINITRON_NAS_HEARTBEAT_SECONDS": "30"}, r"must exceed MINITRON_NAS_HEARTBEAT_SECONDS \(30\)"),
    ],
)
def test_bad_heartbeat_settings_are_refused_where_they_are_used(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(MinitronError, match=message):
        heartbeat_seconds()


# --------------------------------------------------------------------------- the Pareto front


def _candidate(key: str, params: int, score: float, stderr: float, rung: int = 1, decode: float | None = None) -> optuna.trial.FrozenTrial:
    attrs = {"key": key, "rung": rung, "order": 0, "pruned": 1.0, "params_total": params, "value": score, "score": score, "score_stderr": stderr}
    if decode is not None:
        attrs["decode_tokens_per_s"] = decode
    return optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=score, user_attrs=attrs)


def _study(*candidates: optuna.trial.FrozenTrial, rungs: int = 2) -> optuna.Study:
    study = optuna.create_study()
    study.set_user_attr("rungs", rungs)
    for trial in candidates:
        study.add_trial(trial)
    return study


def _front(study: optuna.Study, maximize: bool = False, by: str = "params") -> list[str]:
    return [t.user_attrs["key"] for t in pareto_front(study, maximize, by)]


def _oracle(points: dict[str, tuple[float, float, float]], maximize: bool) -> set[str]:
    """By hand, from the raw numbers: A is off the front when some B is no larger and better by more
    than one standard error of the difference (sqrt(se_a^2 + se_b^2)), or within it and strictly smaller."""
    off = set()
    for (a, (size_a, value_a, se_a)), (b, (size_b, value_b, se_b)) in itertools.permutations(points.items(), 2):
        gain = (value_b - value_a) if maximize else (value_a - value_b)
        within_noise = abs(value_a - value_b) <= math.sqrt(se_a**2 + se_b**2)
        if (within_noise and size_b < size_a) or (not within_noise and gain > 0 and size_b <= size_a):
            off.add(a)
    return set(points) - off


def test_the_front_by_hand_keeps_a_smaller_tie_and_equal_sizes():
    study = _study(
        _candidate("tiny", 90, 2.00, 0.1),  # the smallest is always on the front
        _candidate("A", 100, 1.00, 0.1),
        _candidate("B", 120, 0.95, 0.1),  # better than A within noise, and larger: A is as good for less
        _candidate("C", 150, 0.50, 0.05),  # better than A beyond noise
        _candidate("D", 150, 0.52, 0.05),  # tied with C at the same size: both stay
        _candidate("E", 160, 0.10, 0.01),  # best, beyond noise
        _candidate("early", 50, 0.01, 0.01, rung=0),  # an earlier rung is not compared
    )
    assert _front(study) == ["tiny", "A", "C", "D", "E"]
    assert _front(study, maximize=True) == ["tiny"]  # higher is better: nothing larger beats it


def test_the_front_by_latency_orders_by_decode_time_and_needs_it_measured():
    fast, slow = _candidate("fast", 200, 1.0, 0.01, decode=900.0), _candidate("slow", 100, 0.5, 0.01, decode=300.0)
    assert _front(_study(slow, fast), by="latency") == ["fast", "slow"]  # fast decodes in less time; slow scores better beyond noise
    assert _front(_study(slow, fast)) == ["slow"]  # by parameters slow is smaller and better
    with pytest.raises(MinitronError, match="the search measured no decode latency: set `latency: {measure: true}`"):
        pareto_front(_study(slow, _candidate("unmeasured", 300, 0.4, 0.01)), False, "latency")


@pytest.mark.parametrize("maximize", [False, True])
def test_the_front_matches_a_brute_force_oracle_on_random_candidates(maximize):
    rng = random.Random(7)
    for _ in range(150):
        points = {
            f"c{i}": (rng.choice([100, 120, 150, 200]), rng.choice([0.5, 0.55, 0.6, 0.8, 1.0]), rng.choice([0.0, 0.02, 0.1])) for i in range(rng.randint(1, 7))
        }
        study = _study(*(_candidate(k, size, value, se) for k, (size, value, se) in points.items()))
        front = _front(study, maximize)
        assert set(front) == _oracle(points, maximize), points
        assert [points[k][0] for k in front] == sorted(points[k][0] for k in front)  # smallest first
