"""The Optuna study over pruned candidates: slice, score, retrain briefly by KD, score again.

The paper's point (best practice 9) is that candidate rankings only settle after a short
distillation, so every trial retrains before its final score. The teacher stays loaded,
its top-k logits for the retraining batches are computed once per search and cached on
disk, and intermediate held-out values feed an Optuna pruner. Small feasible sets are
searched exhaustively (each candidate queued once as a trial that workers pop
atomically); large ones with TPE, or NSGA-II on (score,
parameters) so the Pareto front is real.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch

from .architecture import Architecture
from .data import token_blocks
from .distill import TeacherLogitCache, kd_loss, retrain
from .errors import MinitronError
from .files import make_dir
from .pipeline import RankSettings, rank
from .pruning import prune
from .ranking import Rankings
from .scoring import lm_loss
from .space import AXES, GRID_LIMIT, Candidate, SearchSpace, require_feasible
from .teachers import Teacher, load_config, load_teacher

STUDY_NAME = "minitron"


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) <= 0:
        raise MinitronError(f"{name}={raw!r} is not a whole number of seconds > 0: fix or unset it")
    return int(raw)


# A running trial beats every HEARTBEAT_SECONDS; one silent for GRACE_SECONDS is failed and
# retried once (its worker died). The environment overrides both (tests use a few seconds).
HEARTBEAT_SECONDS = _env_seconds("MINITRON_NAS_HEARTBEAT_SECONDS", 10)
GRACE_SECONDS = _env_seconds("MINITRON_NAS_GRACE_SECONDS", 30)
if GRACE_SECONDS <= HEARTBEAT_SECONDS:
    raise MinitronError(
        f"MINITRON_NAS_GRACE_SECONDS ({GRACE_SECONDS}) must exceed MINITRON_NAS_HEARTBEAT_SECONDS ({HEARTBEAT_SECONDS}): "
        "a live worker would be taken for dead; raise the grace period"
    )


@dataclass
class Scorer:
    """Scores a model; `maximize` says which way is better."""

    space: SearchSpace
    teacher: Teacher
    heldout: torch.Tensor
    teacher_heldout_logits: torch.Tensor | None = None

    @property
    def maximize(self) -> bool:
        return self.space.scoring.metric == "lm_eval"

    @torch.no_grad()
    def __call__(self, model) -> tuple[float, dict]:
        spec = self.space.scoring
        if spec.metric == "heldout_loss":
            value = lm_loss(model, self.heldout)
            return value, {"heldout_loss": value}
        if spec.metric == "kld":
            if self.teacher_heldout_logits is None:
                self.teacher_heldout_logits = self.teacher.model(input_ids=self.heldout, use_cache=False).logits
            logits = model(input_ids=self.heldout, use_cache=False).logits
            value = kd_loss(logits, self.teacher_heldout_logits, 1.0).item()
            return value, {"kld": value}
        from .scoring import lm_eval_scores  # lm-eval is slow to import; only load it when scoring with it

        scores = lm_eval_scores(
            model, self.teacher.tokenizer, list(spec.tasks), spec.data_dir, limit=spec.limit, batch_size=spec.batch_size
        )
        primary = [task.get("acc_norm", task.get("acc")) for task in scores.values()]
        primary = [p for p in primary if p is not None]
        if not primary:
            raise MinitronError("scoring.tasks have no accuracy metric to optimise: choose multiple-choice tasks")
        return sum(primary) / len(primary), scores


def _storage(url: str | None, out: Path):
    url = url or f"sqlite:///{(out / 'study.db').resolve()}"
    if url.startswith(("sqlite", "postgresql", "mysql")):
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
            engine_kwargs={"pool_pre_ping": True},  # a dropped connection (the server restarted) is replaced
        )
    if url.endswith((".log", ".journal")):
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    raise MinitronError(f"unsupported storage '{url}': use sqlite:///FILE, postgresql://..., or a FILE.journal path")


def _sampler(space: SearchSpace, feasible: list[Candidate]):
    """Grid: every candidate is queued once as a WAITING trial (popped atomically by workers)."""
    kind = space.sampler
    if kind == "auto":
        kind = "grid" if len(feasible) <= GRID_LIMIT else "nsga2"
    if kind == "grid":
        return kind, optuna.samplers.RandomSampler(seed=space.seed)  # never consulted: params are queued
    if kind == "tpe":
        return kind, optuna.samplers.TPESampler(seed=space.seed)
    return kind, optuna.samplers.NSGAIISampler(seed=space.seed)


def _queue_grid(study: optuna.Study, feasible: list[Candidate]) -> None:
    if study.user_attrs.get("grid_size") is None and not study.trials:
        study.set_user_attr("grid_size", len(feasible))
        for index in range(len(feasible)):
            study.enqueue_trial({"candidate": index})


def _waiting(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))


def _suggest(trial: optuna.Trial, kind: str, feasible: list[Candidate]) -> Candidate:
    """Grid: the candidate index. TPE/NSGA-II: a value per axis, snapped to the nearest feasible."""
    if kind == "grid":
        return feasible[trial.suggest_categorical("candidate", list(range(len(feasible))))]
    wanted = {}
    for axis in AXES:
        values = sorted({_axis(c.arch, axis) for c in feasible})
        wanted[axis] = trial.suggest_categorical(axis, values)

    def distance(c: Candidate) -> float:
        return sum(abs(_axis(c.arch, a) - wanted[a]) / max(1, wanted[a]) for a in AXES)

    return min(feasible, key=distance)


def _axis(arch: Architecture, axis: str) -> int:
    return arch.heads_per_group if axis == "heads_per_group" else getattr(arch, axis)


def _heartbeats(study: optuna.Study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def _await_other_workers(study: optuna.Study) -> int:
    """A grid worker whose queue ran dry stays while other workers' trials run.

    If one of those workers dies, its trial's heartbeat goes stale: it is failed and queued
    again (once), and this worker takes it. Returns how many trials wait to be run.
    """
    if not _heartbeats(study):
        return 0
    while not _waiting(study) and study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        time.sleep(HEARTBEAT_SECONDS)
        optuna.storages.fail_stale_trials(study)
    return _waiting(study)


def open_study(space: SearchSpace, out: Path, storage: str | None, resume: bool, maximize: bool, kind: str, sampler, feasible):
    directions = ["maximize" if maximize else "minimize"]
    if kind == "nsga2":
        directions.append("minimize")  # parameters
    store = _storage(storage, out)
    names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    if STUDY_NAME in names and not resume:
        raise MinitronError(f"a study already exists in '{storage or out / 'study.db'}': pass --resume or choose another --out")
    pruner = optuna.pruners.SuccessiveHalvingPruner() if len(directions) == 1 else optuna.pruners.NopPruner()
    study = optuna.create_study(
        storage=store, study_name=STUDY_NAME, directions=directions, sampler=sampler, pruner=pruner, load_if_exists=True
    )
    study.set_user_attr("space", space.source)
    study.set_user_attr("metric", space.scoring.metric)
    if kind == "grid":
        _queue_grid(study, feasible)
    return study


def _rankings(teacher: Teacher, space: SearchSpace, out: Path) -> Rankings:
    folder = out / "rankings"
    if (folder / "rankings.json").is_file():
        return Rankings.load(folder, teacher.fingerprint)
    spec = space.ranking
    return rank(teacher, RankSettings(data=spec.data, samples=spec.samples, seq_len=spec.seq_len), folder)


def run_search(
    space: SearchSpace,
    out: Path,
    storage: str | None = None,
    n_trials: int | None = None,
    resume: bool = False,
    teacher: Teacher | None = None,
    on_trial=None,
) -> optuna.Study:
    """Run (or resume) the study; writes study.db, trials.csv and best_arch.json into `out`."""
    out = make_dir(Path(out))
    if teacher is None:
        require_feasible(space, load_config(space.teacher))  # an infeasible budget fails before the weights load
        teacher = load_teacher(space.teacher)
    feasible = require_feasible(space, teacher.model.config)
    kind, sampler = _sampler(space, feasible)
    scorer = Scorer(space, teacher, token_blocks(space.retrain.data, teacher.tokenizer, space.scoring.seq_len, space.scoring.heldout_samples, "heldout"))
    study = open_study(space, out, storage, resume, scorer.maximize, kind, sampler, feasible)
    if resume and _heartbeats(study):
        optuna.storages.fail_stale_trials(study)  # a trial killed moments ago is caught later, by Optuna or at the end
    rankings = _rankings(teacher, space, out)
    settings = space.retrain.settings(space.seed)
    spec = space.retrain
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, settings.steps * spec.batch_size, "train")
    retrain_heldout = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, max(2, spec.batch_size), "heldout")
    meta = {"teacher_fingerprint": teacher.fingerprint}
    cache = TeacherLogitCache.load_or_build(
        teacher.model, train, settings.top_k, settings.temperature, settings.batch_size, out / "teacher_logits", meta
    )
    heldout_cache = TeacherLogitCache.compute(
        teacher.model, retrain_heldout, settings.top_k, settings.temperature, settings.batch_size, meta
    )

    def objective(trial: optuna.Trial):
        if kind == "grid" and "fixed_params" not in study._storage.get_trial_system_attrs(trial._trial_id):
            study.stop()  # the queue ran dry while this worker was asking: nothing left to try
            raise optuna.TrialPruned("grid exhausted")
        candidate = _suggest(trial, kind, feasible)
        trial.set_user_attr("architecture", candidate.arch.to_dict())
        trial.set_user_attr("params_total", candidate.total)
        trial.set_user_attr("params_non_embedding", candidate.non_embedding)
        duplicate = _evaluated(study, candidate, trial.number)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate.number)
            for key in ("score_before", "score_after"):
                trial.set_user_attr(key, duplicate.user_attrs.get(key))
            return duplicate.values if len(duplicate.values) > 1 else duplicate.values[0]
        timings = {}
        try:
            start = time.perf_counter()
            student = prune(teacher.model, rankings, candidate.arch)
            timings["prune"] = time.perf_counter() - start
            start = time.perf_counter()
            before, details_before = scorer(student)
            timings["score_before"] = time.perf_counter() - start
            trial.set_user_attr("score_before", before)
            trial.set_user_attr("details_before", details_before)

            def report(step: int, value: float) -> None:
                if len(study.directions) == 1:
                    trial.report(-value if scorer.maximize else value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"pruned at step {step}")

            start = time.perf_counter()
            try:  # a pruned trial's retraining counts too
                result = retrain(
                    student, train, cache, settings, heldout_blocks=retrain_heldout, heldout_cache=heldout_cache, report=report
                )
            finally:
                timings["retrain"] = time.perf_counter() - start
            trial.set_user_attr("retrain_curve", [list(p) for p in result.curve])
            trial.set_user_attr("retrain_eval_curve", [list(p) for p in result.eval_curve])
            start = time.perf_counter()
            after, details_after = scorer(student)
            timings["score_after"] = time.perf_counter() - start
            trial.set_user_attr("score_after", after)
            trial.set_user_attr("details_after", details_after)
        except optuna.TrialPruned:
            trial.set_user_attr("timings", timings)
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            trial.set_user_attr("timings", timings)
            raise
        trial.set_user_attr("timings", timings)
        if not math.isfinite(after):
            raise MinitronError(f"candidate scored {after}: the retrained model diverged")
        return (after, candidate.total) if len(study.directions) > 1 else after

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        write_outputs(study, out, space)
        try:  # the dashboard is a view: it must never stop the search
            from .report import build_dashboard

            build_dashboard(out, study=study)
        except Exception as err:  # noqa: BLE001
            logging.getLogger(__name__).warning("dashboard.html not rebuilt: %s: %s", type(err).__name__, err)
        if on_trial is not None:
            on_trial(study, trial)

    if kind == "grid":
        remaining = _waiting(study) if n_trials is None else min(n_trials, _waiting(study))
    else:
        remaining = n_trials if n_trials is not None else (space.trials or len(feasible))
    while remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=(Exception,), callbacks=[after_trial], gc_after_trial=True)
        remaining = _await_other_workers(study) if kind == "grid" and n_trials is None else 0
    write_outputs(study, out, space)
    return study


def _evaluated(study: optuna.Study, candidate: Candidate, number: int):
    target = candidate.arch.to_dict()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.number != number and t.user_attrs.get("architecture") == target and "duplicate_of" not in t.user_attrs:
            return t
    return None


def trials_table(study: optuna.Study) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.PRUNED and "architecture" not in t.user_attrs:
            continue  # a worker that found the grid queue empty
        arch = t.user_attrs.get("architecture") or {}
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                **{k: arch.get(k) for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")},
                "params_total": t.user_attrs.get("params_total"),
                "params_non_embedding": t.user_attrs.get("params_non_embedding"),
                "score_before": t.user_attrs.get("score_before"),
                "score_after": t.user_attrs.get("score_after"),
                "duplicate_of": t.user_attrs.get("duplicate_of"),
                "seconds": t.duration.total_seconds() if t.duration else None,
                "error": t.user_attrs.get("error"),
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty:
        counts = ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                  "params_total", "params_non_embedding", "duplicate_of"]
        table[counts] = table[counts].astype("Int64")  # integers, blank for queued trials
        table["kendall_tau_before_after"] = kendall_tau(table)
    return table


def kendall_tau(table: pd.DataFrame) -> float | None:
    """Rank agreement of scores before and after retraining over distinct finished candidates."""
    done = table[(table.state == "COMPLETE") & table.duplicate_of.isna()].dropna(subset=["score_before", "score_after"])
    if len(done) < 2:
        return None
    from scipy.stats import kendalltau

    tau = kendalltau(done.score_before, done.score_after).statistic
    return None if math.isnan(tau) else float(tau)


def best_trial(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
    if not complete:
        return None
    sign = 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1
    return max(complete, key=lambda t: sign * t.values[0])


def write_outputs(study: optuna.Study, out: Path, space: SearchSpace) -> None:
    """trials.csv and best_arch.json, each replaced atomically."""
    table = trials_table(study)
    tmp = out / ".trials.csv.partial"
    table.to_csv(tmp, index=False)
    tmp.replace(out / "trials.csv")
    best = best_trial(study)
    if best is None:
        return
    payload = {
        "architecture": best.user_attrs["architecture"],
        "params_total": best.user_attrs["params_total"],
        "params_non_embedding": best.user_attrs["params_non_embedding"],
        "score_before": best.user_attrs.get("score_before"),
        "score_after": best.user_attrs.get("score_after"),
        "metric": space.scoring.metric,
        "trial": best.number,
        "space": space.source,
        "budget": asdict(space.budget),
        "kendall_tau_before_after": kendall_tau(table),
    }
    tmp = out / ".best_arch.json.partial"
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(out / "best_arch.json")

