"""Benchmark the ranking pass, pruning and parameter counting on the real 135M teacher.

Measures, in one process:
  (a) the importance pass (`compute_rankings`) against a plain forward over the same
      tokens with the same call and batch size, interleaved A B A B ... so machine drift
      affects both alike; the figure is the median of the per-repeat ratios;
  (b) `prune` of the teacher to a mid-size architecture;
  (c) `ParamCounter.count` over random architectures, for the teacher's config and for
      a Llama-3.1-8B config (built on the meta device, no weights).

Prints a markdown table and writes it, with the command, machine and date, to
reports/benchmarks/rank_prune.md (or --out). Run from the repository root:

    .venv/bin/python bench/bench_rank_prune.py [--data ../shared/data/wikitext2/valid.txt]
        [--samples 32] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from common import REPORTS, Run, markdown_table, require_at_least, require_file
from transformers import LlamaConfig

from minitron_nas.data import token_blocks
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings

DEFAULT_DATA = "../shared/data/wikitext2/valid.txt"
DEFAULT_OUT = REPORTS / "rank_prune.md"
TEACHER = "smollm2-135m"
BATCH_SIZE = 8  # compute_rankings' default; the plain forward uses the same
MID_ARCH = Architecture(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=24)
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
GOAL_RATIO = 1.2  # importance pass / plain forward
GOAL_PRUNE_S = 2.0
GOAL_COUNTS_PER_S = 10_000  # "tens of thousands per second"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="calibration text (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per block (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measure (default: %(default)s)")
    parser.add_argument("--count-archs", type=int, default=100_000, help="random architectures counted per config (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/rank_prune.md)")
    args = parser.parse_args(argv)
    require_at_least(parser, args, ("samples", "seq_len", "repeats", "count_archs"))
    require_file(parser, args.data)
    return args


def plain_forward(model, blocks: torch.Tensor) -> None:
    """Exactly the model call compute_rankings makes, without hooks."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in blocks.split(BATCH_SIZE):
            model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)


def timed(fn, *args, **kwargs):
    seconds, _, result = timed_cpu(fn, *args, **kwargs)
    return seconds, result


def timed_cpu(fn, *args, **kwargs):
    """(wall seconds, CPU seconds of this process over all its threads, result)."""
    gc.collect()
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, time.process_time() - start_cpu, result


def random_architectures(teacher: Architecture, n: int, seed: int = 0) -> list[Architecture]:
    """Valid candidates (heads = KV groups x heads per group), built before timing starts."""
    rng = random.Random(seed)
    archs = []
    for _ in range(n):
        groups = rng.randint(1, teacher.num_key_value_heads)
        per_group = rng.randint(1, teacher.heads_per_group)
        archs.append(
            Architecture(
                hidden_size=rng.randint(1, teacher.hidden_size),
                intermediate_size=rng.randint(1, teacher.intermediate_size),
                num_attention_heads=groups * per_group,
                num_key_value_heads=groups,
                num_hidden_layers=rng.randint(1, teacher.num_hidden_layers),
            )
        )
    return archs


def count_rate(config, n: int, repeats: int) -> dict:
    build_s, counter = timed(ParamCounter, config)
    archs = random_architectures(Architecture.from_config(config), n)
    count = counter.count
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        for arch in archs:
            count(arch)
        times.append(time.perf_counter() - start)
    return {"build_s": build_s, "rate": n / statistics.median(times), "times": times}


