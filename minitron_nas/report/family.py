"""The family export's members (RUN/family/index.csv, written by `export --front`) as links in
report.md and dashboard.html; relative, so the run folder can be moved, copied or served."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from minitron_nas.files import RunFolder
from minitron_nas.report.labels import plus_minus

__all__ = ["family_html", "family_markdown"]

TITLE = "Family export: the last rung's Pareto front, each member fully distilled"


def _index(run_dir: Path) -> pd.DataFrame | None:
    """The index, or None when there is none or it cannot be read (the views never fail on it)."""
    path = RunFolder(run_dir).family_index_csv
    if not path.is_file():
        return None
    try:
        index = pd.read_csv(path)
    except Exception:  # a damaged index: the views leave the section out
        return None
    return index if {"key", "params_total", "folder"} <= set(index.columns) else None


def _rows(index: pd.DataFrame) -> list[dict]:
    return [
        {
            "model": row.key + (" (winner)" if bool(row.get("winner")) else ""),
            "params": f"{int(row.params_total):,}",
            "search score": plus_minus(row.get("score"), row.get("score_stderr")),
            "held-out loss": plus_minus(row.get("heldout_loss"), row.get("heldout_loss_stderr")),
            "KL to teacher": plus_minus(row.get("kld"), row.get("kld_stderr")),
            "folder": row.folder,
        }
        for _, row in index.iterrows()
    ]


def family_markdown(run_dir: Path) -> list[str]:
    """A report.md section linking each member's folder; none before `export --front`."""
    index = _index(run_dir)
    if index is None:
        return []
    rows = [{**row, "folder": f"[{row['folder']}]({row['folder']})"} for row in _rows(index)]
    return [f"## {TITLE}", "", pd.DataFrame(rows).to_markdown(index=False), ""]


def family_html(run_dir: Path) -> str:
    """A dashboard section linking each member's folder; empty before `export --front`."""
    index = _index(run_dir)
    if index is None:
        return ""
    items = "".join(
        f'<li><a href="{html.escape(row["folder"])}/">{html.escape(row["model"])}</a>: {html.escape(row["params"])} parameters, '
        f"search score {html.escape(row['search score'])}, held-out loss {html.escape(row['held-out loss'])}</li>"
        for row in _rows(index)
    )
    return f'<section id="family"><h2>{TITLE}</h2><ul>{items}</ul><p class="muted">Table: <a href="family/index.md">family/index.md</a>.</p></section>'
