"""Benchmark what a search costs on the real 135M teacher, run as real `minitron-nas search` processes.

Measures:
  (a) the share of a one-worker search's wall time that is neither training (`retrain`)
      nor scoring (the score before and after it): process start, imports, teacher load,
      pruning, Optuna, writing outputs and the dashboard between trials (goal <= 5%);
  (b) trials per hour with one worker (torch threads = all cores) and with two workers
      sharing one SQLite study (threads = cores / 2 each).

The script writes a grid search space of about --candidates architectures around 60% of
the teacher's parameters into --work, computes once (timed, in this process) what a search
computes once, the rankings and the teacher top-k logit cache, exactly as `run_search`
would, and copies them into every run folder so the workers load instead of building.
The time split comes from the finished study: each trial's start and end and the
`timings` that search.py records per trial (prune, before, retrain, measure, score).
Writes reports/benchmarks/search.md (or --out). Run from the repository root:

    .venv/bin/python bench/bench_search.py [--candidates 6] [--retrain-tokens 8192] [--fresh]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import optuna
import yaml
from common import REPORTS, Run, markdown_table, require_at_least, require_file, usable_cores

from minitron_nas.config.space import Budget, SearchSpace
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.teachers import load_config, load_teacher
from minitron_nas.prune.ranking import rank
from minitron_nas.search.candidates import enumerate_candidates, load_space, require_feasible
from minitron_nas.search.study import STUDY_NAME

DEFAULT_DATA = "../shared/data/wikitext2/valid.txt"
DEFAULT_OUT = REPORTS / "search.md"
TEACHER = "smollm2-135m"
TARGET_SHARE = 0.6  # of the teacher's parameters
AXES = {"intermediate_size": list(range(512, 1537, 64)), "num_hidden_layers": list(range(16, 31))}  # hidden size, heads: the teacher's
BATCH_SIZE = 4
GOAL_OTHER = 0.05
RUN_DIRS = ("precomputed", "one-worker", "two-workers")
PRECOMPUTED = ("rankings", "teacher_logits")
CLI = Path(sys.executable).parent / "minitron-nas"
TRIAL_LINE = re.compile(r"Trial (\d+) (?:finished|pruned|failed)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="text for ranking, retraining and scoring (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=6, help="feasible architectures in the grid (default: %(default)s)")
    parser.add_argument("--retrain-tokens", type=int, default=8192, help="retraining tokens per candidate (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per block everywhere (default: %(default)s)")
    parser.add_argument("--heldout-samples", type=int, default=8, help="held-out blocks scored per candidate (default: %(default)s)")
    parser.add_argument("--rank-samples", type=int, default=32, help="calibration blocks for the rankings (default: %(default)s)")
    parser.add_argument(
        "--join-delay", type=float, default=5.0, help="seconds between the grid being queued and the second worker starting (default: %(default)s)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench-search"), help="folder for the space and the runs (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="delete the run folders a previous run left in --work")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/search.md)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("candidates", "retrain_tokens", "seq_len", "heldout_samples", "rank_samples"))
    if args.candidates < 2:
        parser.error("--candidates must be at least 2: two workers share the grid")
    require_file(parser, args.data)
    return args


def clear_work(work: Path, fresh: bool) -> None:
    """A previous run's study would be resumed, not measured: refuse it, or delete it with --fresh."""
    left = [name for name in RUN_DIRS if (work / name).exists()]
    if left and not fresh:
        print(f"error: '{work}' holds a previous run ({', '.join(left)}): pass --fresh to delete those folders, or choose another --work", file=sys.stderr)
        sys.exit(2)
    for name in left:
        shutil.rmtree(work / name)