def fmt_s(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()

    print(f"loading teacher {TEACHER} ...", flush=True)
    load_s, teacher = timed(load_teacher, TEACHER)
    model = teacher.model
    blocks = token_blocks(args.data, teacher.tokenizer, args.seq_len, args.samples, "train")
    n_blocks = int(blocks.shape[0])

    # Warm-up (untimed): one batch through each path, so first-call costs hit neither side.
    plain_forward(model, blocks[:BATCH_SIZE])
    compute_rankings(model, blocks[:BATCH_SIZE], progress=False)

    # (a) importance pass vs plain forward, interleaved A B A B ...
    forward_s, ranking_s, forward_cpu, ranking_cpu, rankings = [], [], [], [], None
    for repeat in range(args.repeats):
        seconds, cpu, _ = timed_cpu(plain_forward, model, blocks)
        forward_s.append(seconds)
        forward_cpu.append(cpu)
        seconds, cpu, rankings = timed_cpu(compute_rankings, model, blocks, progress=False)
        ranking_s.append(seconds)
        ranking_cpu.append(cpu)
        print(
            f"repeat {repeat + 1}/{args.repeats}: forward {forward_s[-1]:.2f} s, ranking {ranking_s[-1]:.2f} s, ratio {ranking_s[-1] / forward_s[-1]:.3f}",
            flush=True,
        )
    ratios = [r / f for r, f in zip(ranking_s, forward_s)]
    ratio = statistics.median(ratios)
    cpu_ratio = statistics.median(r / f for r, f in zip(ranking_cpu, forward_cpu))

    # (b) pruning to a mid-size architecture
    prune_s = []
    for _ in range(args.repeats):
        seconds, student = timed(prune, model, rankings, MID_ARCH)
        prune_s.append(seconds)
        del student
    prune_median = statistics.median(prune_s)
    print(f"prune: {fmt_s(prune_s)} s", flush=True)

    # (c) parameter counting
    small = count_rate(model.config, args.count_archs, args.repeats)
    print(f"count (SmolLM2-135M): {small['rate']:,.0f}/s", flush=True)
    big = count_rate(LlamaConfig(**LLAMA_8B), args.count_archs, args.repeats)
    print(f"count (Llama-3.1-8B): {big['rate']:,.0f}/s", flush=True)

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    tokens = n_blocks * args.seq_len
    arch = MID_ARCH
    rows = [
        (
            "Importance pass / plain forward (median ratio)",
            f"{ratio:.3f}x",
            f"<= {GOAL_RATIO}x",
            verdict(ratio <= GOAL_RATIO),
            f"ratios {', '.join(f'{r:.3f}' for r in ratios)}; ranking median {statistics.median(ranking_s):.2f} s "
            f"({fmt_s(ranking_s)}), forward median {statistics.median(forward_s):.2f} s ({fmt_s(forward_s)}); "
            f"{n_blocks} x {args.seq_len} tokens, batch {BATCH_SIZE}, "
            f"{tokens / statistics.median(ranking_s):,.0f} tokens/s ranked; CPU-time ratio {cpu_ratio:.3f}x",
        ),
        (
            "Prune 135M -> mid-size (median)",
            f"{prune_median:.2f} s",
            f"<= {GOAL_PRUNE_S:.0f} s",
            verdict(prune_median <= GOAL_PRUNE_S),
            f"runs {fmt_s(prune_s)} s; hidden {arch.hidden_size}, ffn {arch.intermediate_size}, "
            f"{arch.num_attention_heads} heads, {arch.num_key_value_heads} KV groups, {arch.num_hidden_layers} layers",
        ),
        (
            "Parameter counts/s, SmolLM2-135M config",
            f"{small['rate']:,.0f}/s",
            f">= {GOAL_COUNTS_PER_S:,}/s",
            verdict(small["rate"] >= GOAL_COUNTS_PER_S),
            f"{args.count_archs:,} random architectures x {args.repeats}; counter built in {small['build_s']:.2f} s",
        ),
        (
            "Parameter counts/s, Llama-3.1-8B config",
            f"{big['rate']:,.0f}/s",
            f">= {GOAL_COUNTS_PER_S:,}/s",
            verdict(big["rate"] >= GOAL_COUNTS_PER_S),
            f"{args.count_archs:,} random architectures x {args.repeats}; counter built in {big['build_s']:.2f} s (meta device)",
        ),
    ]
    details = [
        f"- Teacher: {TEACHER} (loaded in {load_s:.1f} s); data: `{args.data}`, {n_blocks} blocks x {args.seq_len} tokens; repeats: {args.repeats}",
    ]
    body = [
        *markdown_table(["Measure", "Measured", "Goal", "Met", "Details"], rows),
        "",
        "The ratio is taken per repeat between a plain forward and the importance pass run back to "
        "back (A B A B ...) on the same tokens with the same call "
        "(`model(input_ids=batch, use_cache=False, logits_to_keep=1)` under `torch.no_grad()`), "
        "then the median is reported; both were warmed up with one batch first. The CPU-time "
        "ratio (process CPU seconds, all threads) is given as a cross-check that other load on the "
        "machine disturbs less than wall time. Counting times "
        "`ParamCounter.count` alone; the architectures are generated beforehand.",
    ]
    run.write_report(args.out, "Benchmark: ranking, pruning and parameter counting", details, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
