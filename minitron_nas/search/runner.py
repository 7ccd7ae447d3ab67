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

Long (about 480 lines) because the rung loop, its multi-worker queue and its kill/retry
rules are one mechanism and read best together; the rung arithmetic is in halving.py, the
study readers in study.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna
import torch
from tqdm.auto import tqdm

from minitron_nas.config.space import AXES, SearchSpace
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import TrainState, retrain
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.latency import measure_latency
from minitron_nas.evaluate.metrics import HeldoutKLD, HeldoutLoss, LmEval, Measurement, Metric
from minitron_nas.files import RunFolder, make_dir, write_atomic, write_json_atomic, write_text_atomic
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.teachers import Teacher, load_config, load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, load_or_rank
from minitron_nas.search.candidates import Candidate, require_feasible
from minitron_nas.search.halving import Schedule, plan_schedule, promote
from minitron_nas.search.samplers import sampler_named
from minitron_nas.search.study import (
    HEARTBEAT_SECONDS,
    STUDY_NAME,
    candidates_table,
    decide,
    make_storage,
    measurement,
    order_stderr,
    rung0_keys,
    rung0_missing,
    rung_summary,
    rung_values,
    search_complete,
    search_cost,
    tie_order,
    trials_table,
)

__all__ = ["candidate_pool", "forget_states", "made_from", "read_state", "run_search", "schedule_for", "state_file", "training_pool", "write_outputs"]

# What a candidate's trials at later rungs inherit from its rung-0 trial.
CARRIED = ("architecture", "key", "params_total", "params_non_embedding", "pruned", "prefill_tokens_per_s", "decode_tokens_per_s")
WAITING, RUNNING, COMPLETE = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
POOL_FACTOR = 4  # training rows drawn from a pool this many times larger than one run needs, so seeds draw different rows
RUNG0_CHUNK = 64  # most rung-0 candidates per work unit: few queue writes, yet shared among workers
ORDER_SEED = 7919
OUTPUTS_EVERY = 30.0  # seconds between rewrites of the tables during rung 0  # data order j > 0 of the pilot trains with seed + j * ORDER_SEED


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


def training_pool(schedule: Schedule, spec) -> int:
    """Training blocks to draw: POOL_FACTOR x what the longest run reads, so that each seed's
    permutation reads a different subset (with exactly what a run reads, every seed would
    read the same rows, only in another order)."""
    needed = max(r.steps for r in schedule.rungs) * spec.batch_size * spec.grad_accum
    return max(1, POOL_FACTOR * needed)


def _key(arch: Architecture) -> str:
    return f"{arch.hidden_size}/{arch.intermediate_size}/{arch.num_attention_heads}:{arch.num_key_value_heads}/{arch.num_hidden_layers}"


