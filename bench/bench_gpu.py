"""Benchmark the ranking pass, a retraining step and pruning on a GPU, with an 8B-sized teacher.

The CPU benchmarks use the real 135M teacher; on a GPU the question is whether the same
ratios hold at the paper's scale. The teacher is built from a config with random weights
in bf16 directly on the device (weights do not change the timings), or loaded with
--teacher. Measures, in one process, on random token ids:
  (i)   the importance pass (`compute_rankings`) against a plain forward with the same call
        and batch, interleaved A B A B ...; the median of the per-repeat ratios;
  (ii)  one retraining step (`batch_loss`, backward, clipping, fused AdamW, as in
        `retrain`) with cached teacher top-k against the live teacher's top-k, order
        alternating every repeat; the median of the per-repeat ratios;
  (iii) `prune` to a ~half-size architecture (3/4 hidden, 1/2 FFN, all heads and layers).
Every timing is bracketed by `torch.cuda.synchronize()`; peak GPU memory is reported per
measure. Writes reports/benchmarks/gpu.md (or --out). Run from the repository root:

    .venv/bin/python bench/bench_gpu.py [--config search_spaces/configs/llama-3.1-8b.json | --teacher PATH]
        [--device cuda] [--samples 32] [--seq-len 1024] [--batch-size 8] [--distill-batch 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from minitron_nas.architecture import Architecture, ParamCounter, head_dim_of
from minitron_nas.distill import RetrainSettings, TeacherLogitCache, batch_loss, make_optimizer
from minitron_nas.pruning import prune
from minitron_nas.ranking import compute_rankings
from minitron_nas.teachers import load_config, load_teacher

from common import REPO, REPORTS, Run, markdown_table

DEFAULT_CONFIG = REPO / "search_spaces" / "configs" / "llama-3.1-8b.json"
DEFAULT_OUT = REPORTS / "gpu.md"
DTYPE = torch.bfloat16
GOAL_RANK_RATIO = 1.2  # importance pass / plain forward, as on CPU
GOAL_STEP_RATIO = 0.8  # cached step / live-teacher step, as on CPU
VARIANTS = ("cached", "live top-k")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="teacher config.json, random bf16 weights (default: %(default)s)")
    parser.add_argument("--teacher", help="a real teacher instead (model folder, Hugging Face id, .gguf or smollm2-135m)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=32, help="blocks through the importance pass (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="blocks per forward in the importance pass (default: %(default)s)")
    parser.add_argument("--distill-batch", type=int, default=4, help="blocks per retraining step (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=64, help="teacher log-probs kept per token (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of each measure (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown report (default: reports/benchmarks/gpu.md)")
    args = parser.parse_args(argv)
    for name in ("samples", "seq_len", "batch_size", "distill_batch", "top_k", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU: run on a GPU machine "
              "with the CUDA build of torch, or pass --device cpu with a small --config", file=sys.stderr)
        sys.exit(2)
    if args.teacher is None and not args.config.is_file():
        parser.error(f"--config '{args.config}' is not a file")
    return args


def build_teacher(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, str]:
    if args.teacher is not None:
        return load_teacher(args.teacher).model.to(device, DTYPE).eval(), f"`{args.teacher}`"
    with torch.device(device):  # initialised where it runs: an 8B model initialised on CPU takes minutes
        model = AutoModelForCausalLM.from_config(load_config(str(args.config)), dtype=DTYPE)
    return model.eval(), f"`{args.config}` (random weights)"


def half_size(teacher: Architecture) -> Architecture:
    """3/4 of the hidden size (a multiple of the head count), half the FFN, every head and layer."""
    heads = teacher.num_attention_heads
    return Architecture(
        hidden_size=teacher.hidden_size * 3 // 4 // heads * heads,
        intermediate_size=teacher.intermediate_size // 2,
        num_attention_heads=heads,
        num_key_value_heads=teacher.num_key_value_heads,
        num_hidden_layers=teacher.num_hidden_layers,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    """(seconds, peak GiB allocated on the GPU during the call or None on CPU, result)."""
    gc.collect()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak, result


def plain_forward(model, blocks: torch.Tensor, batch_size: int) -> None:
    """Exactly the model call compute_rankings makes, without hooks."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in blocks.split(batch_size):
            model(input_ids=batch.to(device), use_cache=False, logits_to_keep=1)


