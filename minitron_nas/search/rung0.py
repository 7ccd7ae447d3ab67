"""Rung 0: every candidate pruned and scored on the rung metric, forward passes only.

Rung 0 costs no training, so it looks at the whole pool. Its candidates come in work units
(trials.queue_rung0) that any worker pops, or, with an adaptive sampler (TPE), as units of
proposals, each candidate proposed from every score stored so far; each candidate becomes a finished trial of its
own with the architecture as its params, streamed with a progress bar. A unit interrupted
by Ctrl-C queues its unscored rest again; a retried unit skips what is already stored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import optuna
from tqdm.auto import tqdm

from minitron_nas.config.space import SearchSpace
from minitron_nas.evaluate.latency import measure_latency
from minitron_nas.evaluate.metrics import Metric
from minitron_nas.model.teachers import Teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings
from minitron_nas.search.candidates import Candidate
from minitron_nas.search.lines import say
from minitron_nas.search.samplers import sampler_named
from minitron_nas.search.study import recorded, rung0_keys, rung_values
from minitron_nas.search.trials import COMPLETE, arch_key, candidate_attrs, distributions, params_of, queue_proposals, queue_rung0

__all__ = ["PrunedScoring"]


@dataclass
class PrunedScoring:
    """One worker's share of rung 0, and what it cost."""

    space: SearchSpace
    study: optuna.Study
    teacher: Teacher
    rankings: Rankings
    metric: Metric  # the rung metric
    pool: dict[str, Candidate]  # rung 0's candidates by key
    total: int  # rung 0's candidates in all (the progress bar's length)
    final: bool  # no retraining rung: rung 0 is ranked on the space's score too
    bar: tqdm | None = None
    spent: dict = field(default_factory=lambda: {"scored": 0, "forward": 0.0, "seconds": 0.0})

    def score_chunk(self, trial: optuna.Trial) -> None:
        """A rung-0 work unit: its candidates not stored yet, each scored pruned and stored as a trial of its own."""
        if "rung0_propose" in trial.user_attrs:
            self.propose_chunk(trial)
        wanted = trial.user_attrs["rung0_chunk"]
        retried = trial.user_attrs.get("started") or trial.user_attrs.get("requeued")  # a retry copies the user attributes
        done = rung0_keys(self.study) if retried else set()  # a fresh unit's candidates are not stored yet: no O(n) read
        trial.set_user_attr("started", True)
        try:
            self.score([self.pool[k] for k in wanted if k not in done])
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            queue_rung0(self.study, [k for k in wanted if k not in rung0_keys(self.study)], requeued=True)
            raise
        raise optuna.TrialPruned("a rung-0 work unit: its candidates are trials of their own")

    def propose_chunk(self, trial: optuna.Trial) -> None:
        """An adaptive sampler's work unit: up to `rung0_propose` candidates, each proposed from every
        score stored so far (any worker's), then scored; never beyond rung 0's size."""
        trial.set_user_attr("started", True)
        sampler, axes = sampler_named(self.space.sampler), distributions(self.space)
        try:
            for _ in range(trial.user_attrs["rung0_propose"]):
                done = rung0_keys(self.study)
                if len(done) >= self.total:
                    break
                history = [(t.params, t.value) for t in rung_values(self.study, 0).values()]
                unscored = [c for key, c in self.pool.items() if key not in done]
                seed = self.space.seed * 100_003 + len(done)  # the same scores so far propose the same candidate
                self.score([sampler.propose(history, unscored, lambda c: params_of(self.space, c.arch), axes, seed)])
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            missing = self.total - len(rung0_keys(self.study))
            if missing > 0:
                queue_proposals(self.study, missing, requeued=True)
            raise
        raise optuna.TrialPruned("a rung-0 work unit: its candidates are trials of their own")

    def score(self, candidates: list[Candidate]) -> None:
        """Each candidate pruned, scored on the rung metric (forward passes only), stored with its params."""
        if self.bar is None:
            stored = len(rung0_keys(self.study))
            self.bar = tqdm(total=self.total, initial=stored, desc="rung 0: pruned", unit="candidate", dynamic_ncols=True)
        axes = distributions(self.space)
        for candidate in candidates:
            begin = time.perf_counter()
            key, attrs, timings = arch_key(candidate.arch), {**candidate_attrs(candidate), "rung": 0, "order": 0, "steps": 0, "tokens": 0}, {}
            state, value = self._measure(candidate, attrs, timings)
            attrs["timings"] = {k: round(v, 3) for k, v in timings.items()}
            frozen = optuna.trial.create_trial(state=state, value=value, params=params_of(self.space, candidate.arch), distributions=axes, user_attrs=attrs)
            self.study.add_trial(frozen)
            self.spent["scored"] += 1
            self.spent["forward"] += timings.get("measure", 0.0)
            self.spent["seconds"] += time.perf_counter() - begin
            self.bar.update(1)
            if value is not None:
                self.bar.set_postfix_str(f"{key} {self.metric.name} {value:.4f}", refresh=False)

    def _measure(self, candidate: Candidate, attrs: dict, timings: dict) -> tuple[optuna.trial.TrialState, float | None]:
        """(the trial's state, its value): scored, failed, or stopped as too slow; `attrs` and `timings` filled in."""
        begin = time.perf_counter()
        try:
            student = prune(self.teacher.model, self.rankings, candidate.arch)
            timings["prune"] = time.perf_counter() - begin
            if self.space.latency.active and not self._fast_enough(attrs, student, timings):
                return optuna.trial.TrialState.PRUNED, None
            m = self.metric.measure(student)
            timings["measure"] = m.seconds
            attrs.update(recorded(m), pruned=m.value)
            if self.final:
                attrs.update(recorded(m, "score"), score_details=m.details)
            if not math.isfinite(m.value):
                attrs["error"] = f"scored {m.value}"
                return optuna.trial.TrialState.FAIL, None
            return COMPLETE, m.value
        except Exception as err:
            attrs["error"] = f"{type(err).__name__}: {err}"
            say(f"rung 0 · {attrs['key']} · failed: {type(err).__name__}: {' '.join(str(err).split())}")
            return optuna.trial.TrialState.FAIL, None

    def _fast_enough(self, attrs: dict, student, timings: dict) -> bool:
        """Prefill/decode throughput on the run's device; False when too slow for the constraint."""
        spec = self.space.latency
        start = time.perf_counter()
        speed = measure_latency(student, spec.batch_size, spec.context, spec.new_tokens, spec.repeats)
        timings["latency"] = time.perf_counter() - start
        attrs.update({key: speed[key] for key in ("prefill_tokens_per_s", "decode_tokens_per_s")})
        if spec.min_decode_tokens_per_s is not None and speed["decode_tokens_per_s"] < spec.min_decode_tokens_per_s:
            attrs["too_slow"] = True
            say(
                f"rung 0 · {attrs['key']} · decodes {speed['decode_tokens_per_s']:.0f} tokens/s < latency.min_decode_tokens_per_s {spec.min_decode_tokens_per_s:g}: stopped"
            )
            return False
        return True

    @property
    def active(self) -> bool:
        """Whether this worker scored rung-0 candidates since it last said what they cost."""
        return self.bar is not None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self) -> None:
        """Close the progress bar and say what rung 0 cost this worker."""
        self.close()
        n, seconds = self.spent["scored"], self.spent["seconds"]
        if n:
            say(
                f"rung 0: {n} candidates scored pruned in {seconds:.0f} s ({60 * n / max(seconds, 1e-9):.1f} per minute; "
                f"{100 * (1 - self.spent['forward'] / max(seconds, 1e-9)):.0f}% of the time outside the metric's forward passes)"
            )
            self.spent["scored"] = 0
