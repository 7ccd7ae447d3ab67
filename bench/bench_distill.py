"""Benchmark one distillation step with cached top-k teacher logits against the live teacher.

Same student, same batch, same optimizer, in one process; the variants alternate (their
order rotates every repeat) so machine drift hits all alike:
  cached      - KD against `TeacherLogitCache` top-k log-probabilities (no teacher pass);
  live top-k  - the teacher runs on the batch every step, same top-k objective (what
                `retrain` does with cache=None and settings.top_k set: the baseline);
  live full   - the teacher runs every step, full-vocabulary KD (settings.top_k=None).
A step is what `retrain` does per optimizer step: `batch_loss` (student forward, teacher
signal, KD), backward, gradient clipping, fused AdamW step. The cache is built once
before timing; its build time is reported separately (it is paid once per search).

The student is the SmolLM2-135M teacher pruned to FFN 768 and 26 layers. Prints a
markdown table and writes it, with the command, machine and date, to
reports/benchmarks/distill.md (or --out). Run from the repository root:

    .venv/bin/python bench/bench_distill.py [--data ../shared/data/wikitext2/valid.txt]
        [--batch-size 4] [--seq-len 128] [--top-k 64] [--repeats 9]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import REPORTS, Run, markdown_table, require_at_least, require_file

from minitron_nas.config.settings import RetrainSettings
from minitron_nas.data import token_blocks
from minitron_nas.distill.signals import CachedTopK, LiveFull, LiveTopK
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import batch_loss, make_optimizer
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings

DEFAULT_DATA = "../shared/data/wikitext2/valid.txt"
DEFAULT_OUT = REPORTS / "distill.md"
TEACHER = "smollm2-135m"
STUDENT = {"intermediate_size": 768, "num_hidden_layers": 26}
GOAL_RATIO = 0.8  # cached step / live-teacher step
VARIANTS = ("cached", "live top-k", "live full")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="text for the batch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="blocks per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per block (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probs kept per token (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed steps of each variant (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/distill.md)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("batch_size", "seq_len", "top_k", "repeats"))
    require_file(parser, args.data)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()

    print(f"loading teacher {TEACHER} ...", flush=True)
    start = time.perf_counter()
    teacher = load_teacher(TEACHER)
    load_s = time.perf_counter() - start
    model = teacher.model
    batch = token_blocks(args.data, teacher.tokenizer, args.seq_len, args.batch_size, "train")
    rows = torch.arange(len(batch))
    rankings = compute_rankings(model, batch, batch_size=args.batch_size, progress=False)
    arch = Architecture.from_dict(STUDENT, Architecture.from_config(model.config))
    student = prune(model, rankings, arch).train()
    settings = RetrainSettings(steps=1, batch_size=args.batch_size, lr=1e-5, warmup_steps=0, top_k=args.top_k)
    start = time.perf_counter()
    cache = TeacherLogitCache.compute(model, batch, args.top_k, settings.temperature, args.batch_size, {"teacher_fingerprint": teacher.fingerprint})
    cache_s = time.perf_counter() - start
    optimizer = make_optimizer(student, settings)

    def step(variant: str) -> float:
        optimizer.zero_grad(set_to_none=True)
        if variant == "cached":
            loss, _ = batch_loss(student, batch, settings, CachedTopK(cache), rows)
        elif variant == "live top-k":
            loss, _ = batch_loss(student, batch, settings, LiveTopK(model, settings.top_k))
        else:
            loss, _ = batch_loss(student, batch, replace(settings, top_k=None), LiveFull(model))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
        optimizer.step()
        return float(loss.detach())

    for variant in VARIANTS:  # warm-up, untimed
        step(variant)
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    losses = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]
        for variant in order:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            losses[variant].append(step(variant))
            wall[variant].append(time.perf_counter() - t0)
            cpu[variant].append(time.process_time() - c0)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{v} {wall[v][-1]:.2f} s" for v in VARIANTS), flush=True)

    def ratio(a: str, b: str, times: dict) -> tuple[float, list[float]]:
        per = [x / y for x, y in zip(times[a], times[b])]
        return statistics.median(per), per

    r_topk, per_topk = ratio("cached", "live top-k", wall)
    r_full, per_full = ratio("cached", "live full", wall)
    c_topk, _ = ratio("cached", "live top-k", cpu)
    c_full, _ = ratio("cached", "live full", cpu)
    tokens = args.batch_size * args.seq_len
    med = {v: statistics.median(wall[v]) for v in VARIANTS}

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    fmt = lambda xs: ", ".join(f"{x:.3f}" for x in xs)
    rows_md = [
        (
            "Cached step / live-teacher step, same top-k objective (median of per-repeat ratios)",
            f"{r_topk:.3f}x",
            f"<= {GOAL_RATIO}x",
            verdict(r_topk <= GOAL_RATIO),
            f"ratios {fmt(per_topk)}; ratio of the fastest runs {min(wall['cached']) / min(wall['live top-k']):.3f}x; CPU-time ratio {c_topk:.3f}x",
        ),
        (
            "Cached step / live-teacher step with full-vocabulary KD",
            f"{r_full:.3f}x",
            f"<= {GOAL_RATIO}x",
            verdict(r_full <= GOAL_RATIO),
            f"ratios {fmt(per_full)}; ratio of the fastest runs {min(wall['cached']) / min(wall['live full']):.3f}x; CPU-time ratio {c_full:.3f}x",
        ),
        *(
            (
                f"Step time, {v} (median)",
                f"{med[v]:.2f} s",
                "",
                "",
                f"runs {', '.join(f'{x:.2f}' for x in wall[v])} s; {tokens / med[v]:,.0f} tokens/s",
            )
            for v in VARIANTS
        ),
        (
            "Cache build (once, not in the steps)",
            f"{cache_s:.2f} s",
            "",
            "",
            f"{len(batch)} x {args.seq_len} tokens, k={args.top_k}: {cache.nbytes / 2**10:.0f} KiB (n_blocks x seq_len x k x 6 bytes)",
        ),
    ]
    n_params = sum(p.numel() for p in student.parameters())
    details = [
        f"- Teacher: {TEACHER} (loaded in {load_s:.1f} s); student: FFN {arch.intermediate_size}, "
        f"{arch.num_hidden_layers} layers ({n_params / 1e6:.1f}M parameters); one batch of {len(batch)} x {args.seq_len} "
        f"tokens from `{args.data}`; top-k {args.top_k}, T = {settings.temperature}; {args.repeats} repeats",
    ]
    body = [
        *markdown_table(["Measure", "Measured", "Goal", "Met", "Details"], rows_md),
        "",
        "Each step is zero_grad, `minitron_nas.distill.stage.batch_loss` (student forward; cached top-k, or the "
        "teacher's forward under no_grad then top-k, or the teacher's full logits; KD loss), backward, "
        "gradient clipping at 1.0 and a fused AdamW step (`make_optimizer`, as in `retrain`). The three "
        "variants run back to back in an order that rotates every repeat, after one untimed warm-up step "
        "each; the ratio is taken per repeat and the median reported. Losses at the last repeat: "
        + ", ".join(f"{v} {losses[v][-1]:.4f}" for v in VARIANTS)
        + " (the top-k objective is smaller than full KD: the tail bucket hides part of the divergence).",
    ]
    run.write_report(args.out, "Benchmark: distillation step, cached top-k teacher logits vs live teacher", details, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
