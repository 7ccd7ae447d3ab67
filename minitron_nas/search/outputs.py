"""What a search leaves in its run folder beside the study: trials.csv, candidates.csv, best_arch.json.

The tables are rewritten as the search goes (each replaced atomically), so a run can be
watched or stopped at any time; `best_arch.json` appears only once the last rung is complete,
with the last rung's Pareto front (by parameters, and by latency when measured); then the
last stable states of the winner and the front members are all that is kept of the rung
states, so `export --front` continues each member's search run.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import optuna

from minitron_nas.config.space import SearchSpace
from minitron_nas.files import RunFolder, write_json_atomic, write_text_atomic
from minitron_nas.search.rung_states import forget_states, state_file
from minitron_nas.search.study import candidates_table, decide, order_noise, pareto_front, rung_summary, search_complete, search_cost, trials_table

__all__ = ["write_outputs"]


def write_outputs(study: optuna.Study, out: Path, space: SearchSpace, maximize_score: bool) -> None:
    """trials.csv and candidates.csv, each replaced atomically; best_arch.json once the search is complete."""
    write_text_atomic(RunFolder(out).trials_csv, trials_table(study).to_csv(index=False))
    write_text_atomic(RunFolder(out).candidates_csv, candidates_table(study, maximize_score).to_csv(index=False))
    cost = search_cost(study)
    study.set_user_attr("search_cost", cost)
    study.set_user_attr("score_maximize", maximize_score)
    if not search_complete(study):
        return
    decision = decide(study, maximize_score)
    if decision is None:
        return
    best, tied, rule = decision
    a, (order_sd, order_dof) = best.user_attrs, order_noise(study)
    payload = {
        "architecture": a["architecture"],
        "key": a["key"],
        "params_total": a["params_total"],
        "params_non_embedding": a["params_non_embedding"],
        "metric": space.scoring.metric,
        "score": a["score"],
        "score_stderr": a.get("score_stderr"),
        "tied_with": tied,
        "tie_broken_by": rule,
        "rung_metric": space.halving.rung_metric,
        "trial": best.number,
        "rungs": rung_summary(study, maximize_score),
        "schedule": study.user_attrs.get("schedule"),
        "order_stderr": order_sd,
        "order_dof": order_dof,
        "search_tokens": cost["tokens"],
        "search_seconds": cost["seconds"],
        "budget_tokens": study.user_attrs.get("budget_tokens"),
        "state": _member(out, best)["state"],
        "space": space.source,
        "budget": asdict(space.budget),
        "front": [_member(out, t) for t in pareto_front(study, maximize_score, "params")],
        "front_by_latency": [_member(out, t) for t in pareto_front(study, maximize_score, "latency")] if space.latency.active else None,
    }
    write_json_atomic(RunFolder(out).best_arch, payload)
    if a["rung"] >= 1:
        fronts = payload["front"] + (payload["front_by_latency"] or [])
        forget_states(out, a["rung"], {a["key"], *(m["key"] for m in fronts)})


def _member(out: Path, trial: optuna.trial.FrozenTrial) -> dict:
    """What `export --front` needs of a front member without the study: its architecture, sizes,
    search score and the rung state its distillation continues from."""
    a = trial.user_attrs
    keys = ("key", "architecture", "params_total", "params_non_embedding", "decode_tokens_per_s", "score", "score_stderr")
    return {**{k: a.get(k) for k in keys}, "trial": trial.number, "state": str(state_file(out, a["rung"], a["key"])) if a["rung"] >= 1 else None}
