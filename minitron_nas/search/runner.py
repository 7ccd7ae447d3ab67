"""The search: candidates sliced from the teacher, scored pruned, the best retrained briefly, compared at equal tokens.

The paper's best practice 9: candidate rankings only settle after a short distillation.
Rung 0 costs no training: every feasible candidate is pruned and scored on held-out KL to
the teacher (forward passes only), one Optuna trial each with the architecture as its
params, streamed with a progress bar. The best go on to the retraining rungs of
synchronous successive halving (halving.py): each retrains its candidates by KD on the
teacher's cached top-k logits, continuing a promoted candidate's warmup-stable-decay run
from its previous rung's stable state (`rung_states/`), and once the whole rung is done
the best 1/eta, and those within noise of the cut, go on. The last rung ranks its
candidates by the space's own score (`scoring.metric`, e.g. lm-eval); a tie there is broken
by `halving.TIE_RULE` and reported. `best_arch.json` is written only when the last rung is
complete.

The retraining rungs are queued Optuna trials naming their architecture; workers (several
processes or machines on one storage, sharing the run folder) pop them atomically. Whoever
finds a rung closed queues the next; the survivors depend only on the rung's values, so a
duplicate queueing by two workers is harmless: a trial whose (rung, architecture, data
order) already has an earlier live trial ends at once as a duplicate. A trial of a killed
worker is failed by heartbeat and retried once; a trial stopped by Ctrl-C is queued again.
Rung 0 runs in each worker over the candidates not yet stored (a rare duplicate is dropped).

Here: the worker's loop and the retraining rungs. Elsewhere in search/: the rung arithmetic
(halving.py), the queued trials and the study's opening (trials.py), rung 0 (rung0.py), the
rung states (rung_states.py), the study's readers (study.py) and the tables (outputs.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
import torch

from minitron_nas.config.space import SearchSpace
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import retrain
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import HeldoutKLD, HeldoutLoss, LmEval, Metric
from minitron_nas.files import RunFolder, make_dir
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.teachers import Teacher, load_config, load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, load_or_rank
from minitron_nas.search.candidates import Candidate, require_feasible
from minitron_nas.search.halving import Schedule, pilot_orders, plan_schedule, promote, tie_keys
from minitron_nas.search.lines import say, shown
from minitron_nas.search.outputs import write_outputs
from minitron_nas.search.rung0 import PrunedScoring
from minitron_nas.search.rung_states import forget_states, load_state, save_state
from minitron_nas.search.samplers import sampler_named
from minitron_nas.search.study import (
    heartbeat_seconds,
    measurement,
    open_storage,
    order_noise,
    quiet_heartbeats,
    recorded,
    rung0_keys,
    rung0_missing,
    rung_values,
    search_complete,
)
from minitron_nas.search.trials import (
    RUNNING,
    WAITING,
    arch_key,
    carried,
    distributions,
    earlier_live,
    open_study,
    queue_candidate,
    queue_proposals,
    queue_rung0,
    search_trials,
    work_trials,
)

__all__ = ["candidate_pool", "run_search", "schedule_for", "training_pool"]

POOL_FACTOR = 4  # training rows drawn from a pool this many times larger than one run needs, so seeds draw different rows
ORDER_SEED = 7919  # data order j > 0 of the pilot trains with seed + j * ORDER_SEED
OUTPUTS_EVERY = 30.0  # seconds between rewrites of the tables during rung 0


def candidate_pool(space: SearchSpace, feasible: list[Candidate]) -> list[Candidate]:
    """Rung 0's candidates: every feasible one, or the space's sampler's `trials` of them (see samplers.py)."""
    return sampler_named(space.sampler).pool(feasible, space.trials, space.seed)


def schedule_for(space: SearchSpace, n: int) -> Schedule:
    """The rungs for `n` candidates within the space's token budget (see halving.plan_schedule)."""
    spec, halving = space.retrain, space.halving
    return plan_schedule(
        n,
        full_steps=spec.total_steps,
        tokens_per_step=spec.batch_size * spec.seq_len * spec.grad_accum,
        eta=halving.eta,
        budget_tokens=halving.budget(space.distill.tokens),
        min_steps=halving.min_steps,
        final_candidates=halving.final_candidates,
        retrained=halving.retrained,
        within_noise=halving.within_noise,
        pilot_orders=halving.order_pilot,
    )


def training_pool(schedule: Schedule, spec) -> int:
    """Training blocks to draw: POOL_FACTOR x what the longest run reads, so that each seed's
    permutation reads a different subset (with exactly what a run reads, every seed would
    read the same rows, only in another order)."""
    needed = max(r.steps for r in schedule.rungs) * spec.batch_size * spec.grad_accum
    return max(1, POOL_FACTOR * needed)


