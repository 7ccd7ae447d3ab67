"""The readers of a run folder that report.md and the dashboard share: the study, its finished
candidates, the distillation's files and the rankings, each degrading to (None, why not)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import optuna
import pandas as pd

from minitron_nas.errors import MinitronError
from minitron_nas.files import RunFolder
from minitron_nas.search.study import STUDY_NAME, candidates_table, open_storage, storage_url

__all__ = [
    "best_row",
    "finished",
    "load_distill_curve",
    "load_distill_summary",
    "load_rankings",
    "maximizes",
    "open_run_study",
    "pareto_front",
    "read_json",
]


def open_run_study(run_dir: str | Path, storage: str | None = None) -> optuna.Study:
    """The run's study (study.STUDY_NAME) from `storage`, by default SQLite in the run folder."""
    store = open_storage(storage, Path(run_dir), worker=False)
    if STUDY_NAME not in [s.study_name for s in optuna.get_all_study_summaries(store)]:
        raise MinitronError(
            f"storage '{storage_url(storage, Path(run_dir))}' holds no study named '{STUDY_NAME}': run `minitron-nas search` first or fix --storage"
        )
    return optuna.load_study(study_name=STUDY_NAME, storage=store)


def maximizes(study: optuna.Study) -> bool:
    """Whether the space's score (the last rung's ranking) is higher-is-better, as the search recorded it."""
    return bool(study.user_attrs.get("score_maximize", False))


def pareto_front(params, scores, maximize: bool) -> list[int]:
    """Indices of the non-dominated points, by increasing parameters.

    A point is dominated when another has no more parameters and a score at least as good,
    and is strictly better in one of the two. Identical points are all kept. Points with a
    missing or non-finite score are never on the front.
    """
    sign = -1.0 if maximize else 1.0
    points = sorted(
        (p, sign * s, i) for i, (p, s) in enumerate(zip(params, scores)) if p is not None and s is not None and math.isfinite(s) and math.isfinite(p)
    )
    front, best = [], math.inf
    for _, group in itertools.groupby(points, key=lambda pt: pt[0]):  # equal parameter counts together
        group = list(group)
        lowest = group[0][1]
        if lowest < best:
            front += [i for _, s, i in group if s == lowest]
            best = lowest
    return front


def finished(study: optuna.Study) -> pd.DataFrame:
    """Every candidate that finished a rung, at the last rung it reached, with its curves.

    `pareto` marks the non-dominated candidates of the last rung by (parameters, score):
    values of different rungs are not comparable, so the front is drawn among equals.
    """
    table = candidates_table(study, maximizes(study))
    if table.empty:
        return table
    done = table[table.state == "COMPLETE"].copy()
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    done["retrain_curve"] = [by_number[n].user_attrs.get("retrain_curve") or [] for n in done.trial]
    last = study.user_attrs.get("rungs", 1) - 1
    final = done[(done.last_rung == last) & done.score.notna()]
    front = pareto_front(list(final.params_total), list(final.score), maximizes(study))
    done["pareto"] = False
    done.loc[final.index[front], "pareto"] = True
    return done.reset_index(drop=True)


def read_json(path: Path):
    """(data, problem): data is None when the file is missing or unreadable."""
    if not path.is_file():
        return None, f"{path} not found"
    try:
        return json.loads(path.read_text()), None
    except (OSError, ValueError) as err:
        return None, f"{path} is unreadable ({type(err).__name__}: {err})"


def load_distill_curve(run_dir: Path) -> tuple[list[dict] | None, str | None]:
    """The curve as [{step, train_loss, eval_loss}], or (None, why not)."""
    path = RunFolder(run_dir).distill_curve
    data, problem = read_json(path)
    if problem is not None:
        return None, problem
    if isinstance(data, dict) and data.get("curve") and all(isinstance(p, (list, tuple)) for p in data["curve"]):
        points: dict[int, dict] = {}
        for key, name in (("curve", "train_loss"), ("eval_curve", "eval_loss")):
            for step, value in data.get(key) or []:
                points.setdefault(step, {"step": step})[name] = value
        data = [points[k] for k in sorted(points)]
    elif isinstance(data, dict):
        data = data.get("curve")
    if not isinstance(data, list) or not all(isinstance(p, dict) and "step" in p for p in data):
        return None, f"{path} is not a list of {{step, train_loss, eval_loss}}"
    return data, None


def load_distill_summary(run_dir: Path) -> tuple[dict | None, str | None]:
    data, problem = read_json(RunFolder(run_dir).distill_summary)
    if problem is None and not isinstance(data, dict):
        return None, f"{RunFolder(run_dir).distill_summary} is not a JSON object"
    return data, problem


def load_rankings(run_dir: Path):
    from minitron_nas.prune.ranking import Rankings  # torch-backed: only when the run has rankings

    folder = RunFolder(run_dir).rankings
    try:
        return Rankings.load(folder), None
    except MinitronError as err:
        return None, str(err)


def best_row(study: optuna.Study, done: pd.DataFrame):
    best = done[done.best] if not done.empty else done
    return None if best.empty else best.iloc[0]
