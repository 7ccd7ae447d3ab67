"""What a search run found: one offline interactive page and a Markdown report.

`build_dashboard(run_dir)` writes RUN_DIR/dashboard.html, one self-contained page (plotly.js
is embedded once; nothing is fetched from the network) with a figure per question, each in
a div with a stable id:

- `pareto`: parameters vs the rung metric of every candidate at the last rung it reached
  (one trace per rung, error bars of one standard error), the last rung's non-dominated
  candidates by the space's score joined;
- `parallel`: parallel coordinates over hidden, ffn, heads, kv groups, layers, parameters,
  last rung and value, coloured by any axis (menu);
- `rank-stability`: values at one rung against the next, Kendall tau with its n per pair;
- `retrain-curves`: the retraining loss of each candidate at the last rung it reached;
- `head-importance`, `neuron-channel-importance`, `layer-importance`: the rankings in
  RUN_DIR/rankings (heads per layer; neuron and channel score distributions; Block
  Importance and, when ranked with --layer-loss, the loss with each layer dropped);
- `distill-curves`: the final distillation of the winner, from RUN_DIR/distill/curve.json.

`write_report(run_dir)` writes RUN_DIR/report.md: budget, feasible count, trial counts, the
search's cost, the rungs (kept, Kendall tau with its n, cuts inside the noise), the
candidates with their standard errors and ties with the best, errors, and the winner before and after full distillation
beside the teacher (RUN_DIR/distill/summary.json).

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

import html
import itertools
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from .errors import MinitronError
from .files import RunFolder, write_text_atomic
from .halving import rung_tau
from .study import (
    STUDY_NAME,
    candidates_table,
    rung_summary,
    rung_values,
    search_cost,
    trials_table,
)

FIGURE_IDS = (
    "pareto",
    "parallel",
    "rank-stability",
    "retrain-curves",
    "head-importance",
    "neuron-channel-importance",
    "layer-importance",
    "distill-curves",
)
METRIC_LABELS = {
    "heldout_loss": "held-out loss (nats)",
    "kld": "KL divergence to the teacher",
    "lm_eval": "lm-eval accuracy (mean over tasks)",
}
ARCH_COLUMNS = {  # trials_table column -> short label
    "hidden_size": "hidden",
    "intermediate_size": "ffn",
    "num_attention_heads": "heads",
    "num_key_value_heads": "kv groups",
    "num_hidden_layers": "layers",
}
TEMPLATE = "plotly_white"


# --------------------------------------------------------------------------- study access


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_run_study(run_dir: str | Path, storage: str | None = None) -> optuna.Study:
    """The run's study (study.STUDY_NAME) from `storage`, by default sqlite RUN_DIR/study.db."""
    run_dir = Path(run_dir)
    url = storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    journal = url.endswith((".log", ".journal"))
    local = _sqlite_path(url) or (Path(url) if journal else None)
    if local is not None and not local.is_file():  # opening it would create an empty store
        where = f"run folder '{run_dir}'" if storage is None else f"storage '{url}'"
        raise MinitronError(f"no study in {where} ({local} is missing): run `minitron-nas search` first or pass --storage")
    if not journal and not url.startswith(("sqlite", "postgresql", "mysql")):
        raise MinitronError(f"unsupported storage '{url}': use sqlite:///FILE, postgresql://..., or a FILE.journal path")
    try:
        if journal:
            store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
        else:
            store = optuna.storages.RDBStorage(url)  # read-only use: no heartbeat
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
    except Exception as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise MinitronError(f"cannot open storage '{url}' ({type(err).__name__}: {first}): check the URL or file") from None
    if STUDY_NAME not in names:
        raise MinitronError(f"storage '{url}' holds no study named '{STUDY_NAME}': run `minitron-nas search` first or fix --storage")
    return optuna.load_study(study_name=STUDY_NAME, storage=store)