def write_space(args: argparse.Namespace, path: Path, config) -> SearchSpace:
    """A grid with the --candidates architectures nearest TARGET_SHARE of the teacher: the tolerance
    is set half-way between the last one in and the first one out."""
    teacher_total = ParamCounter(config).count(Architecture.from_config(config)).total
    target = round(TARGET_SHARE * teacher_total)
    probe = SearchSpace(TEACHER, {k: tuple(v) for k, v in AXES.items()}, Budget(target, tolerance=1.0))
    _, valid = enumerate_candidates(probe, config)
    if args.candidates >= len(valid):
        sys.exit(f"error: --candidates {args.candidates} is more than the {len(valid) - 1} this space can rank: choose fewer")
    last_in, first_out = (abs(c.total - target) for c in valid[args.candidates - 1 : args.candidates + 1])
    data = str(Path(args.data).resolve())
    space = {
        "teacher": TEACHER,
        "axes": AXES,
        "budget": {"parameters": target, "count": "total", "tolerance": (last_in + first_out) / 2 / target},
        "ranking": {"data": data, "samples": args.rank_samples, "seq_len": args.seq_len},
        "retrain": {"tokens": args.retrain_tokens, "batch_size": BATCH_SIZE, "seq_len": args.seq_len, "data": data},
        "scoring": {"metric": "heldout_loss", "heldout_samples": args.heldout_samples, "seq_len": args.seq_len},
        "sampler": "grid",
        "seed": 0,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Written by bench/bench_search.py: the candidates nearest {TARGET_SHARE:.0%} of {TEACHER}'s {teacher_total:,} parameters.\n"
    path.write_text(header + yaml.safe_dump(space, sort_keys=False, default_flow_style=None))
    return load_space(path)


def precompute(space: SearchSpace, folder: Path) -> dict:
    """What run_search computes once per search, built the way it builds it, timed."""
    start = time.perf_counter()
    teacher = load_teacher(space.teacher)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    rank(teacher, space.ranking, folder / "rankings")
    rank_s = time.perf_counter() - start
    settings = replace(space.retrain, seed=space.seed)
    train = token_blocks(settings.data, teacher.tokenizer, settings.seq_len, settings.total_steps * settings.batch_size, "train")
    start = time.perf_counter()
    cache = TeacherLogitCache.load_or_build(
        teacher.model,
        train,
        settings.top_k,
        settings.temperature,
        settings.batch_size,
        folder / "teacher_logits",
        {"teacher_fingerprint": teacher.fingerprint},
    )
    cache_s = time.perf_counter() - start
    facts = {"load_s": load_s, "rank_s": rank_s, "cache_s": cache_s, "cache": repr(cache), "steps": settings.steps}
    del teacher, cache
    gc.collect()
    return facts


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for name in PRECOMPUTED for p in (folder / name).rglob("*")}


