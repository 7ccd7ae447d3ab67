"""What a search leaves in its run folder beside the study: trials.csv, candidates.csv, best_arch.json.

The tables are rewritten as the search goes (each replaced atomically), so a run can be
watched or stopped at any time; `best_arch.json` appears only once the last rung is complete,
and with it the winner's last stable state is all that is kept of the rung states.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import optuna

from minitron_nas.config.space import SearchSpace
from minitron_nas.files import RunFolder, write_json_atomic, write_text_atomic
from minitron_nas.search.rung_states import forget_states, state_file
from minitron_nas.search.study import candidates_table, decide, order_stderr, rung_summary, search_complete, search_cost, trials_table

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
    a = best.user_attrs
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
        "order_stderr": order_stderr(study),
        "search_tokens": cost["tokens"],
        "search_seconds": cost["seconds"],
        "budget_tokens": study.user_attrs.get("budget_tokens"),
        "state": str(state_file(out, a["rung"], a["key"])) if a["rung"] >= 1 else None,
        "space": space.source,
        "budget": asdict(space.budget),
    }
    write_json_atomic(RunFolder(out).best_arch, payload)
    if a["rung"] >= 1:
        forget_states(out, a["rung"], {a["key"]})
