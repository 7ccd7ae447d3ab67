"""The whole recipe over one run folder: rank -> search -> distill -> export -> report.

Each stage is skipped once finished (RUN/stages.json); RUN/run.json records what the run was
made from (settings, data, teacher), and a rerun with any of them changed is refused.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from minitron_nas.errors import MinitronError, resume_hint
from minitron_nas.files import RunFolder, read_stage_file, write_json_atomic
from minitron_nas.model.teachers import Teacher, load_teacher
from minitron_nas.provenance import data_signature, file_sha256, first_difference
from minitron_nas.prune.ranking import load_or_rank
from minitron_nas.recipes.distill import distill_winner
from minitron_nas.recipes.export import export_stage
from minitron_nas.recipes.report import report_stage
from minitron_nas.recipes.search import best_arch
from minitron_nas.report.dashboard import build_dashboard
from minitron_nas.search.runner import run_search
from minitron_nas.search.study import check_study_file

__all__ = ["STAGES", "finished_stages", "run"]


STAGES = ("rank", "search", "distill", "export", "report")


def finished_stages(out: Path) -> dict:
    path = RunFolder(out).stages
    return read_stage_file(path, "delete it and rerun the same command (finished stages are checked again, not redone)") if path.is_file() else {}


def _mark_done(out: Path, stage: str, info: dict) -> None:
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items() if not isinstance(v, (dict, list)))
    print(f"stage {stage} done: {summary}", file=sys.stderr, flush=True)
    done = finished_stages(out)
    done[stage] = {"finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
    write_json_atomic(RunFolder(out).stages, done)


def run(space, out: Path, storage: str | None = None, n_trials: int | None = None, teacher: Teacher | None = None) -> Path:
    """rank -> search -> distill -> export -> report, each stage skipped once finished.

    With `space.family` (several budgets, largest first), each member is a run of its own in
    `out/<budget>`, and its teacher is the previous member's exported model (best practice 1).
    Returns the folder of the last exported model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if space.family:
        exported = None
        for budget in sorted(space.family, reverse=True):
            member = replace(space, budget=replace(space.budget, parameters=budget), family=())
            if exported is not None:
                member = replace(member, teacher=str(exported))
            exported = run(member, out / f"budget-{budget}", storage, n_trials)
        return exported
    return _run_single(space, out, storage, n_trials, teacher)


def _run_single(space, out: Path, storage, n_trials, teacher) -> Path:
    done = finished_stages(out)
    made_from = _made_from(space)
    _check_made_from(out, made_from)  # settings and data: before the teacher loads
    teacher = teacher or load_teacher(space.teacher, space.device.device, space.device.dtype)
    made_from["teacher_fingerprint"] = teacher.fingerprint
    _check_made_from(out, made_from)
    check_study_file(RunFolder(out).study_db)  # a damaged study is refused before anything is written
    write_json_atomic(RunFolder(out).run_file, made_from)
    stage = STAGES[0]
    try:
        stage = "rank"
        if "rank" not in done:
            folder = RunFolder(out).rankings
            load_or_rank(teacher, space.ranking, folder)
            _mark_done(out, "rank", {"rankings": str(folder)})
        stage = "search"
        if "search" not in done:
            resume = RunFolder(out).study_db.is_file() or storage is not None
            try:
                run_search(space, out, storage, n_trials, resume=resume, teacher=teacher, on_trial=lambda study, _: build_dashboard(out, study=study))
            except MinitronError:  # e.g. every candidate failed: the views still show what happened
                if RunFolder(out).study_db.is_file() or storage is not None:
                    report_stage(out, storage)
                raise
            if not RunFolder(out).best_arch.is_file():
                raise MinitronError(f"the search has not finished its last rung yet: rerun the same command to continue ({out / 'trials.csv'})")
            best = best_arch(out)
            _mark_done(out, "search", {"best_architecture": best["architecture"], "score": best["score"], "search_tokens": best["search_tokens"]})
        stage = "distill"
        if "distill" not in done:
            summary = distill_winner(space, out, teacher)
            _mark_done(out, "distill", {"heldout_loss_after": summary.get("heldout_loss_after")})
        stage = "export"
        if "export" not in done:
            export_stage(space, out, teacher)
            _mark_done(out, "export", {"folder": str(RunFolder(out).export)})
        stage = "report"
        if "report" not in done:
            report_stage(out, storage)
            _mark_done(out, "report", {"dashboard": str(RunFolder(out).dashboard)})
    except KeyboardInterrupt as err:
        kept = list(finished_stages(out))
        inner = resume_hint(err)
        err.resume_hint = f"{stage} stage stopped; {', '.join(kept) if kept else 'no stage'} finished and kept in '{out}'; " + (
            inner if inner and stage == "distill" else "rerun the same command to resume"
        )
        raise
    return RunFolder(out).export


# --------------------------------------------------------------------------- what a run was made from


def _made_from(space) -> dict:
    """The settings (teacher excepted: its fingerprint stands for it) and the data of a run."""
    settings = json.loads(json.dumps(asdict(space), default=str))
    for key in ("source", "teacher"):
        settings.pop(key, None)
    source = Path(space.source) if space.source else None
    names = {f"{section}.data": getattr(space, section).data for section in ("ranking", "retrain", "distill")}
    return {
        "space": space.source,
        "space_sha256": file_sha256(source)[:16] if source and source.is_file() else None,
        "settings": settings,
        "data": {key: {"name": name, "signature": data_signature(name)} for key, name in names.items()},
    }


def _check_made_from(out: Path, now: dict) -> None:
    """A run folder resumes only what it was made from: refuse changed settings, data or teacher."""
    path = RunFolder(out).run_file
    if not path.is_file():
        return
    before = read_stage_file(path, "delete it to accept the run folder as it is, or use another --out")
    fix = "use another --out, or put the original back"
    change = first_difference(before.get("settings"), now["settings"])
    if change:
        raise MinitronError(f"run folder '{out}' was made from other settings ({change}): {fix}")
    for key, data in now["data"].items():
        old = before.get("data", {}).get(key)
        if old and old != data:
            what = f"'{old['name']}', now '{data['name']}'" if old["name"] != data["name"] else f"'{data['name']}' whose content changed"
            raise MinitronError(f"run folder '{out}' was made from other data ({key} was {what}): {fix}")
    old, new = before.get("teacher_fingerprint"), now.get("teacher_fingerprint")
    if old and new and old != new:
        raise MinitronError(f"run folder '{out}' was made from another teacher (fingerprint {old}, now {new}): {fix}")
