"""How report.md and the dashboard name and show things: metric labels, numbers, the winner's line."""

from __future__ import annotations

import math

import optuna
import pandas as pd

from minitron_nas.report.run_data import best_row, maximizes
from minitron_nas.search.halving import TIE_RULE

__all__ = ["ARCH_COLUMNS", "FAMILY_LABELS", "METRIC_LABELS", "as_float", "as_int", "best_line", "fmt", "hover_text", "plus_minus", "score_label"]

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
FAMILY_LABELS = {  # the MoE and hybrid sizes, shown where a trial has them
    "num_experts": "experts",
    "moe_intermediate_size": "expert ffn",
    "shared_expert_intermediate_size": "shared ffn",
    "mamba_num_heads": "mamba heads",
    "mamba_head_dim": "mamba dim",
    "num_mamba_layers": "mamba layers",
    "num_attention_layers": "attn layers",
    "num_mlp_layers": "mlp layers",
}


def score_label(study: optuna.Study) -> str:
    metric = study.user_attrs.get("metric", "score")
    arrow = "higher is better" if maximizes(study) else "lower is better"
    return f"{METRIC_LABELS.get(metric, metric)}, {arrow}"


def fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else f"{value:,}"


def hover_text(row) -> str:
    shown = {**ARCH_COLUMNS, **{c: label for c, label in FAMILY_LABELS.items() if as_int(row.get(c)) is not None}}
    arch = " · ".join(f"{label} {fmt(as_int(row[col]))}" for col, label in shown.items())
    return (
        f"<b>trial {row.trial}</b>{' (Pareto)' if row.get('pareto') else ''}<br>{arch}<br>"
        f"params {fmt(as_int(row.params_total))} (non-embedding {fmt(as_int(row.params_non_embedding))})<br>"
        f"stopped at rung {row.last_rung} ({fmt(as_int(row.tokens))} tokens): {fmt(as_float(row.value))} ± {fmt(as_float(row.stderr))}"
        + ("" if as_float(row.score) is None else f"<br>score {fmt(as_float(row.score))} ± {fmt(as_float(row.score_stderr))}")
        + (" (tied with the best)" if row.get("tied_with_best") else "")
        + ("" if as_float(row.get("decode_tokens_per_s")) is None else f"<br>decode {row.decode_tokens_per_s:,.0f} tokens/s")
    )


def as_int(v):
    try:
        return None if v is None or math.isnan(float(v)) else int(v)
    except TypeError:  # pandas' NA (a nullable Int64 column's gap)
        return None


def as_float(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def plus_minus(value, stderr) -> str:
    """A value with its standard error, "-" when there is none."""
    value, stderr = as_float(value), as_float(stderr)
    return "-" if value is None else f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def best_line(study: optuna.Study, done: pd.DataFrame) -> str:
    row = best_row(study, done)
    if row is None:
        return "no candidate has finished the last rung yet"
    arch = ", ".join(f"{label} {as_int(row[col])}" for col, label in ARCH_COLUMNS.items())
    tied = done[done.tied_with_best & ~done.best]
    ties = f"; tied within one standard error with {len(tied)} other(s): {', '.join(tied.key)}, the tie broken by {TIE_RULE}" if len(tied) else ""
    return f"trial {row.trial}: {arch}; {as_int(row.params_total):,} parameters; score {row.score:.4f} ± {fmt(as_float(row.score_stderr))}{ties}"
