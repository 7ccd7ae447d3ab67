"""The search: candidates sliced from the teacher, retrained briefly by KD, compared at equal tokens.

The paper's best practice 9: candidate rankings only settle after a short distillation, so
every candidate is retrained before it is compared. The tokens are spent by synchronous
successive halving (halving.py): rung 0 retrains every candidate of the pool on a few
tokens; once the whole rung is done, the best 1/eta by a cheap precise metric (held-out
KL to the teacher, with per-block standard errors) go on to eta x the tokens; the last
rung retrains on `retrain.tokens` and ranks its candidates by the space's own score
(`scoring.metric`, e.g. lm-eval).

Each rung is a set of queued Optuna trials naming their architecture; workers (several
processes or machines on one storage) pop them atomically. Whoever finds a rung closed
(no trial of it waiting or running) queues the next rung; the survivors depend only on
the rung's values, so a duplicate queueing by two workers at once is harmless: a trial
whose (rung, architecture) already has an earlier live trial ends at once as a duplicate.
A trial of a killed worker is failed by heartbeat and retried once (Optuna's
`RetryHeartbeatStaleTrialCallback`); a trial stopped by Ctrl-C is queued again.

The teacher's top-k logits for the training blocks (of the longest rung) and for the
held-out blocks are computed once per search and cached, so a retraining step costs a
student step only.

Long (about 440 lines) because the rung loop, its multi-worker queue and its kill/retry
rules are one mechanism and read best together; the rung arithmetic is in halving.py, the
study readers in study.py, the samplers in samplers.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
import torch

from .architecture import Architecture
from .data import token_blocks
from .errors import MinitronError
from .files import RunFolder, make_dir, write_json_atomic, write_text_atomic
from .halving import Schedule, plan_schedule, promote
from .latency import measure_latency
from .metrics import HeldoutKLD, HeldoutLoss, LmEval, Measurement, Metric
from .pruning import prune
from .ranking import Rankings, load_or_rank
from .samplers import sampler_named
from .space import Candidate, SearchSpace, require_feasible
from .study import (
    HEARTBEAT_SECONDS,
    STUDY_NAME,
    candidates_table,
    final_ranking,
    make_storage,
    rung_summary,
    rung_values,
    search_cost,
    trials_table,
)
from .teacher_cache import TeacherLogitCache
from .teachers import Teacher, load_config, load_teacher
from .trainer import retrain

__all__ = ["candidate_pool", "made_from", "run_search", "schedule_for", "write_outputs"]

# What a candidate's trials at later rungs inherit from its rung-0 trial.
CARRIED = ("architecture", "key", "params_total", "params_non_embedding", "prefill_tokens_per_s", "decode_tokens_per_s")
WAITING, RUNNING, COMPLETE = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE


def candidate_pool(space: SearchSpace, feasible: list[Candidate]) -> list[Candidate]:
    """Rung 0's candidates, chosen by the space's sampler (see samplers.py)."""
    return sampler_named(space.sampler).pool(feasible, space.trials, space.seed)


def schedule_for(space: SearchSpace, n: int) -> Schedule:
    """The rungs for `n` candidates within the space's token budget (see halving.plan_schedule)."""
    spec = space.retrain
    return plan_schedule(
        n,
        full_steps=spec.total_steps,
        tokens_per_step=spec.batch_size * spec.seq_len * spec.grad_accum,
        eta=space.halving.eta,
        budget_tokens=space.halving.budget(space.distill.tokens),
        min_steps=space.halving.min_steps,
        final_candidates=space.halving.final_candidates,
    )


def made_from(space: SearchSpace, teacher_fingerprint: str) -> dict[str, str]:
    """What a study's results depend on, one short hash per part (a resume must match)."""
    parts = {
        "teacher": teacher_fingerprint,
        "axes": {k: list(v) for k, v in sorted(space.axes.items())},
        "budget": asdict(space.budget),
        "ranking": asdict(space.ranking),
        "retrain": asdict(space.retrain),
        "scoring": asdict(space.scoring),
        "halving": asdict(space.halving),
        "distill.tokens": space.distill.tokens,
        "sampler": [space.sampler, space.trials, space.seed],
    }
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:12] for k, v in parts.items()}


