"""Score an in-memory model with lm-evaluation-harness, after checking its spec before any model loads.

lm-eval scoring takes one `ScoringSettings` (config/space.py): any lm-eval task, group or tag, the
user's own task YAMLs (`include_path`), few-shot counts and limits per task, and an
objective over any named metric (objective.py), with lm-eval's standard errors. The
held-out loss (heldout.py) and the objective stay importable from here.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minitron_nas.config.space import ScoringSettings
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.converters import TASKS
from minitron_nas.evaluate.objective import lm_eval_higher_is_better, objective_terms
from minitron_nas.evaluate.quiet import offline, quiet_lm_eval
from minitron_nas.evaluate.tasks import builtin_metrics, fewshot_of, parse_tasks, plan_tasks

__all__ = [
    "Scores",
    "check_lm_eval",
    "lm_eval_evaluate",
    "lm_eval_scores",
    "set_lm_eval_verbose",
]

_VERBOSE = False


def set_lm_eval_verbose(flag: bool) -> None:
    """Show lm-eval's own logs, warnings and per-request bars in every later scoring (CLI --verbose)."""
    global _VERBOSE
    _VERBOSE = bool(flag)


# --------------------------------------------------------------------------- checking a spec


def _key(where: str, name: str) -> str:
    """A setting's name as the user wrote it: scoring.num_fewshot in a space, --num-fewshot on the CLI."""
    return "--" + name.replace("_", "-") if where == "--" else where + name


