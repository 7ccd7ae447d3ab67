"""How many held-out blocks a rung needs: gaps between candidates against their standard errors.

Every candidate of the demo space (SmolLM2-135M -> ~67M) is pruned from the real teacher,
retrained on the demo's first retraining rung (rung 1), and its KL divergence to the teacher measured per
held-out block (`--blocks` x 256 tokens of the embedded corpus). For each smaller number of
blocks (the first N), the report compares the gap between candidates adjacent in the final
ranking with the standard error of that gap, paired over the shared blocks, and the
unpaired error (sqrt(se_a^2 + se_b^2)) that ignores the pairing; and the Kendall tau of
the ranking on N blocks against the ranking on all of them. Resumable: per-candidate
per-block values are stored in the work folder as they are measured.

    .venv/bin/python bench/bench_heldout.py [--blocks 64] [--work runs/bench-heldout]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import REPORTS, Run, markdown_table
from scipy.stats import kendalltau

from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import retrain
from minitron_nas.evaluate.metrics import HeldoutKLD, Measurement, mean_and_stderr, paired_stderr
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import load_or_rank
from minitron_nas.search.candidates import load_space, require_feasible
from minitron_nas.search.runner import schedule_for
from minitron_nas.search.trials import arch_key

SPACE = "search_spaces/smollm2-135m-demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=64, help="held-out blocks of 256 tokens measured per candidate")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-heldout"), help="resumable work folder")
    parser.add_argument("--out", type=Path, default=REPORTS / "heldout.md")
    args = parser.parse_args()
    run = Run()
    space = load_space(SPACE)
    teacher = load_teacher(space.teacher)
    feasible = require_feasible(space, teacher.model.config)
    rung = schedule_for(space, len(feasible)).rungs[1]
    args.work.mkdir(parents=True, exist_ok=True)
    rankings = load_or_rank(teacher, space.ranking, args.work / "rankings")
    spec = base = replace(space.retrain, seed=space.seed)
    settings = replace(base, steps=rung.steps, eval_every=0)
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, rung.steps * spec.batch_size, "train")
    meta = {"teacher_fingerprint": teacher.fingerprint}
    cache = TeacherLogitCache.compute(teacher.model, train, base.top_k, base.temperature, base.batch_size, meta)
    heldout = token_blocks(spec.data, teacher.tokenizer, 256, args.blocks, "heldout")
    held_cache = TeacherLogitCache.compute(teacher.model, heldout, base.top_k, base.temperature, base.batch_size, meta)
    metric = HeldoutKLD(heldout, held_cache, spec.batch_size)
    values: dict[str, list[float]] = {}
    for candidate in feasible:
        key = arch_key(candidate.arch)
        path = args.work / f"{key.replace('/', '_').replace(':', '-')}.json"
        if path.is_file():
            values[key] = json.loads(path.read_text())
            continue
        student = prune(teacher.model, rankings, candidate.arch)
        retrain(student, train, cache, settings, progress=False)
        values[key] = metric.measure(student).per_item
        path.write_text(json.dumps(values[key]))
        print(f"{key}: {statistics.fmean(values[key]):.4f}", flush=True)

    full = {k: statistics.fmean(v) for k, v in values.items()}
    order = sorted(full, key=full.get)
    rows = []
    for n in sorted({4, 8, 16, 32, args.blocks} & set(range(2, args.blocks + 1))):
        ms = {k: Measurement(*mean_and_stderr(v[:n]), 0.0, v[:n]) for k, v in values.items()}
        gaps, paired, unpaired, separated = [], [], [], 0
        for a, b in zip(order, order[1:]):
            gap = abs(ms[a].value - ms[b].value)
            se = paired_stderr(ms[a], ms[b])
            gaps.append(gap)
            paired.append(se)
            unpaired.append(math.hypot(ms[a].stderr, ms[b].stderr))
            separated += gap > se
        tau = kendalltau([full[k] for k in order], [ms[k].value for k in order]).statistic
        rows.append(
            [
                n,
                f"{statistics.median(gaps):.4f}",
                f"{statistics.median(paired):.4f}",
                f"{statistics.median(unpaired):.4f}",
                f"{separated} of {len(order) - 1}",
                f"{tau:.2f}",
            ]
        )
    body = [
        f"Candidates: the {len(feasible)} feasible architectures of `{SPACE}`, each retrained on the demo's rung-0 "
        f"{rung.tokens:,} tokens ({rung.steps} steps); metric: KL divergence to the teacher (top-{base.top_k} + tail), "
        f"per held-out block of 256 tokens of the embedded corpus.",
        "",
        "Adjacent pairs in the ranking on all blocks: median gap, median standard error of the gap (paired over the "
        "shared blocks; and unpaired), pairs whose gap exceeds one paired standard error, and Kendall tau of the "
        "ranking on the first N blocks against the ranking on all of them.",
        "",
        *markdown_table(["blocks N", "median gap", "median paired SE", "median unpaired SE", "gap > paired SE", "tau vs all"], rows),
        "",
        "Values on all blocks (lower is better): " + ", ".join(f"{k} {full[k]:.4f}" for k in order),
    ]
    run.write_report(args.out, "Held-out size for the rung metric (real teacher)", [f"- torch threads: {torch.get_num_threads()}"], body)


if __name__ == "__main__":
    main()
