"""The search on a tiny random teacher: rungs, survivors, budget, resume, kill and Ctrl-C."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy
import yaml
from helpers import byte_tokenizer, tiny_model

from minitron_nas.config.settings import RankSettings, RetrainSettings
from minitron_nas.config.space import Budget, HalvingSettings, ScoringSettings, SearchSpace
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import RetrainResult, TrainState, retrain
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import HeldoutLoss, Measurement, Metric
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import Teacher, load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings
from minitron_nas.search import runner as search
from minitron_nas.search.candidates import require_feasible
from minitron_nas.search.halving import pilot_orders
from minitron_nas.search.runner import candidate_pool, run_search, schedule_for
from minitron_nas.search.study import pareto_front, rung_values, search_complete
from minitron_nas.search.trials import arch_key

AXES = {"hidden_size": (32, 48), "intermediate_size": (48, 64, 96), "heads_per_group": (1, 3), "num_key_value_heads": (2,), "num_hidden_layers": (2, 3, 4)}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Teacher:
    model = tiny_model("llama", vocab_size=257)
    folder = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    save_model(model, folder, byte_tokenizer())
    return load_teacher(str(folder))


def make_space(teacher: Teacher, corpus: str, **changes) -> SearchSpace:
    space = SearchSpace(
        teacher=str(teacher.path),
        axes=AXES,
        budget=Budget(parameters=40_000, tolerance=0.25),
        ranking=RankSettings(data=corpus, samples=8, seq_len=32),
        retrain=RetrainSettings(tokens=8 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, top_k=32, data=corpus),
        scoring=ScoringSettings(metric="heldout_loss", heldout_samples=6, seq_len=32),
        halving=HalvingSettings(eta=2, rung_metric="kld"),
        sampler="grid",
    )
    return replace(space, **changes)


def finished(study: optuna.Study) -> pd.DataFrame:
    rows = [
        {
            "number": t.number,
            "rung": t.user_attrs["rung"],
            "order": t.user_attrs.get("order", 0),
            "key": t.user_attrs["key"],
            "value": t.user_attrs.get("value"),
            "state": t.state.name,
        }
        for t in study.trials
        if "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs
    ]
    return pd.DataFrame(rows)


def _cuts(study: optuna.Study) -> dict[int, dict]:
    return {int(k.removeprefix("cut_")): v for k, v in study.user_attrs.items() if k.startswith("cut_")}


def test_rung_zero_scores_every_feasible_candidate_pruned_and_the_rungs_continue_to_the_brute_force_values(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    pool = candidate_pool(space, require_feasible(space, teacher.model.config))
    schedule = schedule_for(space, len(pool))
    assert len(pool) >= 8 and len(schedule.rungs) >= 3
    run = tmp_path / "run"
    study = run_search(space, run, teacher=teacher)
    done = finished(study)
    assert (done.state == "COMPLETE").all()
    rankings = Rankings.load(run / "rankings")
    heldout = token_blocks(space.retrain.data, teacher.tokenizer, 32, 6, "heldout")

    # Rung 0: every feasible candidate, scored pruned (no training), its architecture as Optuna params.
    rung0 = [t for t in study.trials if t.user_attrs.get("rung") == 0]
    assert sorted(t.user_attrs["key"] for t in rung0) == sorted(arch_key(c.arch) for c in pool)
    for t in rung0:
        arch = search.Architecture(**{**t.user_attrs["architecture"], "layers": None})
        assert t.params == {"hidden_size": arch.hidden_size, "intermediate_size": arch.intermediate_size,
                            "heads_per_group": arch.num_attention_heads // arch.num_key_value_heads,
                            "num_key_value_heads": arch.num_key_value_heads, "num_hidden_layers": arch.num_hidden_layers}  # fmt: skip
        assert t.user_attrs["tokens"] == 0 and "tokens_trained" not in t.user_attrs
    # Each retraining rung: exactly the candidates its cut named (the best by rank, then those within noise).
    cuts = _cuts(study)
    for rung in schedule.rungs[1:]:
        at = done[(done.rung == rung.index) & (done.order == 0)]
        cut = cuts[rung.index - 1]
        assert sorted(at.key) == sorted(cut["kept"] + cut["within_noise"]) and at.key.is_unique
        previous = done[(done.rung == rung.index - 1) & (done.order == 0)].sort_values("value")
        assert cut["kept"] == list(previous.key[: len(cut["kept"])]) and len(cut["kept"]) == rung.candidates
        assert len(cut["within_noise"]) <= rung.extra
    pilot = pilot_orders(schedule, len(cuts[0]["within_noise"]))  # the planned orders and rung 1's unused places
    assert pilot >= schedule.pilot_orders and (done.rung.eq(1) & done.order.gt(0)).sum() == pilot  # the data-order pilot

    # Brute force outside the study: each finalist trained in one go for the last rung's steps gives the value the
    # search reached by continuing it across the rungs.
    spec = space.retrain
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, search.training_pool(schedule, spec), "train")
    cache = TeacherLogitCache.load(run / "teacher_logits")
    last = schedule.rungs[-1]
    warmup = max(1, schedule.rungs[1].stable // 3)
    one_go = replace(spec, seed=space.seed, steps=last.steps, warmup_steps=warmup, decay_steps=last.decay, eval_every=0)

    def score(arch):
        student = prune(teacher.model, rankings, arch)
        retrain(student, train, cache, one_go, progress=False)
        return HeldoutLoss(heldout, spec.batch_size).measure(student).value

    finals = {t.user_attrs["key"]: t for t in study.trials if t.user_attrs.get("rung") == last.index and not t.user_attrs.get("order")}
    assert any(t.user_attrs["continued_from_step"] > 0 for t in finals.values())
    brute = {key: score(search.Architecture(**{**t.user_attrs["architecture"], "layers": None})) for key, t in finals.items()}
    for key, t in finals.items():
        assert t.user_attrs["score"] == pytest.approx(brute[key], rel=1e-4)
    best = json.loads((run / "best_arch.json").read_text())
    brute_best = min(brute, key=brute.get)
    assert best["key"] == brute_best or (best["tie_broken_by"] and brute_best in best["tied_with"])
    assert best["score_stderr"] > 0
    # tokens: what the plan reserves at most, and exactly what the trials trained
    trained = sum(t.user_attrs.get("tokens_trained", 0) for t in study.trials if "rung" in t.user_attrs)
    assert best["search_tokens"] == trained <= schedule.total_tokens
    # only the last stable states of the winner and the Pareto front are kept, for their final distillations to continue
    kept = {Path(best["state"]).name, *(Path(m["state"]).name for m in best["front"])}
    assert sorted(p.name for p in (run / "rung_states").iterdir()) == sorted(kept)
    assert {m["key"] for m in best["front"]} == {t.user_attrs["key"] for t in pareto_front(study, False)}
    table = pd.read_csv(run / "trials.csv")
    assert {"rung", "order", "tokens", "value", "stderr", "tokens_trained", "seconds"} <= set(table.columns)
    assert (table.stderr > 0).all()
    candidates = pd.read_csv(run / "candidates.csv")
    assert len(candidates) == len(pool) and candidates.best.sum() == 1  # every candidate, at its last rung


def test_the_search_stays_within_a_token_budget(teacher, corpus, tmp_path):
    budget = 6 * 4 * 128 + 2 * 8 * 128  # too little for the deepest halving at full length
    space = make_space(teacher, corpus, halving=HalvingSettings(eta=2, budget_tokens=budget, order_pilot=0, within_noise=0.0))
    run_search(space, tmp_path / "run", teacher=teacher)
    best = json.loads((tmp_path / "run" / "best_arch.json").read_text())
    assert 0 < best["search_tokens"] <= budget and best["budget_tokens"] == budget


def test_seeds_draw_different_training_rows():
    """With the pool the search draws, the rows a run reads differ between seeds, not only their order."""
    from minitron_nas.distill.trainer import _row_stream
    from minitron_nas.search.halving import plan_schedule

    spec = RetrainSettings(tokens=8 * 2 * 256, batch_size=2, seq_len=256)
    schedule = plan_schedule(18, spec.total_steps, spec.batch_size * spec.seq_len, eta=3)
    pool = search.training_pool(schedule, spec)
    read = schedule.rungs[-1].steps * spec.batch_size  # the longest run's rows
    rows = [frozenset(itertools.islice(_row_stream(pool, seed), read)) for seed in range(10)]
    assert len(set(rows)) == 10
    assert max(len(a & b) / read for a, b in itertools.combinations(rows, 2)) < 0.8


def test_a_search_stopped_by_n_trials_is_not_finished_and_the_same_call_goes_on(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    run = tmp_path / "run"
    run_search(space, run, n_trials=1, teacher=teacher)
    assert not (run / "best_arch.json").exists()  # one candidate of rung 0 is no winner
    for _ in range(200):
        study = run_search(space, run, n_trials=5, resume=True, teacher=teacher)
        if (run / "best_arch.json").exists():
            break
    assert search_complete(study)
    whole = run_search(space, tmp_path / "whole", teacher=teacher)
    stepwise = {(t.user_attrs["rung"], t.user_attrs["order"], t.user_attrs["key"]): t.user_attrs["value"] for t in study.trials if t.state.name == "COMPLETE"}
    at_once = {(t.user_attrs["rung"], t.user_attrs["order"], t.user_attrs["key"]): t.user_attrs["value"] for t in whole.trials if t.state.name == "COMPLETE"}
    assert stepwise.keys() == at_once.keys()
    assert all(stepwise[k] == pytest.approx(at_once[k], rel=1e-4) for k in at_once)
    assert json.loads((run / "best_arch.json").read_text())["key"] == json.loads((tmp_path / "whole" / "best_arch.json").read_text())["key"]


def thousands_space(teacher: Teacher, corpus: str, **changes) -> SearchSpace:
    """5,346 feasible candidates on the tiny teacher, scored pruned only (no retraining rung)."""
    axes = {"hidden_size": tuple(range(6, 49, 6)), "intermediate_size": tuple(range(1, 97)), "heads_per_group": (1, 2, 3),
            "num_key_value_heads": (1, 2), "num_hidden_layers": (1, 2, 3, 4)}  # fmt: skip
    return make_space(
        teacher,
        corpus,
        axes=axes,
        budget=Budget(parameters=40_000, tolerance=0.4),
        scoring=ScoringSettings(metric="kld", heldout_samples=2, seq_len=8),
        halving=HalvingSettings(retrained=0),
        **changes,
    )


def test_rung_zero_streams_a_grid_of_thousands_with_progress(teacher, corpus, tmp_path, capfd):
    space = thousands_space(teacher, corpus)
    feasible = require_feasible(space, teacher.model.config)
    assert len(feasible) >= 5000
    run = tmp_path / "run"
    study = run_search(space, run, storage=str(tmp_path / "study.journal"), teacher=teacher)
    assert len(rung_values(study, 0)) == len(feasible)
    err = capfd.readouterr().err
    assert f"{len(feasible)}/{len(feasible)}" in err and "rung 0: pruned" in err  # the progress bar
    assert f"rung 0: {len(feasible)} candidates scored pruned" in err
    best = json.loads((run / "best_arch.json").read_text())
    assert best["score"] == pytest.approx(min(t.user_attrs["value"] for t in rung_values(study, 0).values()))


def test_under_a_cap_tpe_proposes_rung_zero_one_candidate_at_a_time_with_the_axes_as_params(teacher, corpus, tmp_path, capfd):
    space = thousands_space(teacher, corpus, sampler="tpe", trials=24)
    axes = space.axes
    feasible = {search.arch_key(c.arch) for c in require_feasible(space, teacher.model.config)}
    runs = []
    for name in ("one", "two"):
        study = run_search(space, tmp_path / name, teacher=teacher)
        scored = rung_values(study, 0)
        assert len(scored) == 24 and set(scored) <= feasible  # distinct, feasible, exactly the cap
        assert all(set(t.params) == set(axes) for t in scored.values())  # optuna-dashboard's params
        best = json.loads((tmp_path / name / "best_arch.json").read_text())
        assert best["score"] == pytest.approx(min(t.value for t in scored.values()))
        runs.append([t.user_attrs["key"] for t in sorted(scored.values(), key=lambda t: t.number)])
    assert runs[0] == runs[1]  # the same scores propose the same candidates, in the same order
    assert "24 candidates scored pruned" in capfd.readouterr().err


class KnownValues(Metric):
    """A metric whose value for each architecture is fixed in advance."""

    name = "kld"

    def __init__(self, values):
        self.values = values

    def measure(self, model) -> Measurement:
        c = model.config
        key = f"{c.hidden_size}/{c.intermediate_size}/{c.num_attention_heads}:{c.num_key_value_heads}/{c.num_hidden_layers}"
        return Measurement(self.values[key], 0.01, 0.0, None)


@pytest.mark.parametrize("order_seed, workers", [(0, 1), (1, 2), (2, 3)])
def test_survivors_are_the_best_whatever_the_trial_order_and_the_workers(teacher, corpus, tmp_path, monkeypatch, order_seed, workers):
    import random

    space = make_space(teacher, corpus)
    feasible = require_feasible(space, teacher.model.config)
    keys = [arch_key(c.arch) for c in feasible]
    values = {k: v for k, v in zip(keys, random.Random(42).sample(range(100), len(keys)))}  # far apart: nothing within noise
    shuffled = random.Random(order_seed).sample(feasible, len(feasible))
    monkeypatch.setattr(search, "candidate_pool", lambda space, feasible: shuffled)
    monkeypatch.setattr(search, "_metric", lambda name, *args: KnownValues(values))
    monkeypatch.setattr(search, "retrain", lambda *a, **k: RetrainResult([], [], None, tokens_seen=1, snapshot=TrainState(1, {}, {})))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    schedule = schedule_for(space, len(feasible))
    total = sum(r.candidates for r in schedule.rungs) + pilot_orders(schedule, 0)  # rung 1's places unused: pilot orders
    for i in range(total + workers):  # workers take one trial each in turn, each from its own folder
        run_search(space, tmp_path / f"worker{i % workers}", storage=url, n_trials=1, resume=i > 0, teacher=teacher)
    study = optuna.load_study(study_name="minitron", storage=url)
    done = finished(study)
    assert len(done) == total and (done.state == "COMPLETE").all()
    assert search_complete(study)
    alive = set(keys)
    for rung in schedule.rungs:
        at = set(done[(done.rung == rung.index) & (done.order == 0)].key)
        assert at == set(sorted(alive, key=values.get)[: rung.candidates])  # exactly the best of the previous rung
        alive = at


def test_a_worker_that_looked_just_before_another_queued_the_next_rung_runs_it_and_cuts_nothing_early(teacher, corpus, tmp_path, monkeypatch):
    space = make_space(teacher, corpus)
    feasible = require_feasible(space, teacher.model.config)
    values = {arch_key(c.arch): float(i) for i, c in enumerate(feasible)}
    monkeypatch.setattr(search, "_metric", lambda name, *args: KnownValues(values))
    monkeypatch.setattr(search, "retrain", lambda *a, **k: RetrainResult([], [], None, tokens_seen=1, snapshot=TrainState(1, {}, {})))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    for i in itertools.count():  # one worker until rung 0 is closed, rung 1 queued and one of its trials run
        study = run_search(space, tmp_path / "a", storage=url, n_trials=1, resume=i > 0, teacher=teacher)
        if any(t.user_attrs.get("rung") == 1 and t.state.name == "COMPLETE" for t in study.trials):
            break
    real, looks = search.work_trials, []

    def stale_first_look(study, *states):
        """The first look for waiting work sees the study as it was before rung 1 was queued."""
        looks.append(states)
        return [] if len(looks) == 1 else real(study, *states)

    monkeypatch.setattr(search, "work_trials", stale_first_look)
    run_search(space, tmp_path / "b", storage=url, n_trials=1, resume=True, teacher=teacher)
    study = optuna.load_study(study_name="minitron", storage=url)
    done = finished(study)
    assert len(done[(done.rung == 1) & (done.state == "COMPLETE")]) == 2  # the second worker ran a rung-1 trial
    assert "cut_1" not in study.user_attrs and not (done.rung == 2).any()  # rung 1 was not closed on one result


def test_a_resume_with_another_space_is_refused_naming_what_changed(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    with pytest.raises(MinitronError, match="--resume"):
        run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    changed = replace(space, retrain=replace(space.retrain, lr=1e-3))
    with pytest.raises(MinitronError, match=r"was made from other inputs \(retrain was "):
        run_search(changed, tmp_path / "run", n_trials=1, resume=True, teacher=teacher)
    study = run_search(space, tmp_path / "run", n_trials=1, resume=True, teacher=teacher)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2
    assert not (tmp_path / "run" / "best_arch.json").exists()


def test_a_search_whose_every_candidate_fails_says_why_in_one_line(teacher, corpus, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise MinitronError("loss became NaN/inf at step 1: lower the learning rate")

    monkeypatch.setattr(search, "retrain", diverge)
    with pytest.raises(MinitronError, match="no candidate finished the search") as err:
        run_search(make_space(teacher, corpus), tmp_path / "run", teacher=teacher)
    assert "\n" not in str(err.value)
    table = pd.read_csv(tmp_path / "run" / "trials.csv")
    retrained = table[table.rung > 0]
    assert (table[table.rung == 0].state == "COMPLETE").all()  # scored pruned: no training to fail
    assert len(retrained) and (retrained.state == "FAIL").all() and retrained.error.str.contains("NaN|inf", regex=True).all()
    assert not (tmp_path / "run" / "best_arch.json").exists()


def _space_file(tmp_path, teacher, corpus, steps: int):
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": str(teacher.path),
                "axes": {k: list(v) for k, v in AXES.items()},
                "budget": {"parameters": 40_000, "tolerance": 0.25},
                "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
                "retrain": {"tokens": steps * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "top_k": 32, "data": corpus},
                "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
                "halving": {"eta": 2, "order_pilot": 0},
                "sampler": "grid",
            }
        )
    )
    return path


def _wait_for_running_trial(storage: str, proc, deadline: float) -> None:
    while time.time() < deadline and proc.poll() is None:
        try:
            trials = optuna.load_study(study_name="minitron", storage=storage).trials
        except (KeyError, sqlalchemy.exc.OperationalError):  # the run folder or the study is not created yet
            trials = []
        if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" and "rung" in t.user_attrs for t in trials):
            return  # a retraining trial caught running
        time.sleep(0.05)
    raise AssertionError("no trial was caught running")


def _each_once(study: optuna.Study, space, teacher) -> None:
    done = finished(study)
    complete = done[done.state == "COMPLETE"]
    schedule = schedule_for(space, len(require_feasible(space, teacher.model.config)))
    cuts = _cuts(study)
    assert not complete.duplicated(["rung", "order", "key"]).any()
    planned = [len(require_feasible(space, teacher.model.config))] + [
        len(cuts[r.index - 1]["kept"] + cuts[r.index - 1]["within_noise"]) for r in schedule.rungs[1:]
    ]
    assert [int(((complete.rung == r.index) & (complete.order == 0)).sum()) for r in schedule.rungs] == planned
    assert search_complete(study)


def test_a_worker_killed_mid_rung_loses_nothing_and_its_trial_is_retried_once(teacher, corpus, tmp_path):
    from minitron_nas.search.candidates import load_space

    space_file = _space_file(tmp_path, teacher, corpus, steps=320)  # rung 1: 80 steps, long enough to be caught by a 50 ms poll
    run = tmp_path / "run"
    command = [sys.executable, "-m", "minitron_nas.cli", "search", str(space_file), "--out", str(run)]
    env = {**os.environ, "MINITRON_NAS_HEARTBEAT_SECONDS": "1", "MINITRON_NAS_GRACE_SECONDS": "3"}
    storage = f"sqlite:///{run / 'study.db'}"
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    _wait_for_running_trial(storage, worker, time.time() + 300)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    before = {t.number: t.user_attrs.get("value") for t in optuna.load_study(study_name="minitron", storage=storage).trials if t.state.name == "COMPLETE"}
    time.sleep(3.5)  # past the grace period: the killed trial is stale
    subprocess.run(command + ["--resume"], check=True, capture_output=True, env=env)
    after = optuna.load_study(study_name="minitron", storage=storage)
    assert {n: after.trials[n].user_attrs.get("value") for n in before} == before  # finished trials untouched
    _each_once(after, load_space(space_file), teacher)
    killed = [t for t in after.trials if t.state.name == "FAIL"]
    retries = [t for t in after.trials if t.system_attrs.get("failed_trial") is not None]
    assert len(killed) == 1 and len(retries) == 1  # failed by heartbeat, retried once
    assert retries[0].user_attrs["key"] == killed[0].user_attrs["key"] and retries[0].state.name == "COMPLETE"


def test_ctrl_c_mid_trial_queues_the_candidate_again_and_prints_one_line(teacher, corpus, tmp_path):
    from minitron_nas.search.candidates import load_space

    space_file = _space_file(tmp_path, teacher, corpus, steps=320)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "minitron_nas.cli", "search", str(space_file), "--out", str(run)]
    storage = f"sqlite:///{run / 'study.db'}"
    worker = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    _wait_for_running_trial(storage, worker, time.time() + 300)
    worker.send_signal(signal.SIGINT)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode != 0
    assert "Traceback" not in out + err
    interrupted = [t for t in optuna.load_study(study_name="minitron", storage=storage).trials if t.user_attrs.get("interrupted")]
    assert len(interrupted) == 1 and interrupted[0].state.name == "FAIL"
    tail = [line for line in (out + err).splitlines() if line.strip()][-1]
    assert "interrupted" in tail.lower() and "--resume" in tail
    subprocess.run(command + ["--resume"], check=True, capture_output=True)
    _each_once(optuna.load_study(study_name="minitron", storage=storage), load_space(space_file), teacher)


def test_latency_is_measured_carried_to_later_rungs_and_enforced(teacher, corpus, tmp_path):
    from minitron_nas.config.space import LatencySettings

    space = make_space(teacher, corpus, latency=LatencySettings(measure=True, context=16, new_tokens=4, repeats=1))
    study = run_search(space, tmp_path / "run", teacher=teacher)
    done = [t for t in study.trials if t.state.name == "COMPLETE" and "rung" in t.user_attrs]
    assert all(t.user_attrs["decode_tokens_per_s"] > 0 and t.user_attrs["prefill_tokens_per_s"] > 0 for t in done)
    assert any(t.user_attrs["rung"] > 0 for t in done)  # later rungs inherit the rung-0 measurement
    table = pd.read_csv(tmp_path / "run" / "candidates.csv")
    assert table.decode_tokens_per_s.notna().all()

    too_fast = make_space(teacher, corpus, latency=LatencySettings(min_decode_tokens_per_s=1e12, context=16, new_tokens=4, repeats=1))
    with pytest.raises(MinitronError, match="no candidate finished the search"):
        run_search(too_fast, tmp_path / "slow", teacher=teacher)
    stopped = optuna.load_study(study_name="minitron", storage=f"sqlite:///{tmp_path / 'slow' / 'study.db'}").trials
    assert all(t.state.name == "PRUNED" and t.user_attrs.get("too_slow") for t in stopped if "rung" in t.user_attrs)


def test_optuna_dashboard_shows_the_architecture_axes_as_params(teacher, corpus, tmp_path):
    """optuna-dashboard, started on loopback over a finished search's study, plots the axes and their importance."""
    import socket
    import urllib.request

    run_search(make_space(teacher, corpus), tmp_path / "run", teacher=teacher)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    storage = f"sqlite:///{tmp_path / 'run' / 'study.db'}"
    code = f"import optuna_dashboard; optuna_dashboard.run_server({storage!r}, host='127.0.0.1', port={port})"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return json.loads(response.read())

    try:
        deadline = time.time() + 60
        while True:
            try:
                studies = get("/api/studies")["study_summaries"]
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        study_id = studies[0]["study_id"]
        detail = get(f"/api/studies/{study_id}?after=0")
        assert {p["name"] for p in detail["union_search_space"]} == set(AXES)
        with_params = [t for t in detail["trials"] if t["params"]]
        assert len(with_params) >= len(require_feasible(make_space(teacher, corpus), teacher.model.config))
        importances = get(f"/api/studies/{study_id}/param_importances")["param_importances"][0]
        assert {"hidden_size", "num_hidden_layers"} <= {p["name"] for p in importances} <= set(AXES)
    finally:
        server.terminate()
        server.wait(timeout=30)
