"""The search on a tiny random teacher: rungs, survivors, budget, resume, kill and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import optuna
import pandas as pd
import pytest
import sqlalchemy
import yaml
from helpers import byte_tokenizer, tiny_model

from minitron_nas import search
from minitron_nas.data import token_blocks
from minitron_nas.errors import MinitronError
from minitron_nas.export import save_model
from minitron_nas.metrics import HeldoutLoss, Measurement, Metric
from minitron_nas.pruning import prune
from minitron_nas.ranking import Rankings
from minitron_nas.search import candidate_pool, run_search, schedule_for
from minitron_nas.settings import RankSettings, RetrainSettings
from minitron_nas.space import Budget, HalvingSpec, ScoringSpec, SearchSpace, require_feasible
from minitron_nas.teacher_cache import TeacherLogitCache
from minitron_nas.teachers import Teacher, load_teacher
from minitron_nas.trainer import RetrainResult, retrain

AXES = {"hidden_size": (32, 48), "intermediate_size": (48, 64, 96), "heads_per_group": (1, 3), "num_key_value_heads": (2,), "num_hidden_layers": (2, 3, 4)}


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
        ranking=RankSettings(data=corpus, samples=8, seq_len=32),
        retrain=RetrainSettings(tokens=8 * 4 * 32, batch_size=4, seq_len=32, lr=3e-3, top_k=32, data=corpus),
        scoring=ScoringSpec(metric="heldout_loss", heldout_samples=6, seq_len=32),
        halving=HalvingSpec(eta=2, rung_metric="kld"),
        sampler="grid",
    )
    return replace(space, **changes)


def finished(study: optuna.Study) -> pd.DataFrame:
    rows = [
        {"number": t.number, "rung": t.user_attrs["rung"], "key": t.user_attrs["key"], "value": t.user_attrs.get("value"), "state": t.state.name}
        for t in study.trials
        if "rung" in t.user_attrs and "duplicate_of" not in t.user_attrs
    ]
    return pd.DataFrame(rows)


def test_rungs_keep_the_best_at_equal_tokens_and_the_winner_is_the_brute_force_best(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    pool = candidate_pool(space, require_feasible(space, teacher.model.config))
    schedule = schedule_for(space, len(pool))
    assert len(pool) >= 8 and len(schedule.rungs) >= 3
    study = run_search(space, tmp_path / "run", teacher=teacher)
    done = finished(study)
    assert (done.state == "COMPLETE").all()
    for rung in schedule.rungs:  # each rung retrained exactly its planned candidates, once each
        at = done[done.rung == rung.index]
        assert len(at) == rung.candidates and at.key.is_unique
    for a, b in zip(schedule.rungs, schedule.rungs[1:]):
        at_a = done[done.rung == a.index].sort_values("value")
        assert set(done[done.rung == b.index].key) == set(at_a.key[: b.candidates])  # the best go on

    # Brute force outside the study: rung 0 of every candidate, and the last rung's winner.
    run = tmp_path / "run"
    rankings = Rankings.load(run / "rankings")
    spec = space.retrain
    base = replace(spec, seed=space.seed)
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, max(r.steps for r in schedule.rungs) * spec.batch_size, "train")
    cache = TeacherLogitCache.load(run / "teacher_logits")
    heldout = token_blocks(spec.data, teacher.tokenizer, 32, 6, "heldout")

    def score(arch, steps):
        student = prune(teacher.model, rankings, arch)
        retrain(student, train, cache, replace(base, steps=steps, warmup_steps=max(1, steps // 10), eval_every=0), progress=False)
        return HeldoutLoss(heldout, spec.batch_size).measure(student).value

    last = schedule.rungs[-1]
    finals = {t.user_attrs["key"]: t for t in study.trials if t.user_attrs.get("rung") == last.index}
    brute = {key: score(search.Architecture(**{**t.user_attrs["architecture"], "layers": None}), last.steps) for key, t in finals.items()}
    best = json.loads((run / "best_arch.json").read_text())
    assert best["key"] == min(brute, key=brute.get)
    assert best["score"] == pytest.approx(brute[best["key"]], rel=1e-4)
    assert best["score_stderr"] > 0
    assert best["search_tokens"] == schedule.total_tokens  # every planned token, nothing else
    assert [r["finished"] for r in best["rungs"]] == [r.candidates for r in schedule.rungs]
    table = pd.read_csv(run / "trials.csv")
    assert {"rung", "tokens", "value", "stderr", "tokens_trained", "seconds"} <= set(table.columns)
    assert (table.stderr > 0).all() and (table.tokens_trained == table.tokens).all()
    candidates = pd.read_csv(run / "candidates.csv")
    assert len(candidates) == len(pool) and candidates.best.sum() == 1  # every candidate, at its last rung


def test_the_search_stays_within_a_token_budget(teacher, corpus, tmp_path):
    n = len(candidate_pool(make_space(teacher, corpus), require_feasible(make_space(teacher, corpus), teacher.model.config)))
    budget = n * 2 * 128 + 2 * 8 * 128  # too little for the deepest halving at full length
    space = make_space(teacher, corpus, halving=HalvingSpec(eta=2, budget_tokens=budget))
    run_search(space, tmp_path / "run", teacher=teacher)
    best = json.loads((tmp_path / "run" / "best_arch.json").read_text())
    assert best["search_tokens"] <= budget and best["budget_tokens"] == budget


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
    keys = [search._key(c.arch) for c in feasible]
    values = {k: v for k, v in zip(keys, random.Random(42).sample(range(100), len(keys)))}
    shuffled = random.Random(order_seed).sample(feasible, len(feasible))
    monkeypatch.setattr(search, "candidate_pool", lambda space, feasible: shuffled)
    monkeypatch.setattr(search, "_metric", lambda name, *args: KnownValues(values))
    monkeypatch.setattr(search, "retrain", lambda *a, **k: RetrainResult([], [], None, tokens_seen=1))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    schedule = schedule_for(space, len(feasible))
    total = sum(r.candidates for r in schedule.rungs)
    for i in range(total + workers):  # workers take one trial each in turn, each from its own folder
        run_search(space, tmp_path / f"worker{i % workers}", storage=url, n_trials=1, resume=i > 0, teacher=teacher)
    study = optuna.load_study(study_name="minitron", storage=url)
    done = finished(study)
    assert len(done) == total and (done.state == "COMPLETE").all()
    alive = set(keys)
    for rung in schedule.rungs:
        at = set(done[done.rung == rung.index].key)
        assert at == set(sorted(alive, key=values.get)[: rung.candidates])  # exactly the best of the previous rung
        alive = at


def test_a_resume_with_another_space_is_refused_naming_what_changed(teacher, corpus, tmp_path):
    space = make_space(teacher, corpus)
    run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    with pytest.raises(MinitronError, match="--resume"):
        run_search(space, tmp_path / "run", n_trials=1, teacher=teacher)
    changed = replace(space, retrain=replace(space.retrain, lr=1e-3))
    with pytest.raises(MinitronError, match=r"changed: retrain\)"):
        run_search(changed, tmp_path / "run", n_trials=1, resume=True, teacher=teacher)
    study = run_search(space, tmp_path / "run", n_trials=1, resume=True, teacher=teacher)
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2


def test_a_search_whose_every_candidate_fails_says_why_in_one_line(teacher, corpus, tmp_path, monkeypatch):
    def diverge(*args, **kwargs):
        raise MinitronError("loss became NaN/inf at step 1: lower the learning rate")

    monkeypatch.setattr(search, "retrain", diverge)
    with pytest.raises(MinitronError, match="no candidate finished the search") as err:
        run_search(make_space(teacher, corpus), tmp_path / "run", teacher=teacher)
    assert "\n" not in str(err.value)
    table = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert (table.state == "FAIL").all() and table.error.str.contains("NaN|inf", regex=True).all()
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
                "halving": {"eta": 2},
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
        if any(t.state.name == "COMPLETE" for t in trials) and any(t.state.name == "RUNNING" for t in trials):
            return
        time.sleep(0.05)
    raise AssertionError("no trial was caught running")


def _each_once(study: optuna.Study, space, teacher) -> None:
    done = finished(study)
    complete = done[done.state == "COMPLETE"]
    schedule = schedule_for(space, len(require_feasible(space, teacher.model.config)))
    assert not complete.duplicated(["rung", "key"]).any()
    assert [int((complete.rung == r.index).sum()) for r in schedule.rungs] == [r.candidates for r in schedule.rungs]


def test_a_worker_killed_mid_rung_loses_nothing_and_its_trial_is_retried_once(teacher, corpus, tmp_path):
    from minitron_nas.space import load_space

    space_file = _space_file(tmp_path, teacher, corpus, steps=320)  # rung 0: 80 steps, long enough to be caught by a 50 ms poll
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
    from minitron_nas.space import load_space

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
    from minitron_nas.space import LatencySpec

    space = make_space(teacher, corpus, latency=LatencySpec(measure=True, context=16, new_tokens=4, repeats=1))
    study = run_search(space, tmp_path / "run", teacher=teacher)
    done = [t for t in study.trials if t.state.name == "COMPLETE" and "rung" in t.user_attrs]
    assert all(t.user_attrs["decode_tokens_per_s"] > 0 and t.user_attrs["prefill_tokens_per_s"] > 0 for t in done)
    assert any(t.user_attrs["rung"] > 0 for t in done)  # later rungs inherit the rung-0 measurement
    table = pd.read_csv(tmp_path / "run" / "candidates.csv")
    assert table.decode_tokens_per_s.notna().all()

    too_fast = make_space(teacher, corpus, latency=LatencySpec(min_decode_tokens_per_s=1e12, context=16, new_tokens=4, repeats=1))
    with pytest.raises(MinitronError, match="no candidate finished the search"):
        run_search(too_fast, tmp_path / "slow", teacher=teacher)
    stopped = optuna.load_study(study_name="minitron", storage=f"sqlite:///{tmp_path / 'slow' / 'study.db'}").trials
    assert all(t.state.name == "PRUNED" and t.user_attrs.get("too_slow") for t in stopped if "rung" in t.user_attrs)