def memory_note(label: str, values: list[float | None]) -> str:
    """'; peak memory X GiB' on a GPU; nothing on CPU, where torch keeps no such count."""
    return "" if values[0] is None else f"; peak memory{label} {max(values):.1f} GiB"


def fmt(values: list[float], digits: int = 3) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()
    device = torch.device(args.device)

    print("building the teacher ...", flush=True)
    build_s, _, (model, source) = timed(device, build_teacher, args, device)
    config = model.config
    teacher_arch = Architecture.from_config(config)
    counter = ParamCounter(config)
    generator = torch.Generator().manual_seed(0)
    blocks = torch.randint(config.vocab_size, (args.samples, args.seq_len), generator=generator)

    # (i) importance pass vs plain forward, interleaved, after one untimed batch each
    plain_forward(model, blocks[: args.batch_size], args.batch_size)
    compute_rankings(model, blocks[: args.batch_size], batch_size=args.batch_size, progress=False)
    forward_s, ranking_s, forward_mem, ranking_mem, rankings = [], [], [], [], None
    for repeat in range(args.repeats):
        seconds, peak, _ = timed(device, plain_forward, model, blocks, args.batch_size)
        forward_s.append(seconds)
        forward_mem.append(peak)
        seconds, peak, rankings = timed(device, compute_rankings, model, blocks, batch_size=args.batch_size, progress=False)
        ranking_s.append(seconds)
        ranking_mem.append(peak)
        print(f"repeat {repeat + 1}/{args.repeats}: forward {forward_s[-1]:.2f} s, ranking {ranking_s[-1]:.2f} s", flush=True)
    rank_ratios = [r / f for r, f in zip(ranking_s, forward_s)]

    # (iii) prune to a ~half-size architecture
    arch = half_size(teacher_arch)
    prune_s, prune_mem = [], []
    for _ in range(args.repeats):
        seconds, peak, student = timed(device, prune, model, rankings, arch)
        prune_s.append(seconds)
        prune_mem.append(peak)
        del student
    print(f"prune: {fmt(prune_s, 2)} s", flush=True)

    # (ii) retraining step, cached top-k vs live teacher top-k
    student = prune(model, rankings, arch).train()
    batch = blocks[: args.distill_batch].to(device)
    rows = torch.arange(len(batch))
    settings = RetrainSettings(steps=1, batch_size=args.distill_batch, lr=1e-5, warmup_steps=0, top_k=args.top_k)
    cache_s, _, cache = timed(
        device, TeacherLogitCache.compute, model, batch, args.top_k, settings.temperature, args.distill_batch, {"teacher_fingerprint": "bench"}
    )
    optimizer = make_optimizer(student, settings)

    def step(variant: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        if variant == "cached":
            lp, ix = cache[rows]
            loss, _ = batch_loss(student, batch, settings, topk=(lp.to(device), ix.to(device)))
        else:
            loss, _ = batch_loss(student, batch, settings, teacher=model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
        optimizer.step()

    for variant in VARIANTS:  # warm-up, untimed (the optimizer allocates its state here)
        step(variant)
    step_s = {v: [] for v in VARIANTS}
    step_mem = {v: [] for v in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]:
            seconds, peak, _ = timed(device, step, variant)
            step_s[variant].append(seconds)
            step_mem[variant].append(peak)
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{v} {step_s[v][-1]:.2f} s" for v in VARIANTS), flush=True)
    step_ratios = [c / live for c, live in zip(step_s["cached"], step_s["live top-k"])]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rank_ratio, step_ratio = statistics.median(rank_ratios), statistics.median(step_ratios)
    tokens = args.samples * args.seq_len
    step_tokens = args.distill_batch * args.seq_len
    teacher_n, student_n = counter.count(teacher_arch), counter.count(arch)
    rows_md = [
        [
            "Importance pass / plain forward (median ratio)",
            f"{rank_ratio:.3f}x",
            f"<= {GOAL_RANK_RATIO}x",
            verdict(rank_ratio <= GOAL_RANK_RATIO),
            f"ratios {fmt(rank_ratios)}; ranking median {statistics.median(ranking_s):.2f} s ({fmt(ranking_s, 2)}), forward "
            f"median {statistics.median(forward_s):.2f} s ({fmt(forward_s, 2)}); {args.samples} x {args.seq_len} tokens, "
            f"batch {args.batch_size}, {tokens / statistics.median(ranking_s):,.0f} tokens/s ranked"
            f"{memory_note(' ranking', ranking_mem)}{memory_note(' forward', forward_mem)}",
        ],
        [
            "Cached step / live-teacher step, same top-k objective (median ratio)",
            f"{step_ratio:.3f}x",
            f"<= {GOAL_STEP_RATIO}x",
            verdict(step_ratio <= GOAL_STEP_RATIO),
            f"ratios {fmt(step_ratios)}; {args.distill_batch} x {args.seq_len} tokens, top-k {args.top_k}",
        ],
        *(
            [
                f"Step time, {v} (median)",
                f"{statistics.median(step_s[v]):.3f} s",
                "",
                "",
                f"runs {fmt(step_s[v])} s; {step_tokens / statistics.median(step_s[v]):,.0f} tokens/s{memory_note('', step_mem[v])}",
            ]
            for v in VARIANTS
        ),
        [
            "Cache build for the step's batch (once, not in the steps)",
            f"{cache_s:.3f} s",
            "",
            "",
            f"{cache}",
        ],
        [
            "Prune to ~half size (median)",
            f"{statistics.median(prune_s):.2f} s",
            "",
            "",
            f"runs {fmt(prune_s, 2)} s; hidden {arch.hidden_size}, FFN {arch.intermediate_size}, {arch.num_attention_heads} "
            f"heads, {arch.num_key_value_heads} KV groups, {arch.num_hidden_layers} layers: {student_n.total:,} "
            f"parameters{memory_note('', prune_mem)}",
        ],
    ]
    details = [
        f"- Teacher: {source}, {teacher_n.total:,} parameters (hidden {teacher_arch.hidden_size}, FFN "
        f"{teacher_arch.intermediate_size}, {teacher_arch.num_attention_heads} heads of {head_dim_of(config)}, "
        f"{teacher_arch.num_key_value_heads} KV groups, {teacher_arch.num_hidden_layers} layers, vocabulary "
        f"{config.vocab_size:,}); {str(DTYPE).removeprefix('torch.')} weights on `{device}`, built in {build_s:.1f} s",
        f"- Tokens: random ids; {args.repeats} repeats; optimizer: AdamW, "
        f"{'fused' if optimizer.defaults.get('fused') else 'not fused (no fused kernel for this device and dtype)'}",
    ]
    body = [
        *markdown_table(["Measure", "Measured", "Goal", "Met", "Details"], rows_md),
        "",
        "Teacher and student hold bf16 weights (no autocast); the optimizer is `make_optimizer`'s AdamW. "
        "The importance pass and the plain forward make the same call "
        "(`model(input_ids=batch, use_cache=False, logits_to_keep=1)` under `torch.no_grad()`) on the same blocks, "
        "alternating A B A B ... after one untimed batch each. A step is zero_grad, `batch_loss` (student forward; "
        "cached top-k moved to the device, or the teacher's forward then top-k; KD loss), backward, clipping at 1.0 "
        "and the optimizer step; the two variants alternate their order every repeat after one untimed step each. "
        "Every timing is bracketed by `torch.cuda.synchronize()` (on a GPU); peak memory is "
        "`torch.cuda.max_memory_allocated` over each timed call, teacher weights included, the largest over the "
        "repeats. Ratios are taken per repeat and the median reported.",
    ]
    run.write_report(args.out, "Benchmark: ranking, retraining step and pruning on a GPU", details, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