def _params(space: SearchSpace, arch: Architecture) -> dict[str, int]:
    """The architecture as Optuna params, one per axis of the space (what optuna-dashboard plots)."""
    values = {**arch.to_dict(), "heads_per_group": arch.num_attention_heads // arch.num_key_value_heads}
    return {axis: values[axis] for axis in AXES if axis in space.axes}


def _distributions(space: SearchSpace) -> dict[str, optuna.distributions.CategoricalDistribution]:
    return {axis: optuna.distributions.CategoricalDistribution(tuple(space.axes[axis])) for axis in AXES if axis in space.axes}


def state_file(out: Path, rung: int, key: str) -> Path:
    """A retrained candidate's stable state after `rung` (weights and AdamW state)."""
    return RunFolder(out).rung_states / f"rung{rung}-{key.replace('/', '_').replace(':', '-')}.pt"


def _queue(study: optuna.Study, rung: int, schedule: Schedule, candidate: dict, params: dict, order: int = 0) -> None:
    """A waiting trial naming its architecture, rung and data order (no index into any list)."""
    r = schedule.rungs[rung]
    study.enqueue_trial(params, user_attrs={**candidate, "rung": rung, "order": order, "steps": r.steps, "tokens": r.tokens}, skip_if_exists=False)


def _candidate_attrs(c: Candidate) -> dict:
    return {"architecture": c.arch.to_dict(), "key": _key(c.arch), "params_total": c.total, "params_non_embedding": c.non_embedding}


def open_study(space: SearchSpace, store, where, resume: bool, teacher_fingerprint: str, pool: list[Candidate], schedule: Schedule) -> optuna.Study:
    """Create the study and queue rung 0, or reopen it (refused if made from another search)."""
    exists = STUDY_NAME in [s.study_name for s in optuna.get_all_study_summaries(store)]
    if exists and not resume:
        raise MinitronError(f"a study already exists in '{where}': pass --resume or choose another --out")
    study = optuna.create_study(
        storage=store,
        study_name=STUDY_NAME,
        direction="minimize",  # the rung metrics (kld, heldout_loss) are lower-is-better
        sampler=optuna.samplers.RandomSampler(seed=space.seed),  # never consulted: every trial has its params
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
    study.set_user_attr("schedule", [{**asdict(r), "stable": r.stable} for r in schedule.rungs])
    study.set_user_attr("budget_tokens", schedule.budget_tokens)
    study.set_user_attr("rung0_candidates", schedule.rungs[0].candidates)
    _queue_rung0(study, [_key(c.arch) for c in pool])
    return study


def _states(study: optuna.Study, *states) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=states) if "rung" in t.user_attrs]


def _work_trials(study: optuna.Study, *states) -> list[optuna.trial.FrozenTrial]:
    """Candidates' trials and rung-0 work units."""
    return [t for t in study.get_trials(deepcopy=False, states=states) if "rung" in t.user_attrs or "rung0_chunk" in t.user_attrs]


def _queue_rung0(study: optuna.Study, keys: list[str], requeued: bool = False) -> None:
    """Rung 0's candidates as waiting work units of up to RUNG0_CHUNK, which workers pop like any trial."""
    size = max(1, min(RUNG0_CHUNK, math.ceil(len(keys) / RUNG0_CHUNK)))
    for i in range(0, len(keys), size):
        study.enqueue_trial({}, user_attrs={"rung0_chunk": keys[i : i + size], **({"requeued": True} if requeued else {})}, skip_if_exists=False)