def maximizes(study: optuna.Study) -> bool:
    """Whether the space's score (the last rung's ranking) is higher-is-better, as the search recorded it."""
    return bool(study.user_attrs.get("score_maximize", False))


# --------------------------------------------------------------------------- data


def pareto_front(params, scores, maximize: bool) -> list[int]:
    """Indices of the non-dominated points, by increasing parameters.

    A point is dominated when another has no more parameters and a score at least as good,
    and is strictly better in one of the two. Identical points are all kept. Points with a
    missing or non-finite score are never on the front.
    """
    sign = -1.0 if maximize else 1.0
    points = sorted(
        (p, sign * s, i)
        for i, (p, s) in enumerate(zip(params, scores))
        if p is not None and s is not None and math.isfinite(s) and math.isfinite(p)
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
    done = done.reset_index(drop=True)
    done["hover"] = [_hover(row) for _, row in done.iterrows()]
    return done


def _read_json(path: Path):
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
    data, problem = _read_json(path)
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
    data, problem = _read_json(RunFolder(run_dir).distill_summary)
    if problem is None and not isinstance(data, dict):
        return None, f"{RunFolder(run_dir).distill_summary} is not a JSON object"
    return data, problem


def _load_rankings(run_dir: Path):
    from .ranking import Rankings

    folder = RunFolder(run_dir).rankings
    try:
        return Rankings.load(folder), None
    except MinitronError as err:
        return None, str(err)


# --------------------------------------------------------------------------- figures


def _score_label(study: optuna.Study) -> str:
    metric = study.user_attrs.get("metric", "score")
    arrow = "higher is better" if maximizes(study) else "lower is better"
    return f"{METRIC_LABELS.get(metric, metric)}, {arrow}"


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure(layout=dict(title=title, template=TEMPLATE, height=320))
    fig.add_annotation(text=note.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _hover(row) -> str:
    arch = " · ".join(f"{label} {_fmt(_int(row[col]))}" for col, label in ARCH_COLUMNS.items())
    return (
        f"<b>trial {row.trial}</b>{' (Pareto)' if row.get('pareto') else ''}<br>{arch}<br>"
        f"params {_fmt(_int(row.params_total))} (non-embedding {_fmt(_int(row.params_non_embedding))})<br>"
        f"stopped at rung {row.last_rung} ({_fmt(_int(row.tokens))} tokens): {_fmt(_float(row.value))} ± {_fmt(_float(row.stderr))}"
        + ("" if _float(row.score) is None else f"<br>score {_fmt(_float(row.score))} ± {_fmt(_float(row.score_stderr))}")
        + (" (tied with the best)" if row.get("tied_with_best") else "")
        + ("" if _float(row.get("decode_tokens_per_s")) is None else f"<br>decode {row.decode_tokens_per_s:,.0f} tokens/s")
    )


def _int(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)


def _float(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def pareto_figure(done: pd.DataFrame, study: optuna.Study) -> go.Figure:
    title = "Every candidate at its last rung: parameters vs value"
    if done.empty:
        return _empty(title, "no finished trial yet")
    rung_metric = study.user_attrs.get("rung_metric", "kld")
    fig = go.Figure(layout=dict(template=TEMPLATE, height=480))
    for rung, group in done.groupby("last_rung"):
        fig.add_scatter(
            name=f"stopped at rung {rung} ({len(group)})", x=list(group.params_total), y=list(group.value),
            error_y=dict(type="data", array=[_float(v) or 0.0 for v in group.stderr], visible=True),
            mode="markers", text=list(group.hover), hovertemplate="%{text}<extra></extra>", marker=dict(size=9 + 3 * int(rung)),
        )
    front = done[done.pareto].sort_values("params_total")
    if not front.empty:
        fig.add_scatter(
            name=f"Pareto front of the last rung by score ({len(front)})", x=list(front.params_total), y=list(front.value),
            mode="lines", line=dict(color="rgb(239,85,59)", width=2, shape="hv"), hoverinfo="skip",
        )
    fig.update_layout(
        title=f"{title} ({len(done)} candidates; bars: one standard error)",
        xaxis_title="parameters (total)", yaxis_title=f"{METRIC_LABELS.get(rung_metric, rung_metric)} at the last rung reached, lower is better",
        legend=dict(orientation="h", y=1.02, yanchor="bottom", x=1, xanchor="right"),
    )
    return fig


def parallel_figure(done: pd.DataFrame, study: optuna.Study) -> go.Figure:
    title = "All candidates over every axis"
    if done.empty:
        return _empty(title, "no finished trial yet")
    columns = {**ARCH_COLUMNS, "params_total": "params", "last_rung": "last rung", "value": "score"}
    if "decode_tokens_per_s" in done and done.decode_tokens_per_s.notna().all():  # measured (latency section of the space): one more axis
        columns = {**columns, "decode_tokens_per_s": "decode tok/s"}
    values = {label: [float(v) for v in done[col]] for col, label in columns.items()}
    lower_is_better = True  # the rung metric

    def colouring(label):
        reverse = label == "score" and lower_is_better  # the brightest line is the best score
        return {"line.color": [values[label]], "line.colorbar.title.text": label, "line.reversescale": reverse}

    def dimension(label, v):
        if label in ARCH_COLUMNS.values() and len(set(v)) <= 16:  # an integer axis: tick only its values
            return dict(label=label, values=v, tickvals=sorted(set(v)), ticktext=[f"{int(x)}" for x in sorted(set(v))])
        return dict(label=label, values=v, tickformat=".4~f" if label == "score" else ".4~s")

    fig = go.Figure(go.Parcoords(
        dimensions=[dimension(label, v) for label, v in values.items()],
        line=dict(color=values["score"], colorscale="Viridis", reversescale=lower_is_better, showscale=True,
                  colorbar=dict(title=dict(text="score"))),
    ))
    fig.update_layout(
        template=TEMPLATE, height=460, title=f"{title} (colour: choose an axis; drag on an axis to filter)",
        margin=dict(l=70, r=40, t=110, b=40),
        updatemenus=[dict(
            buttons=[dict(label=f"colour by {label}", method="restyle", args=[colouring(label)]) for label in reversed(values)],
            direction="down", x=1.0, xanchor="right", y=1.22, yanchor="top",
        )],
    )
    return fig


def rank_stability_figure(done: pd.DataFrame, study: optuna.Study, tau: float | None = None) -> go.Figure:
    """Each candidate's value at one rung against the next (and before retraining against rung 0)."""
    title = "Rank stability between rungs"
    rungs = study.user_attrs.get("rungs", 1)
    pairs = []
    first = rung_values(study, 0)
    before = {k: t.user_attrs["before"] for k, t in first.items() if t.user_attrs.get("before") is not None}
    pairs.append(("before retraining → rung 0", before, {k: t.user_attrs["value"] for k, t in first.items()}))
    for index in range(rungs - 1):
        a, b = rung_values(study, index), rung_values(study, index + 1)
        pairs.append((f"rung {index} → rung {index + 1}", {k: t.user_attrs["value"] for k, t in a.items()},
                      {k: t.user_attrs["value"] for k, t in b.items()}))
    fig = go.Figure(layout=dict(template=TEMPLATE, height=440))
    notes = []
    for label, x, y in pairs:
        shared = sorted(set(x) & set(y))
        if not shared:
            continue
        value, n = rung_tau(x, y)
        notes.append(f"{label}: τ {'-' if value is None else f'{value:.2f}'} (n={n})")
        fig.add_scatter(name=f"{label} (n={n})", x=[x[k] for k in shared], y=[y[k] for k in shared], mode="markers",
                        text=shared, hovertemplate="%{text}<br>%{x:.4f} → %{y:.4f}<extra></extra>", marker=dict(size=10))
    if not fig.data:
        return _empty(title, "no candidate measured at two points yet")
    fig.update_layout(title=f"{title}: " + "; ".join(notes), xaxis_title="value at the earlier point", yaxis_title="value at the later point")
    return fig


def retrain_curves_figure(done: pd.DataFrame) -> go.Figure | dict:
    """A figure dict: hundreds of traces built as go objects would cost seconds after every trial."""
    title = "Retraining by distillation, per trial"
    if done.empty or not any(len(c) for c in done.retrain_curve):
        return _empty(title, "no retraining curve recorded yet")
    fig = make_subplots(rows=1, cols=1, subplot_titles=("training KD loss per step, at the last rung reached",))
    fig.update_xaxes(title_text="optimizer step")
    fig.update_layout(template=TEMPLATE, height=440, title=title)
    palette = pio.templates[TEMPLATE].layout.colorway or ("#636efa",)
    traces = []
    for k, (trial, train) in enumerate(zip(done.trial, done.retrain_curve)):
        colour, name = palette[k % len(palette)], f"trial {trial}"
        for axis, curve in (("", train),):
            if curve:
                traces.append(dict(
                    type="scatter", x=[p[0] for p in curve], y=[p[1] for p in curve], xaxis=f"x{axis}", yaxis=f"y{axis}",
                    mode="lines" if not axis else "lines+markers", name=name, legendgroup=name, showlegend=not axis,
                    line=dict(color=colour, width=1.5), hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.4f}}<extra></extra>",
                ))
    return {**fig.to_plotly_json(), "data": traces}


def head_figure(rankings, problem: str | None) -> go.Figure:
    title = "Head importance per layer"
    if rankings is None:
        return _empty(title, problem or "no rankings")
    heads = rankings.heads.float()
    fig = go.Figure(go.Heatmap(
        z=heads.tolist(), x=list(range(heads.shape[1])), y=list(range(heads.shape[0])), colorscale="Viridis",
        colorbar=dict(title=dict(text="score")), hovertemplate="layer %{y} head %{x}<br>%{z:.4g}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, height=460, title=f"{title} ({heads.shape[0]} layers x {heads.shape[1]} query heads)",
                      xaxis_title="query head", yaxis_title="layer")
    return fig


def neuron_channel_figure(rankings, problem: str | None) -> go.Figure:
    title = "Neuron and channel importance"
    if rankings is None:
        return _empty(title, problem or "no rankings")
    import torch

    # scores are heavy-tailed: log scales; zeros (dead units) are drawn at the smallest positive score
    neurons, channels = rankings.neurons.float(), rankings.channels.float()
    positive = torch.cat([neurons.flatten(), channels])
    floor = positive[positive > 0].min().item() if (positive > 0).any() else 1e-12
    neurons, channels = neurons.clamp_min(floor), channels.clamp_min(floor)
    q = torch.quantile(neurons, torch.tensor([0.25, 0.5, 0.75]), dim=1)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], subplot_titles=(
        f"FFN neuron scores per layer ({neurons.shape[1]} neurons each)", f"embedding channel scores ({channels.numel()} channels)"))
    fig.add_trace(go.Box(  # precomputed quartiles: the page stays small for 8B teachers
        name="neurons", x=list(range(neurons.shape[0])), q1=q[0].tolist(), median=q[1].tolist(), q3=q[2].tolist(),
        lowerfence=neurons.min(dim=1).values.tolist(), upperfence=neurons.max(dim=1).values.tolist(),
        mean=neurons.mean(dim=1).tolist(), showlegend=False,
    ), row=1, col=1)
    fig.add_trace(go.Histogram(name="channels", x=channels.log10().tolist(), nbinsx=60, showlegend=False,
                               hovertemplate="log10 score %{x}<br>%{y} channels<extra></extra>"), row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_yaxes(title_text="score (min, quartiles, max)", type="log", row=1, col=1)
    fig.update_xaxes(title_text="log10 score", row=1, col=2)
    fig.update_yaxes(title_text="channels", row=1, col=2)
    fig.update_layout(template=TEMPLATE, height=440, title=title)
    return fig


def layer_figure(rankings, problem: str | None) -> go.Figure:
    title = "Layer importance"
    if rankings is None:
        return _empty(title, problem or "no rankings")
    bi = rankings.block_importance.float().tolist()
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Block Importance (1 - cos(input, output))", "held-out loss with the layer dropped"))
    fig.add_bar(name="Block Importance", x=list(range(len(bi))), y=bi, showlegend=False, row=1, col=1)
    if rankings.layer_loss is not None:
        loss = rankings.layer_loss.float().tolist()
        fig.add_bar(name="layer-drop loss", x=list(range(len(loss))), y=loss, showlegend=False, marker_color="rgb(239,85,59)", row=1, col=2)
    else:
        left, right = fig.layout.xaxis2.domain
        fig.add_annotation(text="not computed: rank with --layer-loss", showarrow=False, xref="paper", yref="paper",
                           x=(left + right) / 2, y=0.5)
        fig.update_xaxes(visible=False, row=1, col=2)
        fig.update_yaxes(visible=False, row=1, col=2)
    fig.update_xaxes(title_text="layer")
    fig.update_layout(template=TEMPLATE, height=400, title=title)
    return fig


def distill_figure(curve: list[dict] | None, problem: str | None) -> go.Figure:
    title = "Final distillation of the winner"
    if curve is None:
        missing = problem is not None and problem.endswith("not found")
        return _empty(title, "distillation has not run yet" if missing else problem or "no curve")
    fig = go.Figure(layout=dict(template=TEMPLATE, height=420, title=title, xaxis_title="optimizer step", yaxis_title="loss"))
    for key, name in (("train_loss", "training loss"), ("eval_loss", "held-out loss")):
        points = [(p["step"], p[key]) for p in curve if p.get(key) is not None]
        if points:
            fig.add_scatter(name=name, x=[s for s, _ in points], y=[v for _, v in points],
                            mode="lines" if key == "train_loss" else "lines+markers")
    if not fig.data:
        return _empty(title, "the distillation curve has no losses yet")
    return fig


def figures(run_dir: Path, study: optuna.Study, done: pd.DataFrame) -> dict[str, go.Figure | dict]:
    rankings, problem = _load_rankings(run_dir)
    curve, curve_problem = load_distill_curve(run_dir)
    return {
        "pareto": pareto_figure(done, study),
        "parallel": parallel_figure(done, study),
        "rank-stability": rank_stability_figure(done, study),
        "retrain-curves": retrain_curves_figure(done),
        "head-importance": head_figure(rankings, problem),
        "neuron-channel-importance": neuron_channel_figure(rankings, problem),
        "layer-importance": layer_figure(rankings, problem),
        "distill-curves": distill_figure(curve, curve_problem),
    }


# --------------------------------------------------------------------------- outputs


def _best_line(study: optuna.Study, done: pd.DataFrame) -> str:
    row = _best(study, done)
    if row is None:
        return "no candidate has finished the last rung yet"
    arch = ", ".join(f"{label} {_int(row[col])}" for col, label in ARCH_COLUMNS.items())
    tied = done[done.tied_with_best & ~done.best]
    ties = f"; tied within one standard error with {len(tied)} other(s): {', '.join(tied.key)}" if len(tied) else ""
    return f"trial {row.trial}: {arch}; {_int(row.params_total):,} parameters; score {row.score:.4f} ± {_fmt(_float(row.score_stderr))}{ties}"


def _summary(study: optuna.Study, done: pd.DataFrame) -> str:
    states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False) if "rung" in t.user_attrs]).value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "no trials yet"
    cost = search_cost(study)
    return (
        f"<p><b>metric</b> {html.escape(_score_label(study))} · <b>trials</b> {html.escape(counts)} · "
        f"<b>search cost</b> {cost['tokens']:,} training tokens, {cost['seconds']:,.0f} s</p>"
        f"<p><b>best</b> {html.escape(_best_line(study, done))}</p>"
    )


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }}
h1 {{ font-size: 1.5em; margin-bottom: .2em; }} p {{ margin: .3em 0; }} .muted {{ color: #777; font-size: .9em; }}
section {{ margin-top: 1.2em; border-top: 1px solid #e5e5e5; padding-top: .4em; }}
code {{ background: #f4f4f4; padding: 0 .3em; }}
</style></head>
<body>
<h1>{title}</h1>
{summary}
<p class="muted">Generated {when} from {source}. Tables: <a href="report.md">report.md</a>.
Studies open in optuna-dashboard too: <code>optuna-dashboard {storage}</code>.</p>
{sections}
</body></html>
"""


def build_dashboard(run_dir: str | Path, storage: str | None = None, *, study: optuna.Study | None = None) -> Path:
    """Write RUN_DIR/dashboard.html (atomically) and return its path. `study` skips reopening the storage."""
    run_dir = Path(run_dir)
    study = study or open_run_study(run_dir, storage)
    run_dir.mkdir(parents=True, exist_ok=True)
    done = finished(study)
    sections = []
    for k, (div_id, fig) in enumerate(figures(run_dir, study, done).items()):
        fig = fig if isinstance(fig, dict) else fig.to_plotly_json()
        fig["layout"]["autosize"] = True
        snippet = pio.to_html(
            fig, include_plotlyjs=k == 0, full_html=False, div_id=div_id, validate=False,
            default_height=f"{fig['layout'].get('height') or 450}px", config={"displaylogo": False, "responsive": True},
        )
        sections.append(f'<section class="figure" data-figure="{div_id}">{snippet}</section>')
    url = storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"
    page = PAGE.format(
        title=html.escape(f"minitron_nas search: {run_dir.resolve().name}"),
        summary=_summary(study, done),
        when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        source=html.escape(str(run_dir.resolve())),
        storage=html.escape(url),
        sections="\n".join(sections),
    )
    return write_text_atomic(RunFolder(run_dir).dashboard, page)


# --------------------------------------------------------------------------- report.md


def _space_facts(study: optuna.Study, run_dir: Path) -> list[str]:
    """Budget and feasible count from the study's space file; degrades to best_arch.json's budget."""
    lines, source = [], study.user_attrs.get("space")
    try:
        from .space import enumerate_candidates, load_space

        if not source:
            raise MinitronError("the study records no search space file")
        space = load_space(source)
        b = space.budget
        memory = f", memory <= {b.memory_gb} GiB at context {b.context} x batch {b.batch}" if b.memory_gb is not None else ""
        lines.append(f"- budget: {b.parameters:,} {b.count} parameters +/- {b.tolerance:.0%}{memory} (space `{source}`)")
    except Exception as err:
        best, _ = _read_json(RunFolder(run_dir).best_arch)
        budget = (best or {}).get("budget") if isinstance(best, dict) else None
        if budget:
            lines.append(f"- budget: {budget['parameters']:,} {budget.get('count', 'total')} parameters "
                         f"+/- {budget.get('tolerance', 0):.0%} (from best_arch.json)")
        else:
            lines.append("- budget: unknown")
        lines.append(f"- feasible architectures: unknown (search space unavailable: {err})")
        return lines
    try:
        from .teachers import load_config

        feasible, valid = enumerate_candidates(space, load_config(space.teacher))
        lines.append(f"- feasible architectures: {len(feasible):,} of {len(valid):,} valid ones (teacher `{space.teacher}`)")
    except Exception as err:
        lines.append(f"- feasible architectures: unknown (teacher config `{space.teacher}` unavailable: {err})")
    return lines


def _md(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4f", intfmt=",")


def _pm(value, stderr) -> str:
    value, stderr = _float(value), _float(stderr)
    return "-" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _candidates(frame: pd.DataFrame) -> pd.DataFrame:
    columns = {"trial": "trial", **ARCH_COLUMNS, "params_total": "params", "last_rung": "last rung", "tokens": "tokens"}
    out = frame[list(columns)].rename(columns=columns)
    for col in ("hidden", "ffn", "heads", "kv groups", "layers", "params", "tokens"):
        out[col] = out[col].astype("int64")
    out["value"] = [_pm(v, e) for v, e in zip(frame.value, frame.stderr)]
    out["score"] = [_pm(v, e) for v, e in zip(frame.score, frame.score_stderr)]
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
        tau, n = row.get("tau_with_previous", row.get("tau_before_retraining")), row.get("tau_n", row.get("tau_before_n"))
        rows.append({
            "rung": row["rung"], "tokens each": planned.get("tokens"), "planned": planned.get("candidates"),
            "finished": row["finished"], "kept": row.get("kept", "-"),
            "Kendall tau (n)": f"{'-' if tau is None else f'{tau:.2f}'} (n={n})" + (" vs before retraining" if row["rung"] == 0 else " vs previous rung"),
            "cut within 1 SE of the last kept": row.get("cut_within_one_se", "-"),
        })
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


def _teacher_params(study: optuna.Study) -> int | None:
    try:
        from .architecture import Architecture, ParamCounter
        from .space import load_space
        from .teachers import load_config

        config = load_config(load_space(study.user_attrs["space"]).teacher)
        return ParamCounter(config).count(Architecture.from_config(config)).total
    except Exception:
        return None


def _best(study: optuna.Study, done: pd.DataFrame):
    best = done[done.best] if not done.empty else done
    return None if best.empty else best.iloc[0]


def _distill_section(study: optuna.Study, done: pd.DataFrame, run_dir: Path) -> list[str]:
    lines = ["## Winner before and after full distillation, beside the teacher", ""]
    best = _best(study, done)
    if best is not None:
        lines += [f"In the search the winner (trial {best.trial}, {int(best.params_total):,} parameters) scored "
                  f"{_pm(best.score, best.score_stderr)} ({study.user_attrs.get('metric', 'score')}) after retraining on "
                  f"{int(best.tokens):,} tokens at the last rung.", ""]
    summary, problem = load_distill_summary(run_dir)
    if summary is None:
        missing = problem is not None and problem.endswith("not found")
        lines.append("Distillation has not run yet" + ("" if missing else f" ({problem})") +
                     ": this section is filled from `distill/summary.json` when it exists.")
        return lines
    teacher = _numbers(summary.get("teacher"))
    winner_params = _int(best.params_total) if best is not None else None
    rows = [
        ("teacher", teacher.pop("params_total", None) or _teacher_params(study), teacher),
        ("winner, pruned, before distillation", winner_params, _numbers(summary.get("before"))),
        ("winner after full distillation", winner_params, _numbers(summary.get("after"))),
    ]
    for _, _, values in rows[1:]:
        values.pop("params_total", None)
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
        f"- metric: {_score_label(study)}; rungs compared on {study.user_attrs.get('rung_metric', 'kld')} at equal tokens",
        f"- trials: {', '.join(f'{n} {s.lower()}' for s, n in states.items()) or 'none yet'}; {len(done)} candidates finished a rung",
        f"- search cost: {cost['tokens']:,} training tokens (budget {_fmt(study.user_attrs.get('budget_tokens'))}), {cost['seconds']:,.0f} s",
        f"- best: {_best_line(study, done)}",
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
    lines += ["", *_distill_section(study, done, run_dir), ""]
    return write_text_atomic(RunFolder(run_dir).report, "\n".join(lines))