def _key(arch: Architecture) -> str:
    return f"{arch.hidden_size}/{arch.intermediate_size}/{arch.num_attention_heads}:{arch.num_key_value_heads}/{arch.num_hidden_layers}"


def _queue(study: optuna.Study, rung: int, schedule: Schedule, candidate: dict) -> None:
    """A waiting trial naming its architecture and rung (no index into any list)."""
    r = schedule.rungs[rung]
    study.enqueue_trial({}, user_attrs={**candidate, "rung": rung, "steps": r.steps, "tokens": r.tokens})


def _candidate_attrs(c: Candidate) -> dict:
    return {"architecture": c.arch.to_dict(), "key": _key(c.arch), "params_total": c.total, "params_non_embedding": c.non_embedding}


def open_study(space: SearchSpace, store, where, resume: bool, teacher_fingerprint: str, pool, schedule) -> optuna.Study:
    """Create the study and queue rung 0, or reopen it (refused if made from another search)."""
    exists = STUDY_NAME in [s.study_name for s in optuna.get_all_study_summaries(store)]
    if exists and not resume:
        raise MinitronError(f"a study already exists in '{where}': pass --resume or choose another --out")
    study = optuna.create_study(
        storage=store,
        study_name=STUDY_NAME,
        direction="minimize",  # the rung metrics (kld, heldout_loss) are lower-is-better
        sampler=optuna.samplers.RandomSampler(seed=space.seed),  # never consulted: every trial is queued
        pruner=optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    want = made_from(space, teacher_fingerprint)
    have = study.user_attrs.get("made_from")
    if have is not None:
        changed = [k for k in want if have.get(k) != want[k]]
        if changed:
            raise MinitronError(
                f"the study in '{where}' was made from another search (changed: {', '.join(changed)}): "
                "resume with the original space and teacher, or choose another --out"
            )
        study.set_user_attr("resumed", True)
        return study
    study.set_user_attr("made_from", want)
    study.set_user_attr("space", space.source)
    study.set_user_attr("metric", space.scoring.metric)
    study.set_user_attr("rung_metric", space.halving.rung_metric)
    study.set_user_attr("rungs", len(schedule.rungs))
    study.set_user_attr("schedule", [asdict(r) for r in schedule.rungs])
    study.set_user_attr("budget_tokens", schedule.budget_tokens)
    for candidate in pool:
        _queue(study, 0, schedule, _candidate_attrs(candidate))
    return study


def _states(study: optuna.Study, *states) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if "rung" in t.user_attrs]


