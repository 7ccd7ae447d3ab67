"""The report recipe: a run folder's dashboard.html and report.md, rebuilt from its study."""

from __future__ import annotations

from pathlib import Path

import optuna

from minitron_nas.report.dashboard import build_dashboard
from minitron_nas.report.run_data import open_run_study
from minitron_nas.report.summary import write_report

__all__ = ["report_stage"]


def report_stage(run_dir: Path, storage: str | None = None) -> tuple[optuna.Study, Path, Path]:
    """`minitron-nas dashboard`: (the study, RUN/dashboard.html, RUN/report.md), both rewritten from the study in `storage`
    (default: RUN/study.db)."""
    study = open_run_study(run_dir, storage)
    return study, build_dashboard(run_dir, storage, study=study), write_report(run_dir, storage, study=study)
