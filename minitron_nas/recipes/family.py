"""The family export (`export --front`): every member of the last rung's Pareto front (score vs
parameters, or vs decode latency) fully distilled and exported as its own plain Hugging Face
folder with its model card, RUN/family/<key>/export, and RUN/family/index.csv / index.md.

Each member costs one full distillation (`distill.tokens`), continued from its last search
state as the winner's is. The winner is always one of the family (also when a tie broken
toward a larger candidate leaves it off the front) and is distilled in RUN/distill, which
`minitron-nas distill` shares. A rerun skips every member whose export is there (written whole
or not at all) and resumes a half-done distillation from its checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from minitron_nas.errors import MinitronError
from minitron_nas.files import RunFolder, read_stage_file, write_text_atomic
from minitron_nas.model.teachers import Teacher
from minitron_nas.recipes.distill import distill_candidate
from minitron_nas.recipes.export import export_candidate
from minitron_nas.recipes.search import best_arch
from minitron_nas.report.dashboard import build_dashboard
from minitron_nas.report.summary import write_report
from minitron_nas.search.study import FRONT_BY, NO_LATENCY

__all__ = ["export_front", "front_members"]

MEMBER_KEYS = ("key", "architecture", "params_total", "params_non_embedding", "score", "score_stderr", "trial", "state")


def front_members(out: Path, by: str) -> list[dict]:
    """The family, smallest first (the winner last when off the front), each with `winner` and
    `on_front`; what cannot be exported is refused in one line before the teacher loads."""
    if by not in FRONT_BY:
        raise MinitronError(f"--front-by '{by}' is not a size a front is drawn over: give --front-by params or --front-by latency")
    if not RunFolder(out).best_arch.is_file():
        raise MinitronError(f"no finished search in '{out}' (no best_arch.json): run `minitron-nas search` to its last rung first")
    best = best_arch(out)
    if "front" not in best:
        raise MinitronError(
            f"'{RunFolder(out).best_arch}' records no Pareto front (written by an older version): delete it and rerun `minitron-nas search --resume`"
        )
    front = best["front"] if by == "params" else best.get("front_by_latency")
    if front is None:
        raise MinitronError(NO_LATENCY)
    members = [{**m, "winner": m["key"] == best["key"], "on_front": True} for m in front]
    if not any(m["winner"] for m in members):
        members.append({**{k: best.get(k) for k in MEMBER_KEYS}, "winner": True, "on_front": False})
    return members


def export_front(space, out: Path, teacher: Teacher, by: str = "params") -> Path:
    """Distill and export every member of the front (see the module); returns RUN/family/index.csv."""
    members, best = front_members(out, by), best_arch(out)
    rows = []
    for number, member in enumerate(members, start=1):
        folder = RunFolder(out).family_member(member["key"])
        source = RunFolder(out) if member["winner"] else folder  # where it is distilled
        where = f"family {number}/{len(members)}: {member['key']} ({member['params_total']:,} parameters{', the winner' if member['winner'] else ''})"
        if folder.export.is_dir():
            _say(f"{where}: exported already, skipped")
        else:
            if not source.distill_summary.is_file():
                _say(f"{where}: distilling into {source.distill}")
                distill_candidate(space, out, teacher, member["architecture"], member["state"], source)
            role = "winner" if member["winner"] else f"member of the Pareto front by {by}"
            searched = {k: member[k] for k in ("score", "score_stderr", "trial")}
            search = {**{k: best.get(k) for k in ("metric", "rung_metric", "rungs", "search_tokens")}, **searched, "role": role}
            export_candidate(space, out, teacher, member["architecture"], search, source, folder.export)
            _say(f"{where}: exported -> {folder.export}")
        rows.append(_row(out, member, source, folder))
    index = pd.DataFrame(rows)
    write_text_atomic(RunFolder(out).family_index_csv, index.to_csv(index=False))
    write_text_atomic(RunFolder(out).family_index_md, _markdown(index, out, by))
    if RunFolder(out).study_db.is_file():  # the views link the members; a study elsewhere: `minitron-nas dashboard RUN --storage URL`
        build_dashboard(out)
        write_report(out)
    return RunFolder(out).family_index_csv


def _row(out: Path, member: dict, source: RunFolder, folder: RunFolder) -> dict:
    """One line of the index: what the search and the full distillation said of the member."""
    summary = read_stage_file(source.distill_summary, f"delete '{folder.export}' and rerun the same command (the member is distilled again)")
    after = summary.get("after") or {}
    return {
        "key": member["key"],
        "params_total": member["params_total"],
        "params_non_embedding": member["params_non_embedding"],
        "score": member["score"],
        "score_stderr": member["score_stderr"],
        "heldout_loss": after.get("heldout_loss"),
        "heldout_loss_stderr": after.get("heldout_loss_stderr"),
        "kld": after.get("kld"),
        "kld_stderr": after.get("kld_stderr"),
        "folder": folder.export.relative_to(out).as_posix(),
        "winner": member["winner"],
        "on_front": member["on_front"],
    }


def _markdown(index: pd.DataFrame, out: Path, by: str) -> str:
    table = index.assign(folder=[f"[{f}]({Path(f).relative_to(RunFolder(out).family.name).as_posix()})" for f in index.folder])
    lines = [
        f"# The Pareto front of {Path(out).resolve().name}, by {by}",
        "",
        "Each member fully distilled and exported as a plain transformers folder with its model card; score: the search's, "
        "± one standard error; held-out loss and KL to the teacher: after the full distillation.",
        "",
        table.to_markdown(index=False, floatfmt=".4f", intfmt=","),
        "",
    ]
    return "\n".join(lines)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