@dataclass
class _Search:
    """One worker's view of the search: the study, the teacher and what is computed once."""

    space: SearchSpace
    out: Path
    study: optuna.Study
    teacher: Teacher
    rankings: Rankings
    schedule: Schedule
    train: torch.Tensor  # [N, S] the pool of training blocks
    cache: TeacherLogitCache  # teacher top-k of exactly `train`
    rung_metric: Metric
    score_metric: Metric
    rung0: PrunedScoring
    heartbeats: bool = True  # RDB storages beat; a journal file does not
    on_trial: Callable | None = None
    running: int | None = None  # the number of the trial this worker runs
    written: float = -math.inf  # when trials.csv and candidates.csv were last rewritten (time.monotonic)

    @property
    def last(self) -> int:
        return len(self.schedule.rungs) - 1

    @property
    def warmup(self) -> int:
        """One warm-up for every rung, so that each rung's run is a prefix of the next one's."""
        first = self.schedule.rungs[1].stable if self.last >= 1 else 1
        return self.space.retrain.warmup_steps if self.space.retrain.warmup_steps is not None else max(1, first // 3)

    def objective(self, trial: optuna.Trial) -> float:
        """A queued trial: a rung-0 work unit, or a candidate retrained for its rung and measured."""
        self.running, attrs = trial.number, trial.user_attrs
        if "rung0_chunk" in attrs:
            self.rung0.score_chunk(trial)
        if "rung" not in attrs:
            raise optuna.TrialPruned("no queued candidate left")  # another worker popped it first
        duplicate = earlier_live(self.study, trial)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            raise optuna.TrialPruned(f"duplicate of trial {duplicate}")
        rung, order = self.schedule.rungs[attrs["rung"]], attrs.get("order", 0)
        arch = Architecture(**{**attrs["architecture"], "layers": None})
        timings: dict[str, float] = {}
        try:
            for axis, distribution in distributions(self.space).items():
                trial.suggest_categorical(axis, distribution.choices)  # the queued params: recorded for optuna-dashboard
            start = time.perf_counter()
            student = prune(self.teacher.model, self.rankings, arch)
            resume = load_state(self.out, rung.index - 1, attrs["key"]) if order == 0 and rung.index > 1 else None
            timings["prune"] = time.perf_counter() - start
            settings = replace(
                self.space.retrain,
                seed=self.space.seed + order * ORDER_SEED,
                steps=rung.steps,
                warmup_steps=self.warmup,
                decay_steps=rung.decay,
                eval_every=0,
            )
            keep = order == 0  # the winner's last stable state is where the final distillation starts
            result = retrain(student, self.train, self.cache, settings, progress=False, resume=resume, snapshot_at=rung.stable if keep else None)
            timings["retrain"] = result.seconds
            if keep:
                save_state(self.out, rung.index, attrs, result.snapshot)
            trial.set_user_attr("continued_from_step", resume.step if resume else 0)
            trial.set_user_attr("tokens_trained", result.tokens_seen)
            trial.set_user_attr("retrain_curve", [list(p) for p in result.curve])
            value = self.rung_metric.measure(student)
            timings["measure"] = value.seconds
            _record(trial, recorded(value))
            score = None
            if rung.index == self.last and order == 0:
                score = value if self.score_metric is self.rung_metric else self.score_metric.measure(student)
                if score is not value:
                    timings["score"] = score.seconds
                _record(trial, {**recorded(score, "score"), "score_details": score.details})
            if rung.index == self.last and order == 0 and resume is None and rung.index > 1:
                say(f"trial {trial.number} · {attrs['key']}: no state of rung {rung.index - 1} found; retrained from the teacher's slice")
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            pilot = {"pilot": True} if attrs.get("pilot") else {}
            queue_candidate(self.study, rung.index, self.schedule, {**carried(attrs), **pilot}, trial.params, order)
            raise
        except Exception as err:
            trial.set_user_attr("error", f"{type(err).__name__}: {err}")
            say(f"trial {trial.number} · rung {rung.index} · {attrs['key']} · failed: {type(err).__name__}: {' '.join(str(err).split())}")
            raise
        finally:
            trial.set_user_attr("timings", {k: round(v, 3) for k, v in timings.items()})
        if not math.isfinite(value.value):
            raise MinitronError(f"candidate {attrs['key']} scored {value.value}: the retrained model diverged")
        extra = f" · {self.score_metric.name} {shown(score)}" if score is not None and score is not value else ""
        what = f"data order {order} (pilot)" if order else f"{rung.tokens:,} tokens"
        say(
            f"trial {trial.number} · rung {rung.index} ({what}) · {attrs['key']} · {attrs['params_total'] / 1e6:.1f}M · "
            f"{self.rung_metric.name} {shown(value)}{extra} · {sum(timings.values()):.0f} s"
        )
        return value.value

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        if trial is not None and "rung0_chunk" in trial.user_attrs and time.monotonic() - self.written < OUTPUTS_EVERY:
            return  # rung 0's tables are rewritten at most every OUTPUTS_EVERY seconds: each rewrite reads every trial
        self.written = time.monotonic()
        write_outputs(study, self.out, self.space, self.score_metric.maximize)
        if self.on_trial is not None:
            try:  # a view (the dashboard): it must never stop the search
                self.on_trial(study, trial)
            except Exception as err:
                logging.getLogger(__name__).warning("dashboard.html not rebuilt: %s: %s", type(err).__name__, err)

    def advance(self) -> bool:
        """Queue the next rung if the current one is closed; False when nothing is left to run."""
        trials = search_trials(self.study)
        current = max((t.user_attrs["rung"] for t in trials), default=0)
        if any(t.state in (WAITING, RUNNING) for t in trials if t.user_attrs["rung"] == current):
            return True  # another worker closed the rung since this one looked: its next rung is there to run
        if current >= self.last:
            if current >= 1:
                forget_states(self.out, current - 1, set())
            return False
        done = rung_values(self.study, current)
        following = self.schedule.rungs[current + 1]
        keep = min(following.candidates, len(done))
        if keep == 0:
            return False  # every candidate of the rung failed
        noise, dof = order_noise(self.study) if current >= 1 else (0.0, None)
        measured = {k: measurement(t) for k, t in done.items()}
        kept, near = promote(measured, keep, following.extra, noise, {k: tie_keys(t.user_attrs) for k, t in done.items()}, dof)
        cut = {"kept": kept, "within_noise": near, "order_stderr": noise, "order_dof": dof}
        self.study.set_user_attr(f"cut_{current}", cut)
        say(
            f"rung {current} closed: {len(done)} finished; the best {len(kept)} by {self.rung_metric.name} go on"
            + (f", and {len(near)} within one standard error of the cut" if near else "")
            + (f" (data-order SD {noise:.4f} on {dof} degree(s) of freedom included)" if noise else "")
        )
        for key in kept + near:
            queue_candidate(self.study, current + 1, self.schedule, carried(done[key].user_attrs), done[key].params)
        if current == 0 and self.schedule.pilot_orders:
            pilot, orders = done[kept[0]], pilot_orders(self.schedule, len(near))
            if orders > self.schedule.pilot_orders:
                say(
                    f"the {orders - self.schedule.pilot_orders} unused place(s) of rung 1 go to the data-order pilot: {orders} more data orders instead of {self.schedule.pilot_orders}"
                )
            for order in range(1, orders + 1):
                queue_candidate(self.study, 1, self.schedule, {**carried(pilot.user_attrs), "pilot": True}, pilot.params, order)
            self.study.set_user_attr("pilot", pilot.user_attrs["key"])
        if current >= 1:
            forget_states(self.out, current - 1, set())
            forget_states(self.out, current, set(kept + near))
        return True

    def _taken_for_dead(self) -> bool:
        """Whether this worker's trial was failed by another (its heartbeat lapsed): Optuna then refuses its tell."""
        failed = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
        return any(t.number == self.running for t in failed)

    def work(self, n_trials: int | None) -> None:
        """Run queued trials (rung-0 work units, then candidates), queue rungs as they close, wait for other workers' trials."""
        ran = 0
        try:
            while n_trials is None or ran < n_trials:
                if self.heartbeats:
                    optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: failed, retried once
                if work_trials(self.study, WAITING):
                    try:
                        self.study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self.after_trial], gc_after_trial=True)
                    except ValueError:  # Optuna's tell of a trial another worker already failed as stale
                        if not self._taken_for_dead():
                            raise
                        say("a trial of this worker was taken for dead (its heartbeat lapsed) and its retry queued; going on")
                    ran += 1
                    continue
                if work_trials(self.study, RUNNING):
                    if not self.heartbeats:
                        say("other workers' trials are still running; rerun with --resume once they finish")
                        return
                    time.sleep(heartbeat_seconds()[0])  # their rung closes when they finish (or are failed as stale)
                    continue
                if rung0_missing(self.study):  # a work unit lost twice (killed worker, retried and killed again): queue its rest
                    done = rung0_keys(self.study)
                    if sampler_named(self.space.sampler).adaptive and self.rung0.total < len(self.rung0.pool):
                        queue_proposals(self.study, self.rung0.total - len(done), requeued=True)
                    else:
                        queue_rung0(self.study, [k for k in self.rung0.pool if k not in done], requeued=True)
                    continue
                if self.rung0.active:  # rung 0 just ended in this worker: its tables and views now
                    self.rung0.finish()
                    self.after_trial(self.study, None)
                if not self.advance():
                    return
        finally:
            self.rung0.close()