def _count(value, what: str, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise MinitronError(f"{what} must be a whole number >= {low}, not {value!r}: give e.g. {5 if allow_zero else 100}")


def _per_task(value, what: str, tasks, allow_zero: bool) -> None:
    """One number for every task, or {task: number} naming requested tasks only."""
    if value is None:
        return
    if isinstance(value, dict):
        for name, n in value.items():
            if name not in tasks:
                raise MinitronError(f"{what} names '{name}', which is not in tasks ({', '.join(tasks)}): name one of them")
            _count(n, f"{what}.{name}", allow_zero)
    else:
        _count(value, what, allow_zero)


def check_lm_eval(spec: ScoringSettings, where: str = "") -> ScoringSettings:
    """Every setting, name, folder and file of an lm-eval spec checked before any model loads.

    Returns the spec, or, when `tasks_optional` is set and `data_dir` is missing, a copy that
    scores on held-out KL divergence instead (said in one logged line).
    """
    return _check(spec, where)[0]


def _check(spec: ScoringSettings, where: str = ""):
    tasks = parse_tasks(list(spec.tasks))
    _per_task(spec.limit, _key(where, "limit"), tasks, allow_zero=False)
    _per_task(spec.num_fewshot, _key(where, "num_fewshot"), tasks, allow_zero=True)
    _count(spec.batch_size, _key(where, "batch_size"), allow_zero=False)
    terms = objective_terms(spec)
    if terms:
        lm_eval_higher_is_better(spec)
    if spec.data_dir is not None and not Path(spec.data_dir).expanduser().is_dir():
        if spec.tasks_optional:
            logging.getLogger("minitron_nas").warning(
                "lm-eval tasks skipped: data folder '%s' not found; scoring on held-out KL divergence to the teacher instead (%s)",
                spec.data_dir,
                _key(where, "tasks_optional"),
            )
            return replace(spec, metric="kld"), None
        optional = "" if where == "--" else f", or set {_key(where, 'tasks_optional')}: true to score on held-out KLD without them"
        raise MinitronError(
            f"{_key(where, 'data_dir')} '{spec.data_dir}' not found: put the benchmark files there (see ../shared/data/MANIFEST.md), "
            f"or drop {_key(where, 'data_dir')} to load the tasks from the Hugging Face Hub{optional}"
        )
    plan = plan_tasks(tasks, spec.data_dir, spec.include_path, spec.num_fewshot, include_key=_key(where, "include_path"))
    if terms and all(n in TASKS for n in tasks):  # plain tasks whose metrics are known before scoring
        for task, metric, _ in terms:
            if task not in tasks:
                raise MinitronError(f"{_key(where, 'objective')} names task '{task}', which is not in tasks ({', '.join(tasks)}): name one of them")
            known = builtin_metrics(task)
            if known and metric not in known:
                raise MinitronError(f"{_key(where, 'objective')} names metric '{metric}' of {task}, which reports {', '.join(known)}: name one of them")
    return spec, plan


def _as_spec(tasks, data_dir, limit, batch_size, num_fewshot, include_path) -> ScoringSettings:
    if isinstance(tasks, ScoringSettings):
        return tasks if tasks.metric == "lm_eval" else replace(tasks, metric="lm_eval")
    return ScoringSettings(
        metric="lm_eval",
        tasks=tasks if isinstance(tasks, str) else tuple(tasks or ()),
        data_dir=None if data_dir is None else str(data_dir),
        limit=limit,
        batch_size=batch_size,
        num_fewshot=num_fewshot,
        include_path=include_path,
    )


# --------------------------------------------------------------------------- scoring


class Scores(dict):
    """{task: {metric: value, metric_stderr: stderr}}, plus what lm-eval said about them.

    `higher_is_better`: {task: {metric: bool}} from each task's config;
    `members`: {requested name: its leaf tasks} (a task is its own only member).
    """

    def __init__(self, *args, higher_is_better=None, members=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.higher_is_better = higher_is_better or {}
        self.members = members or {}


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _add_stderrs(output: dict, tasks: dict, groups: dict) -> None:
    """lm-eval's own closed-form standard errors, without its bootstrap.

    With `bootstrap_iters=0` lm-eval reports no stderr at all; with it > 0 it also bootstraps
    perplexities (minutes). lm-eval's stderr of a mean metric is `mean_stderr` of the
    per-document values, which the logged samples hold; groups then aggregate them with
    lm-eval's own `Group.aggregate` (pooled or unweighted, as the group is configured).
    Metrics without a closed form (perplexities) keep no stderr.
    """
    from lm_eval.api.metrics import mean, mean_stderr  # lm-eval: only when scoring with it

    results, samples = output["results"], output.get("samples") or {}
    for name, task in tasks.items():
        row = results.get(name)
        if row is None:
            continue
        aggregation = task.aggregation()
        for key in list(row):
            metric, sep, filter_key = key.partition(",")
            if not sep or "_stderr" in metric or aggregation.get(metric) is not mean:
                continue
            items = [s[metric] for s in samples.get(name, []) if s.get("filter") == filter_key and metric in s]
            if len(items) > 1:
                row[f"{metric}_stderr,{filter_key}"] = mean_stderr(items)
    for name, group in groups.items():
        if name in results:
            for key, value in group.aggregate(results).items():
                if "_stderr," in key:
                    results[name][key] = value


def _clean(row: dict) -> tuple[dict[str, float | None], dict[str, str]]:
    """'metric,filter' keys -> metric names (with ',filter' only where a metric has several)."""
    pairs = [key.partition(",") for key in row if "," in key and "_stderr," not in key]
    filters: dict[str, int] = {}
    for metric, _, _ in pairs:
        filters[metric] = filters.get(metric, 0) + 1
    out, names = {}, {}
    for metric, _, filter_key in pairs:
        name = metric if filters[metric] == 1 else f"{metric},{filter_key}"
        value = _number(row[f"{metric},{filter_key}"])
        if value is None and not isinstance(row[f"{metric},{filter_key}"], (int, float)):
            continue  # not a scalar metric
        out[name] = value
        out[f"{name}_stderr"] = _number(row.get(f"{metric}_stderr,{filter_key}"))
        names[name] = metric
    return out, names


def lm_eval_evaluate(model, tokenizer, spec: ScoringSettings, *, verbose: bool | None = None, progress: bool = True):
    """Score an in-memory model with lm-eval; returns (Scores, lm-eval's whole output with samples).

    Tasks resolve as `tasks.plan_tasks` says: our seven converted tasks from
    `spec.data_dir` fully offline, anything else through lm-eval's TaskManager (built-in or
    `include_path`), loaded the way lm-eval loads it. Nothing is downloaded for the model
    and nothing is saved: it is wrapped as is. Global RNG states and the model's train/eval
    mode are restored afterwards. lm-eval's console output is folded into one progress line
    on stderr unless `verbose` (default: `set_lm_eval_verbose`).
    """
    _, plan = _check(replace(spec, tasks_optional=False))  # a missing folder is an error here: the caller asked for lm-eval
    verbose = _VERBOSE if verbose is None else verbose
    label = ", ".join(n + (f" ({k}-shot)" if (k := fewshot_of(spec.num_fewshot, n)) else "") for n in plan.names)

    was_training = model.training
    rng_states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    start = time.perf_counter()
    hook = None
    try:
        with quiet_lm_eval(verbose) as console, offline() if plan.offline else nullcontext():
            if verbose:
                from lm_eval.utils import setup_logging

                setup_logging(logging.INFO)
            from lm_eval import simple_evaluate  # lm-eval: only when scoring with it
            from lm_eval.models.huggingface import HFLM

            manager = plan.manager()
            objects, tasks, groups, members = [], {}, {}, {}
            for name in plan.names:
                try:
                    loaded = manager.load(plan.load_spec(name))
                except Exception as err:  # lm-eval and datasets raise anything from a missing dataset
                    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
                    raise MinitronError(
                        f"lm-eval could not load task '{name}' ({type(err).__name__}: {reason}): "
                        "its dataset must be reachable on the Hugging Face Hub or in the local cache (or give data_dir for the converted tasks)"
                    ) from None
                objects += [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
                tasks |= loaded["tasks"]
                groups |= loaded.get("groups", {})
                members[name] = list(loaded["tasks"])
                if (shots := fewshot_of(spec.num_fewshot, name)) is not None:
                    for task in loaded["tasks"].values():
                        task.set_config(key="num_fewshot", value=shots)
            limit, samples = (
                (spec.limit, None)
                if not isinstance(spec.limit, dict)
                else (None, {leaf: list(range(min(n, len(tasks[leaf].eval_docs)))) for name, n in spec.limit.items() for leaf in members[name]})
            )
            # one line: redrawn live on a terminal, printed once at the end into a file or pipe
            live = progress and not verbose and console.isatty()
            bar = tqdm(desc=f"lm-eval {label}", unit=" forward", file=console, disable=not live, leave=True, dynamic_ncols=True)
            passes = [0]

            def tick(*_):  # returns None: a hook's return value would replace the model's output
                passes[0] += 1
                bar.update(1)

            hook = model.register_forward_hook(tick)
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size)
            output = simple_evaluate(
                model=lm,
                tasks=objects,
                num_fewshot=None,
                limit=limit,
                samples=samples,
                task_manager=manager,
                bootstrap_iters=0,  # stderrs below, in closed form: lm-eval's bootstrap of perplexities costs minutes
                log_samples=True,
            )
            _add_stderrs(output, tasks, groups)
            seconds = time.perf_counter() - start
            bar.set_postfix_str(f"done in {seconds:.1f} s", refresh=False)
            bar.close()
            if progress and not verbose and not live:
                print(f"lm-eval {label}: {passes[0]} forward passes in {seconds:.1f} s", file=console, flush=True)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.random.set_rng_state(rng_states[2])

    results, directions = output["results"], output.get("higher_is_better", {})
    scores, higher = {}, {}
    order = [n for name in plan.names for n in ([name] + members[name])]
    for name in dict.fromkeys(order):
        if name not in results:
            continue  # a tag: no row of its own, only its members
        metrics, base = _clean(results[name])
        if not metrics:
            continue
        scores[name] = metrics
        higher[name] = {m: directions.get(name, {}).get(b) for m, b in base.items()}
    return Scores(scores, higher_is_better=higher, members=members), output


def lm_eval_scores(
    model,
    tokenizer,
    tasks,
    data_dir=None,
    limit: int | dict | None = None,
    batch_size: int = 8,
    num_fewshot: int | dict | None = None,
    *,
    include_path=(),
    verbose: bool | None = None,
    progress: bool = True,
) -> Scores:
    """{task: {metric: value, metric + "_stderr": stderr or None}} of an in-memory model.

    `tasks` is a `ScoringSettings` (its lm-eval settings are used), or task names with the other
    arguments. Groups give their own aggregate row and one per member task.
    """
    spec = _as_spec(tasks, data_dir, limit, batch_size, num_fewshot, include_path)
    return lm_eval_evaluate(model, tokenizer, spec, verbose=verbose, progress=progress)[0]