def _earlier_live(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """An earlier trial of the same (rung, architecture, data order) that did not fail: this one is a duplicate."""
    key, rung, order = trial.user_attrs["key"], trial.user_attrs["rung"], trial.user_attrs.get("order", 0)
    for t in study.get_trials(deepcopy=False, states=(WAITING, RUNNING, COMPLETE)):
        a = t.user_attrs
        if t.number < trial.number and a.get("key") == key and a.get("rung") == rung and a.get("order", 0) == order and "duplicate_of" not in a:
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
    train: torch.Tensor  # [N, S] the pool of training blocks
    cache: TeacherLogitCache  # teacher top-k of exactly `train`
    rung_metric: Metric
    score_metric: Metric
    pool: dict[str, Candidate] = field(default_factory=dict)  # rung 0's candidates by key
    heartbeats: bool = True  # RDB storages beat; a journal file does not
    on_trial: Callable | None = None
    bar: tqdm | None = None  # rung 0's progress
    rung0: dict = field(default_factory=lambda: {"scored": 0, "forward": 0.0, "seconds": 0.0})
    written: float = -math.inf  # when trials.csv and candidates.csv were last rewritten (time.monotonic)

    @property
    def last(self) -> int:
        return len(self.schedule.rungs) - 1

    @property
    def warmup(self) -> int:
        """One warm-up for every rung, so that each rung's run is a prefix of the next one's."""
        first = self.schedule.rungs[1].stable if self.last >= 1 else 1
        return self.space.retrain.warmup_steps if self.space.retrain.warmup_steps is not None else max(1, first // 3)

    # ----------------------------------------------------------------------- rung 0

    def score_chunk(self, trial: optuna.Trial) -> None:
        """A rung-0 work unit: its candidates not stored yet, each scored pruned and stored as a trial of its own."""
        wanted = trial.user_attrs["rung0_chunk"]
        retried = trial.user_attrs.get("started") or trial.user_attrs.get("requeued")  # a retry copies the user attributes
        done = rung0_keys(self.study) if retried else set()  # a fresh unit's candidates are not stored yet: no O(n) read
        trial.set_user_attr("started", True)
        todo = [self.pool[k] for k in wanted if k not in done]
        try:
            self.score_pruned(todo)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            _queue_rung0(self.study, [k for k in wanted if k not in rung0_keys(self.study)], requeued=True)
            raise
        raise optuna.TrialPruned("a rung-0 work unit: its candidates are trials of their own")

    def score_pruned(self, candidates: list[Candidate]) -> None:
        """Rung 0: each candidate pruned, scored on the rung metric (forward passes only), stored with its params."""
        if self.bar is None:
            stored = len(rung0_keys(self.study))
            self.bar = tqdm(total=self.schedule.rungs[0].candidates, initial=stored, desc="rung 0: pruned", unit="candidate", dynamic_ncols=True)
        distributions = _distributions(self.space)
        for candidate in candidates:
            key = _key(candidate.arch)
            attrs, state, timings = {**_candidate_attrs(candidate), "rung": 0, "order": 0, "steps": 0, "tokens": 0}, COMPLETE, {}
            value = None
            begin = time.perf_counter()
            try:
                student = prune(self.teacher.model, self.rankings, candidate.arch)
                timings["prune"] = time.perf_counter() - begin
                if self.space.latency.active and not self._latency(attrs, student, timings):
                    state = optuna.trial.TrialState.PRUNED
                else:
                    m = self.rung_metric.measure(student)
                    timings["measure"] = m.seconds
                    attrs.update(value=m.value, stderr=m.stderr, per_item=m.per_item, pruned=m.value)
                    if self.last == 0:  # no retraining: rung 0 is the last rung, ranked on this value
                        attrs.update(score=m.value, score_stderr=m.stderr, score_per_item=m.per_item, score_details=m.details)
                    value = m.value
                    if not math.isfinite(m.value):
                        state, value, attrs["error"] = optuna.trial.TrialState.FAIL, None, f"scored {m.value}"
                del student
            except Exception as err:
                state = optuna.trial.TrialState.FAIL
                attrs["error"] = f"{type(err).__name__}: {err}"
                _say(f"rung 0 · {key} · failed: {type(err).__name__}: {' '.join(str(err).split())}")
            attrs["timings"] = {k: round(v, 3) for k, v in timings.items()}
            frozen = optuna.trial.create_trial(
                state=state, value=value, params=_params(self.space, candidate.arch), distributions=distributions, user_attrs=attrs
            )
            self.study.add_trial(frozen)
            self.rung0["scored"] += 1
            self.rung0["forward"] += timings.get("measure", 0.0)
            self.rung0["seconds"] += time.perf_counter() - begin
            self.bar.update(1)
            if value is not None:
                self.bar.set_postfix_str(f"{key} {self.rung_metric.name} {value:.4f}", refresh=False)

    def _rung0_done(self) -> None:
        """Close rung 0's progress bar and say what it cost this worker."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        n, seconds = self.rung0["scored"], self.rung0["seconds"]
        if n:
            _say(
                f"rung 0: {n} candidates scored pruned in {seconds:.0f} s ({60 * n / max(seconds, 1e-9):.1f} per minute; "
                f"{100 * (1 - self.rung0['forward'] / max(seconds, 1e-9)):.0f}% of the time outside the metric's forward passes)"
            )
            self.rung0["scored"] = 0

    def _latency(self, attrs: dict, student, timings: dict) -> bool:
        """Prefill/decode throughput on the run's device; False when too slow for the constraint."""
        spec = self.space.latency
        start = time.perf_counter()
        speed = measure_latency(student, spec.batch_size, spec.context, spec.new_tokens, spec.repeats)
        timings["latency"] = time.perf_counter() - start
        attrs.update({key: speed[key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s")})
        if spec.min_decode_tokens_per_s is not None and speed["decode_tokens_per_s"] < spec.min_decode_tokens_per_s:
            attrs["too_slow"] = True
            _say(
                f"rung 0 · {attrs['key']} · decodes {speed['decode_tokens_per_s']:.0f} tokens/s < latency.min_decode_tokens_per_s {spec.min_decode_tokens_per_s:g}: stopped"
            )
            return False
        return True

    # ----------------------------------------------------------------------- retraining rungs

    def objective(self, trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        if "rung0_chunk" in attrs:
            self.score_chunk(trial)
        if "rung" not in attrs:
            raise optuna.TrialPruned("no queued candidate left")  # another worker popped it first
        duplicate = _earlier_live(self.study, trial)
        if duplicate is not None:
            trial.set_user_attr("duplicate_of", duplicate)
            raise optuna.TrialPruned(f"duplicate of trial {duplicate}")
        rung, order = self.schedule.rungs[attrs["rung"]], attrs.get("order", 0)
        arch = Architecture(**{**attrs["architecture"], "layers": None})
        timings: dict[str, float] = {}
        try:
            for axis, distribution in _distributions(self.space).items():
                trial.suggest_categorical(axis, distribution.choices)  # the queued params: recorded for optuna-dashboard
            start = time.perf_counter()
            student = prune(self.teacher.model, self.rankings, arch)
            resume = self._load_state(rung.index - 1, attrs["key"]) if order == 0 and rung.index > 1 else None
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
                self._save_state(rung.index, attrs, result.snapshot)
            trial.set_user_attr("continued_from_step", resume.step if resume else 0)
            trial.set_user_attr("tokens_trained", result.tokens_seen)
            trial.set_user_attr("retrain_curve", [list(p) for p in result.curve])
            value = self.rung_metric.measure(student)
            timings["measure"] = value.seconds
            trial.set_user_attr("value", value.value)
            trial.set_user_attr("stderr", value.stderr)
            trial.set_user_attr("per_item", value.per_item)
            score = None
            if rung.index == self.last and order == 0:
                score = value if self.score_metric is self.rung_metric else self.score_metric.measure(student)
                if score is not value:
                    timings["score"] = score.seconds
                trial.set_user_attr("score", score.value)
                trial.set_user_attr("score_stderr", score.stderr)
                trial.set_user_attr("score_per_item", score.per_item)
                trial.set_user_attr("score_details", score.details)
            if rung.index == self.last and order == 0 and resume is None and rung.index > 1:
                _say(f"trial {trial.number} · {attrs['key']}: no state of rung {rung.index - 1} found; retrained from the teacher's slice")
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            carried = {k: attrs[k] for k in CARRIED if k in attrs}
            _queue(self.study, rung.index, self.schedule, {**carried, **({"pilot": True} if attrs.get("pilot") else {})}, trial.params, order)
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
        what = f"data order {order} (pilot)" if order else f"{rung.tokens:,} tokens"
        _say(
            f"trial {trial.number} · rung {rung.index} ({what}) · {attrs['key']} · {attrs['params_total'] / 1e6:.1f}M · "
            f"{self.rung_metric.name} {_fmt(value)}{extra} · {sum(timings.values()):.0f} s"
        )
        return value.value

    def _load_state(self, rung: int, key: str) -> TrainState | None:
        """The candidate's stable state after `rung`; None (retrain from the slice) when it is gone."""
        saved = read_state(state_file(self.out, rung, key))
        return None if saved is None else TrainState(int(saved["step"]), saved["model"], saved["optimizer"])

    def _save_state(self, rung: int, attrs: dict, state: TrainState) -> None:
        path = state_file(self.out, rung, attrs["key"])
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {"architecture": attrs["architecture"], "step": state.step, "model": state.model, "optimizer": state.optimizer}
        write_atomic(path, lambda tmp: torch.save(saved, tmp))

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
        trials = _states(self.study, WAITING, RUNNING, COMPLETE, optuna.trial.TrialState.FAIL, optuna.trial.TrialState.PRUNED)
        current = max((t.user_attrs["rung"] for t in trials), default=0)
        if current >= self.last:
            if current >= 1:
                forget_states(self.out, current - 1, set())
            return False
        done = rung_values(self.study, current)
        following = self.schedule.rungs[current + 1]
        keep = min(following.candidates, len(done))
        if keep == 0:
            return False  # every candidate of the rung failed
        noise = order_stderr(self.study) if current >= 1 else 0.0
        measured = {k: measurement(t) for k, t in done.items()}
        kept, near = promote(measured, keep, following.extra, noise, {k: tie_order(t) for k, t in done.items()})
        cut = {"kept": kept, "within_noise": near, "order_stderr": noise}
        self.study.set_user_attr(f"cut_{current}", cut)
        _say(
            f"rung {current} closed: {len(done)} finished; the best {len(kept)} by {self.rung_metric.name} go on"
            + (f", and {len(near)} within one standard error of the cut" if near else "")
            + (f" (data-order SD {noise:.4f} included)" if noise else "")
        )
        for key in kept + near:
            attrs = done[key].user_attrs
            _queue(self.study, current + 1, self.schedule, {k: attrs[k] for k in CARRIED if k in attrs}, done[key].params)
        if current == 0 and self.schedule.pilot_orders:
            attrs = done[kept[0]].user_attrs
            for order in range(1, self.schedule.pilot_orders + 1):
                _queue(self.study, 1, self.schedule, {**{k: attrs[k] for k in CARRIED if k in attrs}, "pilot": True}, done[kept[0]].params, order)
            attrs = {k: attrs[k] for k in CARRIED if k in attrs}
            self.study.set_user_attr("pilot", attrs["key"])
        if current >= 1:
            forget_states(self.out, current - 1, set())
            forget_states(self.out, current, set(kept + near))
        return True

    def work(self, n_trials: int | None) -> None:
        """Run queued trials (rung-0 work units, then candidates), queue rungs as they close, wait for other workers' trials."""
        ran = 0
        try:
            while n_trials is None or ran < n_trials:
                if self.heartbeats:
                    optuna.storages.fail_stale_trials(self.study)  # a dead worker's trial: failed, retried once
                if _work_trials(self.study, WAITING):
                    try:
                        self.study.optimize(self.objective, n_trials=1, catch=(Exception,), callbacks=[self.after_trial], gc_after_trial=True)
                    except ValueError as err:  # Optuna's tell of a trial another worker already failed as stale
                        if "Cannot tell a" not in str(err):
                            raise
                        _say("a trial of this worker was taken for dead (its heartbeat lapsed) and its retry queued; going on")
                    ran += 1
                    continue
                if _work_trials(self.study, RUNNING):
                    if not self.heartbeats:
                        _say("other workers' trials are still running; rerun with --resume once they finish")
                        return
                    time.sleep(HEARTBEAT_SECONDS)  # their rung closes when they finish (or are failed as stale)
                    continue
                if rung0_missing(self.study):  # a work unit lost twice (killed worker, retried and killed again): queue its rest
                    _queue_rung0(self.study, [k for k in self.pool if k not in rung0_keys(self.study)], requeued=True)
                    continue
                if self.bar is not None:  # rung 0 just ended in this worker: its tables and views now
                    self._rung0_done()
                    self.after_trial(self.study, None)
                if not self.advance():
                    return
        finally:
            if self.bar is not None:
                self.bar.close()


def read_state(path: Path) -> dict | None:
    """A saved rung state ({architecture, step, model, optimizer}); None when there is none."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MinitronError(
            f"the rung state '{path}' is unreadable ({type(err).__name__}): delete it and rerun (the candidate is then trained from the teacher's slice)"
        ) from None


def forget_states(out: Path, rung: int, keep: set[str]) -> None:
    """Delete the rung's states of candidates not in `keep` (nothing will continue them)."""
    wanted = {state_file(out, rung, k) for k in keep}
    for path in RunFolder(out).rung_states.glob(f"rung{rung}-*.pt"):
        if path not in wanted:
            path.unlink(missing_ok=True)


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
    pipeline rebuilds the dashboard there).
    """
    out = make_dir(Path(out))
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines and progress bar instead
    if teacher is None:
        require_feasible(space, load_config(space.teacher))  # an infeasible budget fails before the weights load
        teacher = load_teacher(space.teacher, space.device.device, space.device.dtype)
    feasible = require_feasible(space, teacher.model.config)
    pool = candidate_pool(space, feasible)
    schedule = schedule_for(space, len(pool))
    if schedule.rungs[-1].index == 0 and space.scoring.metric != space.halving.rung_metric:
        raise MinitronError(
            f"with halving.retrained: 0 the search ranks on the pruned {space.halving.rung_metric} only: set scoring.metric to "
            f"{space.halving.rung_metric}, or retrain some candidates"
        )
    store = make_storage(storage, out)
    study = open_study(space, store, storage or RunFolder(out).study_db, resume, teacher.fingerprint, pool, schedule)
    _say(f"search ({'resumed' if study.user_attrs.get('resumed') else 'new study'}): {len(pool)} candidates of {len(feasible)} feasible; {schedule.describe()}")
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
    by_key = {_key(c.arch): c for c in pool}
    search = _Search(space, out, study, teacher, rankings, schedule, train, cache, rung_metric, score_metric, by_key, heartbeats, on_trial)
    search.work(n_trials)
    write_outputs(study, out, space, score_metric.maximize)
    if n_trials is None and not search_complete(study) and not _states(study, WAITING, RUNNING):
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
    """trials.csv and candidates.csv, each replaced atomically; best_arch.json once the search is complete."""
    table = trials_table(study)
    write_text_atomic(RunFolder(out).trials_csv, table.to_csv(index=False))
    candidates = candidates_table(study, maximize_score)
    write_text_atomic(RunFolder(out).candidates_csv, candidates.to_csv(index=False))
    cost = search_cost(study)
    study.set_user_attr("search_cost", cost)
    study.set_user_attr("score_maximize", maximize_score)
    if not search_complete(study):
        return
    decision = decide(study, maximize_score)
    if decision is None:
        return
    best, tied, rule = decision
    payload = {
        "architecture": best.user_attrs["architecture"],
        "key": best.user_attrs["key"],
        "params_total": best.user_attrs["params_total"],
        "params_non_embedding": best.user_attrs["params_non_embedding"],
        "metric": space.scoring.metric,
        "score": best.user_attrs["score"],
        "score_stderr": best.user_attrs.get("score_stderr"),
        "tied_with": tied,
        "tie_broken_by": rule,
        "rung_metric": space.halving.rung_metric,
        "trial": best.number,
        "rungs": rung_summary(study, maximize_score),
        "schedule": study.user_attrs.get("schedule"),
        "order_stderr": order_stderr(study),
        "search_tokens": cost["tokens"],
        "search_seconds": cost["seconds"],
        "budget_tokens": study.user_attrs.get("budget_tokens"),
        "state": str(state_file(out, best.user_attrs["rung"], best.user_attrs["key"])) if best.user_attrs["rung"] >= 1 else None,
        "space": space.source,
        "budget": asdict(space.budget),
    }
    write_json_atomic(RunFolder(out).best_arch, payload)
    if best.user_attrs["rung"] >= 1:
        forget_states(out, best.user_attrs["rung"], {best.user_attrs["key"]})
