"""The objective over named lm-eval metrics: its terms, which way it improves, its value and error.

A space names its objective as 'task/metric' or {'task/metric': weight}; the default is the
mean over the requested tasks of acc_norm (else acc). Directions come from lm-eval: the
task's own `higher_is_better` once scored, its metric registry before.
"""

from __future__ import annotations

import math

from minitron_nas.config.space import ScoringSettings
from minitron_nas.errors import MinitronError

__all__ = ["lm_eval_higher_is_better", "lm_eval_objective", "objective_terms"]


def objective_terms(spec: ScoringSettings) -> list[tuple[str, str, float]] | None:
    """(task, metric, weight) of the objective; None for the default (mean acc_norm, else acc)."""
    objective = spec.objective
    if objective is None:
        return None
    items = {objective: 1.0} if isinstance(objective, str) else objective
    if not isinstance(items, dict) or not items:
        raise MinitronError(f"objective must be 'task/metric' or {{'task/metric': weight}}, not {objective!r}: give e.g. arc_easy/acc_norm")
    terms = []
    for key, weight in items.items():
        task, _, metric = str(key).partition("/")
        if not task or not metric:
            raise MinitronError(f"objective term {key!r} is not 'task/metric': give e.g. arc_challenge/acc_norm or wikitext/word_perplexity")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0 or not math.isfinite(weight):
            raise MinitronError(f"objective weight of '{key}' must be a positive number, not {weight!r}")
        terms.append((task, metric, float(weight)))
    return terms


def _registry_higher_is_better(metric: str) -> bool | None:
    """lm-eval's registered direction of a metric name (tasks may override it; their results say so)."""
    from lm_eval.api.registry import is_higher_better  # lm-eval takes seconds to import: only when scoring with it

    try:
        return is_higher_better(metric.split(",")[0])
    except Exception:  # not registered: a task-defined metric, known once the task has run
        return None


def lm_eval_higher_is_better(spec: ScoringSettings) -> bool:
    """Which way the objective improves, known before scoring (lm-eval's registered metric directions)."""
    terms = objective_terms(spec)
    if terms is None:
        return True  # accuracies
    directions = {_registry_higher_is_better(m) for _, m, _ in terms} - {None}
    if len(directions) > 1:
        raise MinitronError(f"objective mixes metrics that improve upwards and downwards ({spec.objective}): weight metrics of one direction only")
    return directions.pop() if directions else True


def lm_eval_objective(results: dict, spec: ScoringSettings) -> tuple[float, float | None, bool]:
    """(objective value, its standard error, higher_is_better) from `lm_eval_scores` results.

    A weighted mean sum(w_i x_i) / sum(w_i) of the named task metrics, with
    SE = sqrt(sum(w_i^2 se_i^2)) / sum(w_i): this treats the metrics' errors as independent,
    true for different tasks scored on different documents, not for two metrics of one task
    (acc and acc_norm share documents; their SE is then understated). None when a term has
    no stderr. The default objective is the mean over the requested tasks of acc_norm (else
    acc); a tag without a row of its own counts each of its member tasks.
    """
    terms = objective_terms(spec)
    members = getattr(results, "members", {}) or {}
    if terms is None:
        names = [n for name in spec.tasks for n in ([name] if name in results else members.get(name, []))]
        terms = [(n, "acc_norm" if "acc_norm" in results[n] else "acc", 1.0) for n in names if n in results and ({"acc_norm", "acc"} & set(results[n]))]
        if not terms:
            raise MinitronError(
                f"the tasks {', '.join(spec.tasks)} report no acc or acc_norm to optimise: name a metric with scoring.objective, e.g. wikitext/word_perplexity"
            )
    directions = getattr(results, "higher_is_better", {}) or {}
    values, errors, weights, ways = [], [], [], set()
    for task, metric, weight in terms:
        if task not in results:
            raise MinitronError(f"objective names task '{task}', which was not scored: name one of {', '.join(results)}")
        if metric not in results[task] or metric.endswith("_stderr"):
            known = ", ".join(m for m in results[task] if not m.endswith("_stderr"))
            raise MinitronError(f"objective names metric '{metric}' of {task}, which reports {known}: name one of them")
        value = results[task][metric]
        if value is None:
            raise MinitronError(f"{task}/{metric} has no value (lm-eval returned none): choose another metric")
        way = directions.get(task, {}).get(metric)
        way = _registry_higher_is_better(metric) if way is None else way
        ways.add(True if way is None else bool(way))
        values.append(value)
        errors.append(results[task].get(f"{metric}_stderr"))
        weights.append(weight)
    if len(ways) > 1:
        raise MinitronError("objective mixes metrics that improve upwards and downwards: weight metrics of one direction only")
    total = sum(weights)
    value = sum(w * v for w, v in zip(weights, values)) / total
    stderr = None if any(e is None for e in errors) else math.sqrt(sum((w * e) ** 2 for w, e in zip(weights, errors))) / total
    return value, stderr, ways.pop()
