"""The Optuna study on a tiny random teacher: budget, brute-force agreement, resume after kill -9."""

from __future__ import annotations

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
import yaml

from minitron_nas.distill import TeacherLogitCache
from minitron_nas.errors import MinitronError
from minitron_nas.export import save_model
from minitron_nas.pruning import prune
from minitron_nas.search import Scorer, run_search
from minitron_nas.distill import retrain
from minitron_nas.data import token_blocks
from minitron_nas.space import Budget, RankingSpec, RetrainSpec, ScoringSpec, SearchSpace, require_feasible
from minitron_nas.teachers import Teacher, fingerprint, load_teacher

from conftest import byte_tokenizer, tiny_model

AXES = {"hidden_size": (32, 48), "intermediate_size": (48, 96), "heads_per_group": (1, 3), "num_key_value_heads": (2,), "num_hidden_layers": (3, 4)}


@pytest.fixture(scope="module")
def corpus(shared_data) -> str:
    return str(shared_data / "tinyshakespeare" / "input.txt")


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
        ranking=RankingSpec(data=corpus, samples=8, seq_len=32),
        retrain=RetrainSpec(tokens=6 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, top_k=32, data=corpus, eval_every=2),
        scoring=ScoringSpec(metric="heldout_loss", heldout_samples=4, seq_len=32),
        sampler="grid",
    )
    return replace(space, **changes)


def test_grid_search_covers_the_feasible_set_and_finds_the_brute_force_best(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    feasible = require_feasible(space, teacher.model.config)
    assert 3 <= len(feasible) <= 8
    study = run_search(space, tmp_path / "run", teacher=teacher)
    table = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert (table.state == "COMPLETE").sum() == len(feasible)
    low, high = 40_000 * 0.75, 40_000 * 1.25
    assert table.params_total.between(low, high).all()
    assert len({tuple(r) for r in table[["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers"]].values}) == len(feasible)
    assert (table.score_after < table.score_before).all()  # retraining helps every candidate
    assert "kendall_tau_before_after" in table.columns

    # Brute force: the same prune -> retrain -> score for every candidate, outside Optuna.
    rankings = __import__("minitron_nas.ranking", fromlist=["Rankings"]).Rankings.load(tmp_path / "run" / "rankings")
    settings = space.retrain.settings(space.seed)
    spec = space.retrain
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, settings.steps * spec.batch_size, "train")
    held = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, max(2, spec.batch_size), "heldout")
    cache = TeacherLogitCache.load(tmp_path / "run" / "teacher_logits")
    held_cache = TeacherLogitCache.compute(teacher.model, held, settings.top_k, settings.temperature, settings.batch_size, {"teacher_fingerprint": teacher.fingerprint})
    scorer = Scorer(space, teacher, token_blocks(spec.data, teacher.tokenizer, 32, 4, "heldout"))
    scores = {}
    for candidate in feasible:
        student = prune(teacher.model, rankings, candidate.arch)
        retrain(student, train, cache, settings, heldout_blocks=held, heldout_cache=held_cache, progress=False)
        scores[candidate.arch.to_dict().__repr__()] = scorer(student)[0]
    brute_best = min(scores, key=scores.get)
    best = json.loads((tmp_path / "run" / "best_arch.json").read_text())
    assert repr(best["architecture"]) == brute_best
    assert best["score_after"] == pytest.approx(scores[brute_best], rel=1e-4)
    assert study.best_trial.value == pytest.approx(scores[brute_best], rel=1e-4)


def test_every_trial_records_where_its_time_went_even_when_pruned(teacher, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    study = run_search(make_space(teacher, corpus), tmp_path / "run", n_trials=2, teacher=teacher)
    states = {t.number: t.state.name for t in study.trials}
    assert states[0] == "COMPLETE" and states[1] == "PRUNED"
    assert set(study.trials[0].user_attrs["timings"]) == {"prune", "score_before", "retrain", "score_after"}
    assert set(study.trials[1].user_attrs["timings"]) == {"prune", "score_before", "retrain"}
    assert all(v > 0 for t in study.trials[:2] for v in t.user_attrs["timings"].values())


def test_an_existing_study_is_not_reused_without_resume(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    with pytest.raises(MinitronError, match="--resume"):
        run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    study = run_search(space, tmp_path / "run", n_trials=1, resume=True, teacher=teacher)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2


def test_failed_trial_is_recorded_with_its_error_and_the_study_goes_on(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus, retrain=replace(make_space(teacher, corpus).retrain, lr=1e9))
    run_search(space, tmp_path / "run", n_trials=2, teacher=teacher)
    table = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert list(table.state[:2]) == ["FAIL", "FAIL"] and set(table.state[2:]) <= {"WAITING"}
    assert table.error[:2].str.contains("NaN|inf|non-finite", regex=True).all()


def test_search_killed_mid_trial_resumes_without_rerunning_finished_trials(teacher, corpus, tmp_path):
    space_file = tmp_path / "space.yaml"
    space = make_space(teacher, corpus)
    space_file.write_text(yaml.safe_dump({
        "teacher": str(teacher.path),
        "axes": {k: list(v) for k, v in AXES.items()},
        "budget": {"parameters": 40_000, "tolerance": 0.25},
        "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
        "retrain": {"tokens": 160 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "top_k": 32, "data": corpus, "eval_every": 2},
        "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
        "sampler": "grid",
    }))
    run = tmp_path / "run"
    command = [sys.executable, "-m", "minitron_nas.cli", "search", str(space_file), "--out", str(run)]
    env = {**os.environ, "MINITRON_NAS_HEARTBEAT_SECONDS": "1", "MINITRON_NAS_GRACE_SECONDS": "3"}
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.time() + 300
    storage = f"sqlite:///{run / 'study.db'}"
    while time.time() < deadline:  # wait until one trial finished and the next is running
        if (run / "trials.csv").is_file():  # written after the first trial
            states = {t.state.name for t in optuna.load_study(study_name="minitron", storage=storage).trials}
            if {"COMPLETE", "RUNNING"} <= states:
                break
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)  # at once: a trial must still be running (each retrains 160 steps)
    worker.wait()
    before = optuna.load_study(study_name="minitron", storage=storage)
    done_before = {t.number: t.params for t in before.trials if t.state.name == "COMPLETE"}
    assert done_before and any(t.state.name == "RUNNING" for t in before.trials)

    subprocess.run(command + ["--resume"], check=True, capture_output=True, env=env)
    after = optuna.load_study(study_name="minitron", storage=storage)
    finished = [t for t in after.trials if t.state.name in ("COMPLETE", "PRUNED")]  # the pruner may stop one early
    assert {n: after.trials[n].params for n in done_before} == done_before  # untouched
    candidates = [t.params["candidate"] for t in finished]
    assert sorted(candidates) == list(range(len(require_feasible(space, teacher.model.config))))  # each once
    killed = [t for t in after.trials if t.state.name == "FAIL"]
    assert len(killed) == 1 and killed[0].params["candidate"] in candidates  # failed by heartbeat, then retried
