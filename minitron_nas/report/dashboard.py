"""What a search run found, as one offline interactive page.

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
- `distill-curves`: the final distillation of the winner, from RUN_DIR/distill/curve.json;
- `family` (after `export --front`): a link to each exported member of the Pareto front.

The figures read the study and the run folder through run_data.py's readers; a missing
piece (no finished trial, no rankings, no distillation yet) leaves its figure in place,
empty, with a note saying what is missing. The page is replaced atomically.
"""

from __future__ import annotations

import html
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from minitron_nas.files import RunFolder, write_text_atomic
from minitron_nas.report.family import family_html
from minitron_nas.report.labels import ARCH_COLUMNS, METRIC_LABELS, as_float, best_line, hover_text, score_label
from minitron_nas.report.run_data import finished, load_distill_curve, load_rankings, open_run_study
from minitron_nas.search.halving import rung_tau
from minitron_nas.search.study import rung_values, search_cost, storage_url

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
TEMPLATE = "plotly_white"


# --------------------------------------------------------------------------- figures


def _empty(title: str, note: str) -> go.Figure:
    fig = go.Figure(layout=dict(title=title, template=TEMPLATE, height=320))
    fig.add_annotation(
        text=note.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14)
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def pareto_figure(done: pd.DataFrame, study: optuna.Study) -> go.Figure:
    title = "Every candidate at its last rung: parameters vs value"
    if done.empty:
        return _empty(title, "no finished trial yet")
    rung_metric = study.user_attrs.get("rung_metric", "kld")
    fig = go.Figure(layout=dict(template=TEMPLATE, height=480))
    for rung, group in done.groupby("last_rung"):
        fig.add_scatter(
            name=f"stopped at rung {rung} ({len(group)})",
            x=list(group.params_total),
            y=list(group.value),
            error_y=dict(type="data", array=[as_float(v) or 0.0 for v in group.stderr], visible=True),
            mode="markers",
            text=[hover_text(row) for _, row in group.iterrows()],
            hovertemplate="%{text}<extra></extra>",
            marker=dict(size=9 + 3 * int(rung)),
        )
    front = done[done.pareto].sort_values("params_total")
    if not front.empty:
        fig.add_scatter(
            name=f"Pareto front of the last rung by score ({len(front)})",
            x=list(front.params_total),
            y=list(front.value),
            mode="lines",
            line=dict(color="rgb(239,85,59)", width=2, shape="hv"),
            hoverinfo="skip",
        )
    fig.update_layout(
        title=f"{title} ({len(done)} candidates; bars: one standard error)",
        xaxis_title="parameters (total)",
        yaxis_title=f"{METRIC_LABELS.get(rung_metric, rung_metric)} at the last rung reached, lower is better",
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

    fig = go.Figure(
        go.Parcoords(
            dimensions=[dimension(label, v) for label, v in values.items()],
            line=dict(color=values["score"], colorscale="Viridis", reversescale=lower_is_better, showscale=True, colorbar=dict(title=dict(text="score"))),
        )
    )
    fig.update_layout(
        template=TEMPLATE,
        height=460,
        title=f"{title} (colour: choose an axis; drag on an axis to filter)",
        margin=dict(l=70, r=40, t=110, b=40),
        updatemenus=[
            dict(
                buttons=[dict(label=f"colour by {label}", method="restyle", args=[colouring(label)]) for label in reversed(values)],
                direction="down",
                x=1.0,
                xanchor="right",
                y=1.22,
                yanchor="top",
            )
        ],
    )
    return fig


def rank_stability_figure(done: pd.DataFrame, study: optuna.Study, tau: float | None = None) -> go.Figure:
    """Each candidate's value at one rung against the next (rung 0: scored pruned)."""
    title = "Rank stability between rungs"
    rungs = study.user_attrs.get("rungs", 1)
    pairs = []
    for index in range(rungs - 1):
        a, b = rung_values(study, index), rung_values(study, index + 1)
        pairs.append((f"rung {index} → rung {index + 1}", {k: t.user_attrs["value"] for k, t in a.items()}, {k: t.user_attrs["value"] for k, t in b.items()}))
    fig = go.Figure(layout=dict(template=TEMPLATE, height=440))
    notes = []
    for label, x, y in pairs:
        shared = sorted(set(x) & set(y))
        if not shared:
            continue
        tau = rung_tau(x, y)
        value, n = tau["tau"], tau["n"]
        interval = f" [{tau['low']:.2f}, {tau['high']:.2f}]" if tau["low"] is not None else ""
        notes.append(f"{label}: τ {'-' if value is None else f'{value:.2f}'}{interval} (n={n})")
        fig.add_scatter(
            name=f"{label} (n={n})",
            x=[x[k] for k in shared],
            y=[y[k] for k in shared],
            mode="markers",
            text=shared,
            hovertemplate="%{text}<br>%{x:.4f} → %{y:.4f}<extra></extra>",
            marker=dict(size=10),
        )
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
                traces.append(
                    dict(
                        type="scatter",
                        x=[p[0] for p in curve],
                        y=[p[1] for p in curve],
                        xaxis=f"x{axis}",
                        yaxis=f"y{axis}",
                        mode="lines" if not axis else "lines+markers",
                        name=name,
                        legendgroup=name,
                        showlegend=not axis,
                        line=dict(color=colour, width=1.5),
                        hovertemplate=f"{name}<br>step %{{x}}<br>%{{y:.4f}}<extra></extra>",
                    )
                )
    return {**fig.to_plotly_json(), "data": traces}


def head_figure(rankings, problem: str | None) -> go.Figure:
    title = "Head importance per layer"
    if rankings is None:
        return _empty(title, problem or "no rankings")
    heads = rankings.heads.float()
    fig = go.Figure(
        go.Heatmap(
            z=heads.tolist(),
            x=list(range(heads.shape[1])),
            y=list(range(heads.shape[0])),
            colorscale="Viridis",
            colorbar=dict(title=dict(text="score")),
            hovertemplate="layer %{y} head %{x}<br>%{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(
        template=TEMPLATE, height=460, title=f"{title} ({heads.shape[0]} layers x {heads.shape[1]} query heads)", xaxis_title="query head", yaxis_title="layer"
    )
    return fig


def neuron_channel_figure(rankings, problem: str | None) -> go.Figure:
    title = "Neuron and channel importance"
    if rankings is None:
        return _empty(title, problem or "no rankings")
    import torch  # only to draw the rankings: a finished run's page builds without loading torch otherwise

    # scores are heavy-tailed: log scales; zeros (dead units) are drawn at the smallest positive score
    # an MoE teacher's MLP neurons are its experts': every expert's neurons of a layer in one box
    kind = "FFN" if rankings.neurons is not None else "expert"
    neurons = (rankings.neurons if rankings.neurons is not None else rankings.expert_neurons.flatten(1)).float()
    channels = rankings.channels.float()
    positive = torch.cat([neurons.flatten(), channels])
    floor = positive[positive > 0].min().item() if (positive > 0).any() else 1e-12
    neurons, channels = neurons.clamp_min(floor), channels.clamp_min(floor)
    q = torch.quantile(neurons, torch.tensor([0.25, 0.5, 0.75]), dim=1)
    fig = make_subplots(
        rows=1,
        cols=2,
        column_widths=[0.62, 0.38],
        subplot_titles=(f"{kind} neuron scores per layer ({neurons.shape[1]} neurons each)", f"embedding channel scores ({channels.numel()} channels)"),
    )
    fig.add_trace(
        go.Box(  # precomputed quartiles: the page stays small for 8B teachers
            name="neurons",
            x=list(range(neurons.shape[0])),
            q1=q[0].tolist(),
            median=q[1].tolist(),
            q3=q[2].tolist(),
            lowerfence=neurons.min(dim=1).values.tolist(),
            upperfence=neurons.max(dim=1).values.tolist(),
            mean=neurons.mean(dim=1).tolist(),
            showlegend=False,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Histogram(
            name="channels", x=channels.log10().tolist(), nbinsx=60, showlegend=False, hovertemplate="log10 score %{x}<br>%{y} channels<extra></extra>"
        ),
        row=1,
        col=2,
    )
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
        fig.add_annotation(text="not computed: rank with --layer-loss", showarrow=False, xref="paper", yref="paper", x=(left + right) / 2, y=0.5)
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
            fig.add_scatter(name=name, x=[s for s, _ in points], y=[v for _, v in points], mode="lines" if key == "train_loss" else "lines+markers")
    if not fig.data:
        return _empty(title, "the distillation curve has no losses yet")
    return fig


def figures(run_dir: Path, study: optuna.Study, done: pd.DataFrame) -> dict[str, go.Figure | dict]:
    rankings, problem = load_rankings(run_dir)
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


def _summary(study: optuna.Study, done: pd.DataFrame) -> str:
    states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False) if "rung" in t.user_attrs]).value_counts()
    counts = ", ".join(f"{n} {s.lower()}" for s, n in states.items()) or "no trials yet"
    cost = search_cost(study)
    return (
        f"<p><b>metric</b> {html.escape(score_label(study))} · <b>trials</b> {html.escape(counts)} · "
        f"<b>search cost</b> {cost['tokens']:,} training tokens, {cost['seconds']:,.0f} s</p>"
        f"<p><b>best</b> {html.escape(best_line(study, done))}</p>"
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
{family}
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
            fig,
            include_plotlyjs=k == 0,
            full_html=False,
            div_id=div_id,
            validate=False,
            default_height=f"{fig['layout'].get('height') or 450}px",
            config={"displaylogo": False, "responsive": True},
        )
        sections.append(f'<section class="figure" data-figure="{div_id}">{snippet}</section>')
    page = PAGE.format(
        title=html.escape(f"minitron_nas search: {run_dir.resolve().name}"),
        summary=_summary(study, done),
        when=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        source=html.escape(str(run_dir.resolve())),
        storage=html.escape(storage_url(storage, run_dir)),
        sections="\n".join(sections),
        family=family_html(run_dir),
    )
    return write_text_atomic(RunFolder(run_dir).dashboard, page)
