"""The search recipe: a space file's feasible candidates searched into a run folder.

An infeasible budget is refused before the teacher's weights load; Ctrl-C keeps every
finished trial and queues the running candidate again, and the hint says how to go on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from minitron_nas.config.space import DeviceSettings, SearchSpace
from minitron_nas.errors import add_resume_hint
from minitron_nas.files import RunFolder, read_stage_file
from minitron_nas.model.teachers import Teacher, load_config, load_teacher
from minitron_nas.search.candidates import Candidate, enumerate_candidates, load_space, require_feasible
from minitron_nas.search.runner import run_search

__all__ = ["best_arch", "feasible_candidates", "run_folder", "search", "with_device"]


def best_arch(out: Path) -> dict:
    """RUN/best_arch.json, checked: one cut short is refused, never taken for a finished search."""
    fix = "delete it and rerun `minitron-nas search --resume` (it is written again from the study)"
    return read_stage_file(RunFolder(out).best_arch, fix, keys=("architecture", "score", "search_tokens"))


def run_folder(space_file: Path, out: Path | None) -> Path:
    """The run folder of a space: `out`, or runs/<space file's name>."""
    return Path(out) if out is not None else Path("runs") / Path(space_file).stem


def with_device(space: SearchSpace, device: str | None, dtype: str | None) -> SearchSpace:
    """The space with `device` / `dtype`, where given, replacing its `device:` section."""
    return replace(space, device=DeviceSettings(device or space.device.device, dtype or space.device.dtype))


def feasible_candidates(space_file: Path) -> tuple[SearchSpace, list[Candidate], int]:
    """`minitron-nas enumerate`: (the space, its candidates within the budget closest to it first, how many
    architectures its axes allow); a budget no candidate meets is refused. Exact counts, no weights."""
    space = load_space(space_file)
    config = load_config(space.teacher)
    feasible = require_feasible(space, config)
    return space, feasible, len(enumerate_candidates(space, config)[1])


def search(
    space: SearchSpace, out: Path, storage: str | None = None, n_trials: int | None = None, resume: bool = False, teacher: Teacher | None = None
) -> dict | None:
    """Run (or go on with) the search; returns best_arch.json's content once the last rung is
    complete, else None (a search stopped by `n_trials` is unfinished: the same call goes on)."""
    require_feasible(space, load_config(space.teacher))  # an infeasible budget fails before the weights load
    teacher = teacher or load_teacher(space.teacher, space.device.device, space.device.dtype)
    try:
        run_search(space, out, storage, n_trials, resume, teacher=teacher)
    except KeyboardInterrupt as err:
        add_resume_hint(err, f"finished trials are kept in {out} and the running candidate is queued again; rerun the same command with --resume")
        raise
    return best_arch(out) if RunFolder(out).best_arch.is_file() else None
