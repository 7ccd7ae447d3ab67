"""What a search run found, in Markdown (the readers it shares with the dashboard are in run_data.py).

`write_report(run_dir)` writes RUN_DIR/report.md: budget, feasible count, trial counts, the
search's cost, the rungs (kept, Kendall tau with its n, cuts inside the noise), the
candidates with their standard errors and ties with the best, errors, and the winner before and after full distillation
beside the teacher (RUN_DIR/distill/summary.json); after `export --front`, a link to each member's folder.

Files written by the final distillation, read here when present (each is optional):

RUN_DIR/distill/curve.json -- the distillation curve, one point per logged optimizer step::

    [{"step": 0, "train_loss": null, "eval_loss": 3.91}, {"step": 50, "train_loss": 3.2, "eval_loss": 3.4}, ...]

  `step` is required; `train_loss` and `eval_loss` may be null or missing at a step. Also
  accepted: {"curve": [that list]}, or a retraining result {"curve": [[step, train_loss], ...],
  "eval_curve": [[step, eval_loss], ...]}.

RUN_DIR/distill/summary.json -- one object; "teacher", "before" (the pruned winner before
distillation) and "after" (after it) map metric names to numbers, measured on the same
held-out text; everything else is optional::

    {"architecture": {...},
     "teacher": {"heldout_loss": 3.05, "kld": 0.0, "params_total": 134515008},
     "before":  {"heldout_loss": 7.30, "kld": 4.1},
     "after":   {"heldout_loss": 3.71, "kld": 0.62},
     "tokens": 100000000, "seconds": 5400.0}

  Nested numbers (for example lm-eval accuracies per task) become dotted columns
  ("arc_easy.acc"); `tokens`, `steps` and `seconds` are reported below the table.

Missing pieces (no finished trial, no rankings, no distillation yet) leave the figure in
place, empty, with a note saying what is missing. Both files are replaced atomically.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import optuna
import pandas as pd

from minitron_nas.errors import MinitronError
from minitron_nas.files import RunFolder, write_text_atomic
from minitron_nas.report.family import family_markdown
from minitron_nas.report.labels import ARCH_COLUMNS, FAMILY_LABELS, as_int, best_line, fmt, plus_minus, score_label
from minitron_nas.report.run_data import best_row, finished, load_distill_summary, maximizes, open_run_study, read_json
from minitron_nas.search.study import rung_summary, search_cost, trials_table

__all__ = ["open_run_study", "write_report"]


# --------------------------------------------------------------------------- report.md


def _space_facts(study: optuna.Study, run_dir: Path) -> list[str]:
    """Budget and feasible count from the study's space file; degrades to best_arch.json's budget."""
    lines, source = [], study.user_attrs.get("space")
    try:
        from minitron_nas.search.candidates import enumerate_candidates, load_space  # torch-backed: only for the space facts

        if not source:
            raise MinitronError("the study records no search space file")
        space = load_space(source)
        b = space.budget
        memory = f", memory <= {b.memory_gb} GiB at context {b.context} x batch {b.batch}" if b.memory_gb is not None else ""
        lines.append(f"- budget: {b.parameters:,} {b.count} parameters +/- {b.tolerance:.0%}{memory} (space `{source}`)")
    except Exception as err:
        best, _ = read_json(RunFolder(run_dir).best_arch)
        budget = (best or {}).get("budget") if isinstance(best, dict) else None
        if budget:
            lines.append(
                f"- budget: {budget['parameters']:,} {budget.get('count', 'total')} parameters +/- {budget.get('tolerance', 0):.0%} (from best_arch.json)"
            )
        else:
            lines.append("- budget: unknown")
        lines.append(f"- feasible architectures: unknown (search space unavailable: {err})")
        return lines
    try:
        from minitron_nas.model.teachers import load_config  # torch-backed: only for the teacher's size

        feasible, valid = enumerate_candidates(space, load_config(space.teacher))
        lines.append(f"- feasible architectures: {len(feasible):,} of {len(valid):,} valid ones (teacher `{space.teacher}`)")
    except Exception as err:
        lines.append(f"- feasible architectures: unknown (teacher config `{space.teacher}` unavailable: {err})")
    return lines


def _md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4f", intfmt=",")


def _candidates(frame: pd.DataFrame) -> pd.DataFrame:
    family = {c: label for c, label in FAMILY_LABELS.items() if c in frame and frame[c].notna().any()}  # MoE and hybrid sizes
    active = {"params_active": "active params"} if "params_active" in frame and frame.params_active.notna().any() else {}
    columns = {"trial": "trial", **ARCH_COLUMNS, **family, "params_total": "params", **active, "last_rung": "last rung", "tokens": "tokens"}
    out = frame[list(columns)].rename(columns=columns)
    for col in ("hidden", "ffn", "heads", "kv groups", "layers", "params", "tokens"):
        out[col] = out[col].astype("int64")
    for col in [*family.values(), *active.values()]:  # "-" where a trial lacks the size (a gap, not a 0)
        out[col] = out[col].map(lambda v: fmt(as_int(v))).to_numpy()
    out["value"] = [plus_minus(v, e) for v, e in zip(frame.value, frame.stderr)]
    out["score"] = [plus_minus(v, e) for v, e in zip(frame.score, frame.score_stderr)]
    out["tied with best"] = frame.tied_with_best.map({True: "yes", False: ""}).to_numpy()
    out["Pareto"] = frame.pareto.map({True: "yes", False: ""}).to_numpy()
    out["seconds"] = frame.seconds.map(lambda v: "-" if v is None or pd.isna(v) else f"{v:.0f}").to_numpy()
    if "decode_tokens_per_s" in frame and frame.decode_tokens_per_s.notna().any():
        out["decode tok/s"] = frame.decode_tokens_per_s.map(lambda v: "-" if pd.isna(v) else f"{v:,.0f}").to_numpy()
    return out


def _rungs_table(study: optuna.Study) -> pd.DataFrame:
    schedule = study.user_attrs.get("schedule") or []
    rows = []
    for row in rung_summary(study, maximizes(study)):
        planned = schedule[row["rung"]] if row["rung"] < len(schedule) else {}
        tau, n = row.get("tau_with_previous"), row.get("tau_n")
        interval = f" [{row['tau_low']:.2f}, {row['tau_high']:.2f}]" if row.get("tau_low") is not None else ""
        rows.append(
            {
                "rung": row["rung"],
                "steps each": "pruned" if row["rung"] == 0 else planned.get("steps"),
                "planned": planned.get("candidates"),
                "finished": row["finished"],
                "kept": row.get("kept", "-"),
                "of which within noise of the cut": row.get("kept_within_noise", "-"),
                "data-order SD": "-" if not row.get("order_stderr") else f"{row['order_stderr']:.4f}",
                "Kendall tau vs previous rung [95% CI] (n)": "-" if n is None else f"{'-' if tau is None else f'{tau:.2f}'}{interval} (n={n})",
            }
        )
    return pd.DataFrame(rows)


def _numbers(row, prefix: str = "") -> dict:
    """{name: number}, nested dicts flattened to dotted names; anything else dropped."""
    out = {}
    for key, value in (row or {}).items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def _with_errors(values: dict) -> dict:
    """{"kld": 0.6, "kld_stderr": 0.02} -> {"kld": "0.6000 ± 0.0200"}: each value shown with its error."""
    out = {}
    for key, value in values.items():
        if key.endswith("_stderr") and key[: -len("_stderr")] in values:
            continue
        error = values.get(f"{key}_stderr")
        out[key] = value if error is None else plus_minus(value, error)
    return out


def _teacher_params(study: optuna.Study) -> int | None:
    try:
        from minitron_nas.model.architecture import Architecture, ParamCounter  # torch-backed: only for the teacher's size
        from minitron_nas.model.teachers import load_config  # torch-backed: only for the teacher's size
        from minitron_nas.search.candidates import load_space  # torch-backed: only for the teacher's size

        config = load_config(load_space(study.user_attrs["space"]).teacher)
        return ParamCounter(config).count(Architecture.from_config(config)).total
    except Exception:
        return None


def _distill_section(study: optuna.Study, done: pd.DataFrame, run_dir: Path) -> list[str]:
    lines = ["## Winner before and after full distillation, beside the teacher", ""]
    best = best_row(study, done)
    if best is not None:
        lines += [
            f"In the search the winner (trial {best.trial}, {int(best.params_total):,} parameters) scored "
            f"{plus_minus(best.score, best.score_stderr)} ({study.user_attrs.get('metric', 'score')}) after retraining on "
            f"{int(best.tokens):,} tokens at the last rung.",
            "",
        ]
    summary, problem = load_distill_summary(run_dir)
    if summary is None:
        missing = problem is not None and problem.endswith("not found")
        lines.append(
            "Distillation has not run yet" + ("" if missing else f" ({problem})") + ": this section is filled from `distill/summary.json` when it exists."
        )
        return lines
    teacher = _numbers(summary.get("teacher"))
    winner_params = as_int(best.params_total) if best is not None else None
    rows = [
        ("teacher", teacher.pop("params_total", None) or _teacher_params(study), teacher),
        ("winner, pruned, before distillation", winner_params, _numbers(summary.get("before"))),
        ("winner after full distillation", winner_params, _numbers(summary.get("after"))),
    ]
    for _, _, values in rows[1:]:
        values.pop("params_total", None)
    rows = [(name, n, _with_errors(values)) for name, n, values in rows]
    table = pd.DataFrame([{"model": name, "params": "-" if n is None else f"{int(n):,}", **values} for name, n, values in rows])
    lines.append(_md(table))
    facts = {k: v for k, v in {**summary, **(summary.get("after") or {})}.items() if k in ("tokens", "steps", "seconds")}
    if facts:
        lines += ["", "Distillation: " + ", ".join(f"{k} {v:,}" for k, v in facts.items())]
    return lines


def write_report(run_dir: str | Path, storage: str | None = None, *, study: optuna.Study | None = None, top: int = 10) -> Path:
    """Write RUN_DIR/report.md (atomically) and return its path."""
    run_dir = Path(run_dir)
    study = study or open_run_study(run_dir, storage)
    run_dir.mkdir(parents=True, exist_ok=True)
    table = trials_table(study)
    done = finished(study)
    maximize = maximizes(study)
    states = table.state.value_counts().to_dict() if not table.empty else {}
    cost = search_cost(study)
    lines = [
        f"# Search report: {run_dir.resolve().name}",
        "",
        f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Interactive figures: [dashboard.html](dashboard.html).",
        "",
        "## Budget and search space",
        "",
        *_space_facts(study, run_dir),
        f"- metric: {score_label(study)}; rungs compared on {study.user_attrs.get('rung_metric', 'kld')} at equal tokens",
        f"- trials: {', '.join(f'{n} {s.lower()}' for s, n in states.items()) or 'none yet'}; {len(done)} candidates finished a rung",
        f"- search cost: {cost['tokens']:,} training tokens (budget {fmt(study.user_attrs.get('budget_tokens'))}), {cost['seconds']:,.0f} s",
        f"- best: {best_line(study, done)}",
        "",
        "## Rungs",
        "",
    ]
    rungs = _rungs_table(study)
    lines.append(_md(rungs) if not rungs.empty else "No rung has started.")
    lines += ["", "## Candidates (last rung first; values are the rung metric at the last rung reached, ± one standard error)", ""]
    if done.empty:
        lines.append("No finished trial yet.")
    else:
        last = done.last_rung.max()
        final = done[done.last_rung == last].sort_values("score", ascending=not maximize)
        ranked = pd.concat([final, done[done.last_rung != last]]).head(top)
        lines.append(_md(_candidates(ranked)))
    errors = table[table.error.notna()] if not table.empty else table
    if not errors.empty:
        lines += ["", "## Failed trials", "", _md(errors[["trial", "state", "rung", "key", "error"]])]
    lines += ["", *_distill_section(study, done, run_dir), "", *family_markdown(run_dir)]
    return write_text_atomic(RunFolder(run_dir).report, "\n".join(lines))