def _earlier_live(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """An earlier trial of the same (rung, architecture) that did not fail: this one is a duplicate."""
    key, rung = trial.user_attrs["key"], trial.user_attrs["rung"]
    for t in study.get_trials(deepcopy=False, states=(WAITING, RUNNING, COMPLETE)):
        if t.number < trial.number and t.user_attrs.get("key") == key and t.user_attrs.get("rung") == rung:
            if "duplicate_of" not in t.user_attrs:
                return t.number
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _fmt(m: Measurement | None) -> str:
    if m is None:
        return "n/a"
    return f"{m.value:.4f}" + ("" if m.stderr is None else f" ± {m.stderr:.4f}")


@dataclass
class _Search:
    """One worker's view of the search: the study, the teacher and what is computed once."""

    space: SearchSpace
    out: Path
    study: optuna.Study
    teacher: Teacher
    rankings: Rankings
    schedule: Schedule
    train: torch.Tensor  # [N, S] training blocks of the longest rung
    cache: TeacherLogitCache  # teacher top-k of exactly `train`
    rung_metric: Metric
    score_metric: Metric
    heartbeats: bool = True  # RDB storages beat; a journal file does not
    on_trial: Callable | None = None

    @property
    def last(self) -> int:
        return len(self.schedule.rungs) - 1

    def objective(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        if "rung" not in attrs:
            raise optuna.TrialPruned("no queued candidate left")  # another worker popped it first
        duplicate = _earlier_live(self.study, trial)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            raise optuna.TrialPruned(f"duplicate of trial {duplicate}")
        rung = self.schedule.rungs[attrs["rung"]]
        arch = Architecture(**{**attrs["architecture"], "layers": None})
        timings: dict[str, float] = {}
        try:
            start = time.perf_counter()
            student = prune(self.teacher.model, self.rankings, arch)
            timings["prune"] = time.perf_counter() - start
            if rung.index == 0 and self.space.latency.active:
                self._latency(trial, student, timings)
            if rung.index == 0:
                before = self.rung_metric.measure(student)
                timings["before"] = before.seconds
                trial.set_user_attr("before", before.value)
                trial.set_user_attr("before_stderr", before.stderr)
            settings = replace(self.space.retrain, seed=self.space.seed, steps=rung.steps, eval_every=0)
            result = retrain(student, self.train, self.cache, settings, progress=False)
            timings["retrain"] = result.seconds
            trial.set_user_attr("tokens_trained", result.tokens_seen)
            trial.set_user_attr("retrain_curve", [list(p) for p in result.curve])
            value = self.rung_metric.measure(student)
            timings["measure"] = value.seconds
            trial.set_user_attr("value", value.value)
            trial.set_user_attr("stderr", value.stderr)
            trial.set_user_attr("per_item", value.per_item)
            score = None
            if rung.index == self.last:
                score = value if self.score_metric is self.rung_metric else self.score_metric.measure(student)
                if score is not value:
                    timings["score"] = score.seconds
                trial.set_user_attr("score", score.value)
                trial.set_user_attr("score_stderr", score.stderr)
                trial.set_user_attr("score_per_item", score.per_item)
                trial.set_user_attr("score_details", score.details)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            _queue(self.study, rung.index, self.schedule, {k: attrs[k] for k in CARRIED[:4]})
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            _say(f"trial {trial.number} · rung {rung.index} · {attrs['key']} · failed: {type(err).__name__}: {' '.join(str(err).split())}")
            raise
        finally:
            trial.set_user_attr("timings", {k: round(v, 3) for k, v in timings.items()})
        if not math.isfinite(value.value):
            raise MinitronError(f"candidate {attrs['key']} scored {value.value}: the retrained model diverged")
        extra = f" · {self.score_metric.name} {_fmt(score)}" if score is not None and score is not value else ""
        _say(
            f"trial {trial.number} · rung {rung.index} ({rung.tokens:,} tokens) · {attrs['key']} · {attrs['params_total'] / 1e6:.1f}M · "
            f"{self.rung_metric.name} {_fmt(value)}{extra} · {sum(timings.values()):.0f} s"
        )
        return value.value

    def _latency(self, trial: optuna.Trial, student, timings: dict) -> None:
        """Prefill/decode throughput on the run's device; too slow for the constraint: stopped here."""
        spec = self.space.latency
        start = time.perf_counter()
        speed = measure_latency(student, spec.batch_size, spec.context, spec.new_tokens, spec.repeats)
        timings["latency"] = time.perf_counter() - start
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
            trial.set_user_attr(key, speed[key])
        if spec.min_decode_tokens_per_s is not None and speed["decode_tokens_per_s"] < spec.min_decode_tokens_per_s:
            trial.set_user_attr("too_slow", True)
            _say(
                f"trial {trial.number} · {trial.user_attrs['key']} · decodes {speed['decode_tokens_per_s']:.0f} tokens/s "
                f"< latency.min_decode_tokens_per_s {spec.min_decode_tokens_per_s:g}: stopped"
            )
            raise optuna.TrialPruned("slower than latency.min_decode_tokens_per_s")

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        write_outputs(study, self.out, self.space, self.score_metric.maximize)
        if self.on_trial is not None:
            try:  # a view (the dashboard): it must never stop the search
                self.on_trial(study, trial)
            except Exception as err:
                logging.getLogger(__name__).warning("dashboard.html not rebuilt: %s: %s", type(err).__name__, err)

    def advance(self) -> bool:
        """Queue the next rung if the current one is closed; False when nothing is left to run."""
        trials = _states(self.study, WAITING, RUNNING, COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
        current = max((t.user_attrs["rung"] for t in trials), default=0)
        if current >= self.last:
            return False
        done = rung_values(self.study, current)
        keep = min(self.schedule.rungs[current + 1].candidates, len(done))
        if keep == 0:
            return False  # every candidate of the rung failed
        survivors = promote({k: t.user_attrs["value"] for k, t in done.items()}, keep, maximize=False)
        _say(f"rung {current} closed: {len(done)} finished, the best {keep} by {self.rung_metric.name} go on")
        for key in survivors:
            attrs = done[key].user_attrs
            _queue(self.study, current + 1, self.schedule, {k: attrs[k] for k in CARRIED if k in attrs})
        return True

    def work(self, n_trials: int | None) -> None:
        """Run queued trials, queue rungs as they close, wait for other workers' trials."""
        heartbeats = self.heartbeats
        ran = 0
        while n_trials is None or ran < n_trials:
            if heartbeats:
                optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: failed, retried once
            if _states(self.study, WAITING):
                try:
                    self.study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self.after_trial], gc_after_trial=True)
                except ValueError as err:  # Optuna's tell of a trial another worker already failed as stale
                    if "Cannot tell a" not in str(err):
                        raise
                    _say("a trial of this worker was taken for dead (its heartbeat lapsed) and its retry queued; going on")
                ran += 1
                continue
            if _states(self.study, RUNNING):
                if not heartbeats:
                    _say("other workers' trials are still running; rerun with --resume once they finish")
                    return
                time.sleep(HEARTBEAT_SECONDS)  # their rung closes when they finish (or are failed as stale)
                continue
            if not self.advance():
                return


def _rankings(teacher: Teacher, space: SearchSpace, out: Path) -> Rankings:
    return load_or_rank(teacher, space.ranking, RunFolder(out).rankings)


def _metric(name: str, space: SearchSpace, teacher: Teacher, heldout: torch.Tensor, heldout_cache: TeacherLogitCache) -> Metric:
    if name == "kld":
        return HeldoutKLD(heldout, heldout_cache, space.retrain.batch_size)
    if name == "heldout_loss":
        return HeldoutLoss(heldout, space.retrain.batch_size)
    return LmEval(space.scoring, teacher.tokenizer)


def run_search(
    space: SearchSpace,
    out: Path,
    storage: str | None = None,
    n_trials: int | None = None,
    resume: bool = False,
    teacher: Teacher | None = None,
    on_trial: Callable | None = None,
) -> optuna.Study:
    """Run (or resume) the search; writes study.db, trials.csv, candidates.csv and best_arch.json into `out`.

    `on_trial(study, trial)` is called after every trial (the pipeline rebuilds the dashboard there).
    """
    out = make_dir(Path(out))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # one line of our own per trial instead
    if teacher is None:
        require_feasible(space, load_config(space.teacher))  # an infeasible budget fails before the weights load
        teacher = load_teacher(space.teacher, space.device.device, space.device.dtype)
    feasible = require_feasible(space, teacher.model.config)
    pool = candidate_pool(space, feasible)
    schedule = schedule_for(space, len(pool))
    store = make_storage(storage, out)
    study = open_study(space, store, storage or RunFolder(out).study_db, resume, teacher.fingerprint, pool, schedule)
    _say(f"search ({'resumed' if study.user_attrs.get('resumed') else 'new study'}): {len(pool)} candidates of {len(feasible)} feasible; {schedule.describe()}")
    rankings = _rankings(teacher, space, out)
    spec = space.retrain
    longest = max(r.steps for r in schedule.rungs)
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, longest * spec.batch_size * spec.grad_accum, "train")
    meta = {"teacher_fingerprint": teacher.fingerprint}
    cache = TeacherLogitCache.load_or_build(teacher.model, train, spec.top_k, spec.temperature, spec.batch_size, RunFolder(out).teacher_logits, meta)
    scoring = space.scoring
    heldout = token_blocks(spec.data, teacher.tokenizer, scoring.seq_len, scoring.heldout_samples, "heldout")
    heldout_cache = TeacherLogitCache.compute(teacher.model, heldout, spec.top_k, spec.temperature, spec.batch_size, meta)
    rung_metric = _metric(space.halving.rung_metric, space, teacher, heldout, heldout_cache)
    score_metric = rung_metric if scoring.metric == space.halving.rung_metric else _metric(scoring.metric, space, teacher, heldout, heldout_cache)
    heartbeats = isinstance(store, optuna.storages.RDBStorage)
    search = _Search(space, out, study, teacher, rankings, schedule, train, cache, rung_metric, score_metric, heartbeats, on_trial)
    search.work(n_trials)
    write_outputs(study, out, space, score_metric.maximize)
    if n_trials is None and not final_ranking(study, score_metric.maximize) and not _states(study, WAITING, RUNNING):
        failed = _states(study, optuna.trial.TrialState.FAIL)
        slow = [t for t in _states(study, optuna.trial.TrialState.PRUNED) if t.user_attrs.get("too_slow")]
        first = next((t.user_attrs["error"] for t in failed if t.user_attrs.get("error")), "no error recorded")
        first = " ".join(first.split())
        why = f"{len(failed)} trials failed; first: {first}" if failed else "every candidate was stopped by latency.min_decode_tokens_per_s"
        if failed and slow:
            why += f"; {len(slow)} stopped as too slow"
        raise MinitronError(f"no candidate finished the search ({why}): see {out / 'trials.csv'}")
    return study