def thread_probe(threads: int) -> tuple[int, float]:
    """(torch threads, seconds) of a bare process with a worker's environment that imports what the CLI's search imports."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", "import torch, minitron_nas.search.runner; print(torch.get_num_threads())"],
        env=thread_env(threads),
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.split()[-1]), time.perf_counter() - start


def thread_env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


@dataclass
class Worker:
    """One `minitron-nas search` process: when it started and ended (epoch seconds), and its log."""

    out: Path
    log: Path
    process: subprocess.Popen
    started: float
    ended: float | None = None
    trials: set[int] = field(default_factory=set)

    @property
    def wall(self) -> float:
        return self.ended - self.started


def start_worker(space_path: Path, out: Path, threads: int, extra: list[str]) -> Worker:
    log = out / "search.log"
    handle = log.open("w")
    started = time.time()
    process = subprocess.Popen(
        [str(CLI), "search", str(space_path), "--out", str(out), *extra],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=thread_env(threads),
    )
    handle.close()
    return Worker(out, log, process, started)


def wait_all(workers: list[Worker]) -> None:
    while any(w.ended is None for w in workers):
        for w in workers:
            if w.ended is None and w.process.poll() is not None:
                w.ended = time.time()
        time.sleep(0.1)
    for w in workers:
        if w.process.returncode != 0:
            tail = w.log.read_text().strip().splitlines()[-1:] or ["(empty log)"]
            sys.exit(f"error: the worker in '{w.out}' exited with status {w.process.returncode} ({tail[0]}): see {w.log}")
        w.trials = {int(n) for n in TRIAL_LINE.findall(w.log.read_text())}


def wait_for_grid(db: Path, size: int, worker: Worker) -> None:
    """Until the first worker has created the study and queued every candidate (read-only polling)."""
    while True:
        if worker.process.poll() is not None:
            sys.exit(f"error: the first worker exited (status {worker.process.returncode}) before queueing the grid: see {worker.log}")
        if db.is_file():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
                    if con.execute("SELECT count(*) FROM trials").fetchone()[0] >= size:
                        return
            except sqlite3.Error:
                pass  # the schema is still being created
        time.sleep(0.2)


def prepare_run(folder: Path, precomputed: Path) -> dict[str, int]:
    folder.mkdir(parents=True)
    for name in PRECOMPUTED:
        shutil.copytree(precomputed / name, folder / name, copy_function=shutil.copy2)
    return snapshot(folder)


def check_reused(folder: Path, before: dict[str, int]) -> None:
    """The run loaded the copied rankings and cache: same files, untouched (load_or_build never rewrites)."""
    if snapshot(folder) != before:
        sys.exit(f"error: the run in '{folder}' rebuilt its rankings or teacher cache: the precomputed ones did not match")


def epoch(moment: datetime) -> float:
    return moment.timestamp()  # Optuna stores naive local times, like time.time()


def finished_candidates(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Candidates evaluated in full or cut short by the pruner; not duplicates, not 'grid exhausted'.
    A failed trial makes the timings meaningless, so it stops the benchmark."""
    for t in study.trials:
        if t.state == optuna.trial.TrialState.FAIL:
            sys.exit(f"error: trial {t.number} failed ({t.user_attrs.get('error', 'no error recorded')}): fix it, then rerun with --fresh")
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [t for t in study.trials if t.state in states and "architecture" in t.user_attrs and "duplicate_of" not in t.user_attrs]


def split_time(study: optuna.Study, worker: Worker) -> dict[str, float]:
    """Where one worker's wall time went, from its trials' start/end and search.py's `timings`."""
    trials = sorted((t for t in study.trials if t.datetime_start and t.datetime_complete), key=lambda t: t.datetime_start)
    parts = dict.fromkeys(("startup", "prune", "scoring", "training", "in_trial", "between", "end"), 0.0)
    parts["startup"] = epoch(trials[0].datetime_start) - worker.started
    parts["end"] = worker.ended - epoch(trials[-1].datetime_complete)
    for previous, trial in zip(trials, trials[1:]):
        parts["between"] += epoch(trial.datetime_start) - epoch(previous.datetime_complete)
    for trial in trials:
        duration = (trial.datetime_complete - trial.datetime_start).total_seconds()
        timings = trial.user_attrs.get("timings", {})
        parts["prune"] += timings.get("prune", 0.0)
        parts["scoring"] += timings.get("before", 0.0) + timings.get("measure", 0.0) + timings.get("score", 0.0)
        parts["training"] += timings.get("retrain", 0.0)
        parts["in_trial"] += duration - sum(timings.values())
    parts["wall"] = worker.wall
    parts["other"] = parts["wall"] - parts["training"] - parts["scoring"]
    return parts


def callback_seconds(folder: Path, space: SearchSpace) -> tuple[float, float]:
    """(first, warm) seconds of what search.py does after every trial, rerun here on the finished study."""
    from minitron_nas.report.dashboard import build_dashboard
    from minitron_nas.search.outputs import write_outputs

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(folder / 'study.db').resolve()}")
    times = []
    for _ in range(2):
        start = time.perf_counter()
        write_outputs(study, folder, space)
        build_dashboard(folder, study=study)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def count_states(trials: list[optuna.trial.FrozenTrial]) -> str:
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    return f"{len(trials)} candidates ({len(trials) - pruned} complete, {pruned} stopped early by the pruner)"


def pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()
    work = args.work
    clear_work(work, args.fresh)
    config = load_config(TEACHER)
    space_path = work / "space.yaml"
    space = write_space(args, space_path, config)
    feasible = require_feasible(space, config)
    print(f"{space_path}: {len(feasible)} candidates", flush=True)

    print("precomputing rankings and the teacher top-k cache ...", flush=True)
    pre = precompute(space, work / "precomputed")
    cores = usable_cores()
    half = max(1, cores // 2)
    threads_one, imports_s = thread_probe(cores)
    threads_two, _ = thread_probe(half)

    workers: list[Worker] = []
    try:
        print(f"one worker, {cores} threads ...", flush=True)
        one_dir = work / "one-worker"
        one_files = prepare_run(one_dir, work / "precomputed")
        solo = start_worker(space_path, one_dir, cores, [])
        workers.append(solo)
        wait_all([solo])
        check_reused(one_dir, one_files)

        print(f"two workers, {half} threads each ...", flush=True)
        two_dir = work / "two-workers"
        db = two_dir / "study.db"
        storage = ["--storage", f"sqlite:///{db.resolve()}"]
        pair_files = [prepare_run(two_dir / f"worker{i}", work / "precomputed") for i in (1, 2)]
        first = start_worker(space_path, two_dir / "worker1", half, storage)
        workers.append(first)
        wait_for_grid(db, len(feasible), first)
        time.sleep(args.join_delay)
        second = start_worker(space_path, two_dir / "worker2", half, [*storage, "--resume"])
        workers.append(second)
        wait_all([first, second])
        for i, files in zip((1, 2), pair_files):
            check_reused(two_dir / f"worker{i}", files)
    finally:
        for w in workers:
            if w.process.poll() is None:
                w.process.kill()

    one_study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{(one_dir / 'study.db').resolve()}")
    two_study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db.resolve()}")
    parts = split_time(one_study, solo)
    first_callback_s, callback_s = callback_seconds(one_dir, space)
    one_done, two_done = finished_candidates(one_study), finished_candidates(two_study)
    two_wall = max(first.ended, second.ended) - first.started
    rate_one = len(one_done) / (solo.wall / 3600)
    rate_two = len(two_done) / (two_wall / 3600)
    wall = parts["wall"]
    other_steady = parts["other"] - parts["startup"]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    def worker_facts(w: Worker, name: str) -> str:
        mine = [t for t in two_done if t.number in w.trials]
        startup = f", first trial {min(epoch(t.datetime_start) for t in mine) - w.started:.1f} s after its start" if mine else ""
        return f"{name}: {w.wall:.1f} s, {len(mine)} candidates{startup}"

    rows = [
        [
            "Search time neither training nor scoring, one worker",
            pct(parts["other"], wall),
            f"<= {GOAL_OTHER:.0%}",
            verdict(parts["other"] <= GOAL_OTHER * wall),
            f"{parts['other']:.1f} s of {wall:.1f} s wall; training {parts['training']:.1f} s, scoring {parts['scoring']:.1f} s (split below)",
        ],
        [
            "The same, without the one-off start-up",
            pct(other_steady, wall - parts["startup"]),
            f"<= {GOAL_OTHER:.0%}",
            verdict(other_steady <= GOAL_OTHER * (wall - parts["startup"])),
            f"{other_steady:.1f} s of {wall - parts['startup']:.1f} s from the first trial's start to the process exit",
        ],
        [
            "Trials per hour, one worker",
            f"{rate_one:.1f}/h",
            "",
            "",
            f"{count_states(one_done)} in {solo.wall:.1f} s; torch threads {threads_one}",
        ],
        [
            "Trials per hour, two workers on one study",
            f"{rate_two:.1f}/h",
            "",
            "",
            f"{count_states(two_done)} in {two_wall:.1f} s (first worker's start to the last exit); torch threads "
            f"{threads_two} each; {worker_facts(first, 'worker 1')}; {worker_facts(second, 'worker 2')} (started "
            f"{second.started - first.started:.1f} s after worker 1)",
        ],
        ["Two workers / one worker, trials per hour", f"{rate_two / rate_one:.2f}x", "", "", "same space, same settings"],
        [
            "Rankings (once per search; computed in the bench process)",
            f"{pre['rank_s']:.1f} s",
            "",
            "",
            f"{args.rank_samples} x {args.seq_len} tokens; not part of the search runs above, which loaded them",
        ],
        [
            "Teacher top-k cache build (once per search; in the bench process)",
            f"{pre['cache_s']:.1f} s",
            "",
            "",
            f"{pre['cache']}; not part of the search runs above, which loaded it",
        ],
    ]
    split = [
        [
            "Start-up",
            parts["startup"],
            "process start to the first trial: imports (a bare process importing torch and "
            f"minitron_nas.search.runner took {imports_s:.1f} s), teacher load (in the bench process: {pre['load_s']:.1f} s), "
            "token blocks, the held-out teacher cache for retraining, opening the study, loading the rankings and the "
            "teacher top-k cache",
        ],
        ["Pruning", parts["prune"], "`prune` of every candidate (search.py's `timings.prune`)"],
        ["Scoring", parts["scoring"], "rung metric before and after retraining and the last rung's score (`before` + `measure` + `score`)"],
        [
            "Training",
            parts["training"],
            "`retrain` of every candidate (up to the pruner's stop for those it stopped), its held-out checks for the pruner included",
        ],
        ["Within trials, besides the above", parts["in_trial"], "Optuna: suggesting the queued candidate, user attributes, reporting to the pruner"],
        [
            "Between trials",
            parts["between"],
            "after each trial: trials.csv, best_arch.json and dashboard.html rewritten "
            f"(rerun here on the finished study: {callback_s:.2f} s, {first_callback_s:.2f} s with its first imports), "
            "garbage collection, Optuna handing out the next queued trial",
        ],
        ["End", parts["end"], "last trial's end to process exit: the same outputs once more, interpreter exit"],
        ["Wall", wall, ""],
    ]
    details = [
        f"- Teacher: {TEACHER}; space `{space_path}`: {len(feasible)} candidates (FFN and depth; hidden size and heads "
        f"as the teacher's) within {space.budget.parameters:,} +/- {space.budget.tolerance:.2%} parameters "
        f"({TARGET_SHARE:.0%} of the teacher); sampler grid",
        f"- Per candidate: retraining on {args.retrain_tokens:,} tokens ({pre['steps']} steps of {BATCH_SIZE} x "
        f"{args.seq_len}, cached top-k {space.retrain.top_k}, ), "
        f"scored by held-out loss on {args.heldout_samples} x {args.seq_len} tokens before and after; data `{args.data}`",
        f"- Threads: one worker with OMP_NUM_THREADS={cores} (torch reported {threads_one}); two workers with "
        f"OMP_NUM_THREADS={half} each (torch reported {threads_two}); SQLite study; the second worker joins with --resume "
        f"{args.join_delay:g} s after the first has queued the grid",
    ]
    body = [
        *markdown_table(["Measure", "Measured", "Goal", "Met", "Details"], rows),
        "",
        "Where the one-worker search's wall time went:",
        "",
        *markdown_table(["Part", "Seconds", "Share of wall", "What"], [[p, f"{s:.1f}", pct(s, wall), w] for p, s, w in split]),
        "",
        "Each search is a real `minitron-nas search` process (its wall time runs from `Popen` to its exit). The "
        "rankings and the teacher top-k cache were built in the bench process with the search's own settings and "
        "copied into every run folder; every worker loaded them (their files were unchanged after the run). The split "
        "comes from the finished study: each trial's start and end as Optuna stored them and the per-trial `timings` "
        "search.py records. Every rung trial counts as a trial. Two "
        "workers pop the queued grid from one SQLite study; a worker whose queue runs dry waits for the other's running "
        "trial (so that a trial of a worker that died is retried), so both exit at about the same time.",
    ]
    run.write_report(args.out, "Benchmark: search cost on the real teacher", details, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