def _record(trial: optuna.Trial, attrs: dict) -> None:
    for name, value in attrs.items():
        trial.set_user_attr(name, value)


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
    """Run (or resume) the search; writes study.db, trials.csv, candidates.csv, and best_arch.json
    once the last rung is complete. `n_trials` bounds this call's trials (rung 0's included): a
    search stopped by it is unfinished, and the same call again goes on with it.

    `on_trial(study, trial)` is called after every retraining trial and after rung 0 (the
    run recipe rebuilds the dashboard there).
    """
    heartbeat_seconds()  # a bad MINITRON_NAS_*_SECONDS setting is refused before anything is written
    out = make_dir(Path(out))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines and progress bar instead
    if teacher is None:
        require_feasible(space, load_config(space.teacher))  # an infeasible budget fails before the weights load
        teacher = load_teacher(space.teacher, space.device.device, space.device.dtype)
    feasible = require_feasible(space, teacher.model.config)
    pool = candidate_pool(space, feasible)
    schedule = schedule_for(space, sampler_named(space.sampler).size(feasible, space.trials))
    if schedule.rungs[-1].index == 0 and space.scoring.metric != space.halving.rung_metric:
        raise MinitronError(
            f"with halving.retrained: 0 the search ranks on the pruned {space.halving.rung_metric} only: set scoring.metric to "
            f"{space.halving.rung_metric}, or retrain some candidates"
        )
    store = open_storage(storage, out)
    study = open_study(space, store, storage or RunFolder(out).study_db, resume, teacher.fingerprint, pool, schedule)
    say(f"search ({'resumed' if study.user_attrs.get('resumed') else 'new study'}): {len(pool)} candidates of {len(feasible)} feasible; {schedule.describe()}")
    rankings = _rankings(teacher, space, out)
    spec = space.retrain
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, training_pool(schedule, spec), "train")
    meta = {"teacher_fingerprint": teacher.fingerprint}
    cache = TeacherLogitCache.load_or_build(teacher.model, train, spec.top_k, spec.temperature, spec.batch_size, RunFolder(out).teacher_logits, meta)
    scoring = space.scoring
    heldout = token_blocks(spec.data, teacher.tokenizer, scoring.seq_len, scoring.heldout_samples, "heldout")
    heldout_cache = TeacherLogitCache.compute(teacher.model, heldout, spec.top_k, spec.temperature, spec.batch_size, meta)
    rung_metric = _metric(space.halving.rung_metric, space, teacher, heldout, heldout_cache)
    score_metric = rung_metric if scoring.metric == space.halving.rung_metric else _metric(scoring.metric, space, teacher, heldout, heldout_cache)
    heartbeats = isinstance(store, optuna.storages.RDBStorage)
    rung0 = PrunedScoring(
        space, study, teacher, rankings, rung_metric, {arch_key(c.arch): c for c in pool}, schedule.rungs[0].candidates, len(schedule.rungs) == 1
    )
    search = _Search(space, out, study, teacher, rankings, schedule, train, cache, rung_metric, score_metric, rung0, heartbeats, on_trial)
    with quiet_heartbeats():  # fail_stale_trials, here and inside optimize
        search.work(n_trials)
    write_outputs(study, out, space, score_metric.maximize)
    if n_trials is None and not search_complete(study) and not search_trials(study, WAITING, RUNNING):
        failed = search_trials(study, optuna.trial.TrialState.FAIL)
        slow = [t for t in search_trials(study, optuna.trial.TrialState.PRUNED) if t.user_attrs.get("too_slow")]
        first = next((t.user_attrs["error"] for t in failed if t.user_attrs.get("error")), "no error recorded")
        first = " ".join(first.split())
        why = f"{len(failed)} trials failed; first: {first}" if failed else "every candidate was stopped by latency.min_decode_tokens_per_s"
        if failed and slow:
            why += f"; {len(slow)} stopped as too slow"
        raise MinitronError(f"no candidate finished the search ({why}): see {out / 'trials.csv'}")
    return study