def write_outputs(study: optuna.Study, out: Path, space: SearchSpace, maximize_score: bool) -> None:
    """trials.csv, candidates.csv and best_arch.json, each replaced atomically."""
    table = trials_table(study)
    write_text_atomic(RunFolder(out).trials_csv, table.to_csv(index=False))
    candidates = candidates_table(study, maximize_score)
    write_text_atomic(RunFolder(out).candidates_csv, candidates.to_csv(index=False))
    cost = search_cost(study)
    study.set_user_attr("search_cost", cost)
    study.set_user_attr("score_maximize", maximize_score)
    ranking = final_ranking(study, maximize_score)
    if not ranking:
        return
    best = ranking[0]
    tied = candidates[candidates.tied_with_best & ~candidates.best].key.tolist() if not candidates.empty else []
    payload = {
        "architecture": best.user_attrs["architecture"],
        "key": best.user_attrs["key"],
        "params_total": best.user_attrs["params_total"],
        "params_non_embedding": best.user_attrs["params_non_embedding"],
        "metric": space.scoring.metric,
        "score": best.user_attrs["score"],
        "score_stderr": best.user_attrs.get("score_stderr"),
        "tied_with": tied,
        "rung_metric": space.halving.rung_metric,
        "trial": best.number,
        "rungs": rung_summary(study, maximize_score),
        "schedule": study.user_attrs.get("schedule"),
        "search_tokens": cost["tokens"],
        "search_seconds": cost["seconds"],
        "budget_tokens": study.user_attrs.get("budget_tokens"),
        "space": space.source,
        "budget": asdict(space.budget),
    }
    write_json_atomic(RunFolder(out).best_arch, payload)
