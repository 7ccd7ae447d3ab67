"""Benchmark ranking, a retraining step, pruning and the whole pipeline on a GPU, with an 8B-sized teacher.

The CPU benchmarks use the real 135M teacher; on a GPU the question is whether the same
ratios hold at the paper's scale, and whether the whole recipe runs there. The teacher is
built from a config with random weights in bf16 directly on the device (weights do not
change the timings), or loaded with --teacher straight onto the device in bf16. Measures,
in one process:
  (i)   the importance pass (`compute_rankings`) against a plain forward with the same call
        and batch, interleaved A B A B ...; the median of the per-repeat ratios;
  (ii)  one retraining step (`batch_loss`, backward, clipping, fused AdamW, as in
        `retrain`) with cached teacher top-k against the live teacher's top-k, order
        alternating every repeat; the median of the per-repeat ratios;
  (iii) `prune` to a ~half-size architecture (3/4 hidden, 1/2 FFN, all heads and layers);
  (iv)  the pipeline's stages on `--data` text: rank, a grid search of `--candidates`
        architectures (3/4 hidden, FFN from 1/2 of the teacher's up, each pruned, scored,
        retrained by KD on cached top-k, scored again), full distillation of the winner
        against the live teacher, export; wall time and peak GPU memory of each stage;
  (v)   prefill and decode throughput (`measure_latency`) of the teacher and the export.
Every timing is bracketed by `torch.cuda.synchronize()`; peak GPU memory is reported per
measure. A config teacher reads text with --tokenizer's tokenizer (ids must fit its
vocabulary). Writes reports/benchmarks/gpu.md (or --out). Run from the repository root:

A mixture-of-experts or hybrid config works too (`--config` of any supported family): (iii)
then also halves the experts and their width, and the pipeline's candidates keep them.

    .venv/bin/python bench/bench_gpu.py [--config search_spaces/configs/llama-3.1-8b.json | --teacher smollm2-135m]
        [--device cuda] [--parts measures,pipeline] [--samples 32] [--seq-len 1024] [--batch-size 8]
        [--distill-batch 4] [--repeats 5] [--candidates 3] [--retrain-tokens 16384] [--distill-tokens 65536]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import REPO, REPORTS, Run, markdown_table, require_at_least
from transformers import AutoModelForCausalLM

from minitron_nas.config.settings import RetrainSettings
from minitron_nas.distill.signals import CachedTopK, LiveTopK
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import batch_loss, make_optimizer
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.latency import measure_latency
from minitron_nas.model.architecture import Architecture, ParamCounter, head_dim_of
from minitron_nas.model.devices import Placement, check_fits
from minitron_nas.model.teachers import Teacher, fingerprint, load_config, load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings

DEFAULT_CONFIG = REPO / "search_spaces" / "configs" / "llama-3.1-8b.json"
DEFAULT_OUT = REPORTS / "gpu.md"
DTYPE = torch.bfloat16
GOAL_RANK_RATIO = 1.2  # importance pass / plain forward, as on CPU
GOAL_STEP_RATIO = 0.8  # cached step / live-teacher step, as on CPU
VARIANTS = ("cached", "live top-k")
PARTS = ("measures", "pipeline")


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
    parser.add_argument("--parts", default="measures,pipeline", help="comma-separated: measures (i-iii), pipeline (iv-v) (default: %(default)s)")
    parser.add_argument("--data", default="shakespeare", help="text for the pipeline's stages (default: %(default)s)")
    parser.add_argument("--tokenizer", default="smollm2-135m", help="tokenizer of a --config teacher (default: %(default)s)")
    parser.add_argument("--candidates", type=int, default=3, help="architectures searched, 1 to 4 (default: %(default)s)")
    parser.add_argument("--pipeline-seq-len", type=int, default=512, help="tokens per block in the pipeline (default: %(default)s)")
    parser.add_argument("--retrain-tokens", type=int, default=16384, help="KD tokens per search candidate (default: %(default)s)")
    parser.add_argument("--distill-tokens", type=int, default=65536, help="KD tokens of the winner (default: %(default)s)")
    parser.add_argument("--latency-context", type=int, default=512, help="prompt tokens for (v) (default: %(default)s)")
    parser.add_argument("--latency-new-tokens", type=int, default=64, help="generated tokens for (v) (default: %(default)s)")
    parser.add_argument("--work", type=Path, help="folder for the pipeline's run files (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts must list some of {', '.join(PARTS)}")
    if not 1 <= args.candidates <= 4:
        parser.error("--candidates must be 1 to 4")
    require_at_least(
        parser,
        args,
        (
            "samples",
            "seq_len",
            "batch_size",
            "distill_batch",
            "top_k",
            "repeats",
            "pipeline_seq_len",
            "retrain_tokens",
            "distill_tokens",
            "latency_context",
            "latency_new_tokens",
        ),
    )
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: --device {args.device} but torch {torch.__version__} sees no CUDA GPU: run on a GPU machine "
            "with the CUDA build of torch, or pass --device cpu with a small --config",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.teacher is None and not args.config.is_file():
        parser.error(f"--config '{args.config}' is not a file")
    return args


def build_teacher(args: argparse.Namespace, device: torch.device) -> tuple[Teacher, str]:
    """The real teacher loaded straight onto the device in bf16, or a config's with random bf16 weights."""
    if args.teacher is not None:
        return load_teacher(args.teacher, device, DTYPE), f"`{args.teacher}`"
    config = load_config(str(args.config))
    check_fits(config, Placement(device, DTYPE), f"--config '{args.config}'")
    with torch.device(device):  # initialised where it runs: an 8B model initialised on CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPE)
    tokenizer = load_teacher(args.tokenizer, "cpu", DTYPE).tokenizer if "pipeline" in args.parts else None
    teacher = Teacher(model.eval(), tokenizer, args.config.stem, fingerprint(model), args.config)
    return teacher, f"`{args.config}` (random weights)"


def half_size(teacher: Architecture) -> Architecture:
    """3/4 of the hidden size (a multiple of the head count), half the FFN, every head and layer;
    an MoE teacher also keeps half its experts, each at half its width."""
    heads = teacher.num_attention_heads
    smaller = replace(teacher, hidden_size=teacher.hidden_size * 3 // 4 // heads * heads, intermediate_size=teacher.intermediate_size // 2)
    if teacher.num_experts is not None:
        smaller = replace(smaller, num_experts=max(1, teacher.num_experts // 2))
        if teacher.moe_intermediate_size is not None:
            smaller = replace(smaller, moe_intermediate_size=teacher.moe_intermediate_size // 2)
    return smaller


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


def measures(args: argparse.Namespace, model, device: torch.device) -> tuple[list[list[str]], list[str], str]:
    """(i)-(iii): table rows, detail lines, and the paragraph on how they were measured."""
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
            loss, _ = batch_loss(student, batch, settings, CachedTopK(cache), rows)
        else:
            loss, _ = batch_loss(student, batch, settings, LiveTopK(model, settings.top_k))
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
    student_n = counter.count(arch)
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
        f"- Tokens for (i)-(iii): random ids; {args.repeats} repeats; optimizer: AdamW, "
        f"{'fused' if optimizer.defaults.get('fused') else 'not fused (no fused kernel for this device and dtype)'}",
    ]
    how = (
        "Teacher and student hold bf16 weights (no autocast) in (i)-(iii); the optimizer is `make_optimizer`'s AdamW. "
        "The importance pass and the plain forward make the same call "
        "(`model(input_ids=batch, use_cache=False, logits_to_keep=1)` under `torch.no_grad()`) on the same blocks, "
        "alternating A B A B ... after one untimed batch each. A step is zero_grad, `batch_loss` (student forward; "
        "cached top-k moved to the device, or the teacher's forward then top-k; KD loss), backward, clipping at 1.0 "
        "and the optimizer step; the two variants alternate their order every repeat after one untimed step each. "
        "Every timing is bracketed by `torch.cuda.synchronize()` (on a GPU); peak memory is "
        "`torch.cuda.max_memory_allocated` over each timed call, teacher weights included, the largest over the "
        "repeats. Ratios are taken per repeat and the median reported."
    )
    return rows_md, details, how


def pipeline_space(args: argparse.Namespace, config, device: torch.device):
    """A grid of `--candidates` architectures: 3/4 of the hidden size, FFN from half of the teacher's up."""
    from minitron_nas.config.settings import DistillSettings, RankSettings, RetrainSettings
    from minitron_nas.config.space import Budget, DeviceSettings, ScoringSettings, SearchSpace

    teacher = Architecture.from_config(config)
    hidden = half_size(teacher).hidden_size
    ffn = sorted({teacher.intermediate_size * (4 + i) // 8 for i in range(args.candidates)})
    counter = ParamCounter(config)
    counts = [counter.count(replace(teacher, hidden_size=hidden, intermediate_size=f)).total for f in ffn]
    target = (min(counts) + max(counts)) // 2
    seq = args.pipeline_seq_len
    batch = args.distill_batch
    return SearchSpace(
        teacher=str(args.teacher or args.config),
        axes={"hidden_size": (hidden,), "intermediate_size": tuple(ffn)},
        budget=Budget(parameters=target, tolerance=(max(counts) - min(counts)) / 2 / target + 0.01),
        ranking=RankSettings(data=args.data, samples=args.samples, seq_len=seq),
        retrain=RetrainSettings(
            tokens=args.retrain_tokens,
            batch_size=batch,
            seq_len=seq,
            top_k=args.top_k,
            data=args.data,
            eval_every=max(1, args.retrain_tokens // (batch * seq) // 2),
        ),
        scoring=ScoringSettings(metric="heldout_loss", heldout_samples=max(2, batch), seq_len=seq),
        distill=DistillSettings(
            tokens=args.distill_tokens,
            batch_size=batch,
            seq_len=seq,
            data=args.data,
            eval_every=max(1, args.distill_tokens // (batch * seq) // 4),
            checkpoint_every=10**6,
            heldout_samples=max(2, batch),
        ),
        sampler="grid",
        device=DeviceSettings(str(device), "bfloat16"),
        source="bench_gpu.py",
    )


def pipeline(args: argparse.Namespace, teacher: Teacher, device: torch.device, work: Path) -> tuple[list[list[str]], list[str], str]:
    """(iv)-(v): every stage of the recipe on this teacher, then the latency of teacher and export."""
    from minitron_nas.config.settings import RankSettings
    from minitron_nas.prune.ranking import rank
    from minitron_nas.recipes.distill import distill_winner
    from minitron_nas.recipes.export import export_stage
    from minitron_nas.search.runner import run_search

    space = pipeline_space(args, teacher.model.config, device)
    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    spec = space.ranking
    stages = {}
    print("pipeline: rank ...", flush=True)
    stages["rank"] = timed(
        device, rank, teacher, RankSettings(data=spec.data, samples=spec.samples, seq_len=spec.seq_len, batch_size=args.batch_size), out / "rankings"
    )
    print(f"pipeline: search of {args.candidates} candidates ...", flush=True)
    stages["search"] = timed(device, run_search, space, out, teacher=teacher)
    print("pipeline: distill ...", flush=True)
    stages["distill"] = timed(device, distill_winner, space, out, teacher)
    print("pipeline: export ...", flush=True)
    stages["export"] = timed(device, export_stage, space, out, teacher)
    summary = json.loads((out / "distill" / "summary.json").read_text())
    best = json.loads((out / "best_arch.json").read_text())
    trials = [t for t in stages["search"][2].trials if "rung" in t.user_attrs]  # candidates, not rung-0 work units
    arch = best["architecture"]
    notes = {
        "rank": f"{spec.samples} x {spec.seq_len} tokens of `{spec.data}`",
        "search": f"{len(trials)} trials in rungs, {best['search_tokens']:,} KD tokens in all (cached top-{space.retrain.top_k}); winner "
        f"hidden {arch['hidden_size']}, FFN {arch['intermediate_size']}: {best['params_total']:,} parameters, "
        f"{best['metric']} {best['score']:.3f}",
        "distill": f"{summary['tokens']:,} KD tokens (live teacher, full vocabulary), {summary['tokens'] / max(summary['seconds'], 1e-9):,.0f} "
        f"tokens/s; held-out loss {summary['before']['heldout_loss']:.3f} -> {summary['after']['heldout_loss']:.3f} "
        f"(teacher {summary['teacher']['heldout_loss']:.3f})",
        "export": f"`{stages['export'][2]}`",
    }
    rows = [[f"(iv) Stage: {name}", f"{seconds:.1f} s", "", "", notes[name] + memory_note("", [peak])] for name, (seconds, peak, _) in stages.items()]

    exported = AutoModelForCausalLM.from_pretrained(str(out / "export"), dtype=DTYPE, device_map=device).eval()
    latency_args = dict(batch_size=1, context=args.latency_context, new_tokens=args.latency_new_tokens, repeats=args.repeats)
    print("latency ...", flush=True)
    for label, model in (("teacher", teacher.model), ("exported student", exported)):
        result = measure_latency(model, **latency_args)
        rows.append(
            [
                f"(v) Latency, {label}",
                f"{result['decode_tokens_per_s']:,.1f} tok/s decode",
                "",
                "",
                f"prefill {result['prefill_tokens_per_s']:,.0f} tok/s ({result['prefill_ms']:.1f} ms for {args.latency_context} "
                f"tokens), decode {result['decode_ms_per_token']:.2f} ms/token; batch 1, {args.latency_new_tokens} new tokens, "
                f"median of {args.repeats}{memory_note('', [result['peak_memory_gib']])}",
            ]
        )
    del exported
    details = [
        f"- Pipeline: `{args.data}` text, blocks of {space.ranking.seq_len} tokens, batch {args.distill_batch}, bf16 weights "
        f"(students retrain with float32 master weights under bf16 autocast); run files in `{out}`"
    ]
    how = (
        "Stages (iv) are the library's own functions (`rank`, `run_search`, `distill_winner`, `export_stage`) called in "
        "order, each timed whole with its peak GPU memory. Latency (v) is `measure_latency`: one prefill of the prompt, "
        "then one token per step through the KV cache, greedy, after one untimed repeat."
    )
    return rows, details, how


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run()
    device = torch.device(args.device)

    print("building the teacher ...", flush=True)
    try:
        build_s, _, (teacher, source) = timed(device, build_teacher, args, device)
    except MinitronError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = teacher.model.config
    teacher_arch = Architecture.from_config(config)
    teacher_n = ParamCounter(config).count(teacher_arch)
    rows, details, paragraphs = [], [], []
    if "measures" in args.parts:
        part_rows, part_details, how = measures(args, teacher.model, device)
        rows += part_rows
        details += part_details
        paragraphs.append(how)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "pipeline" in args.parts:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            part_rows, part_details, how = pipeline(args, teacher, device, args.work or Path(tmp))
        rows += part_rows
        details += part_details
        paragraphs.append(how)
    details = [
        f"- Teacher: {source}, {teacher_n.total:,} parameters (hidden {teacher_arch.hidden_size}, FFN "
        f"{teacher_arch.intermediate_size}, {teacher_arch.num_attention_heads} heads of {head_dim_of(config)}, "
        f"{teacher_arch.num_key_value_heads} KV groups, {teacher_arch.num_hidden_layers} layers, vocabulary "
        f"{config.vocab_size:,}); {str(DTYPE).removeprefix('torch.')} weights on `{device}`, built in {build_s:.1f} s",
        *details,
    ]
    body = [*markdown_table(["Measure", "Measured", "Goal", "Met", "Details"], rows)]
    for paragraph in paragraphs:
        body += ["", paragraph]
    run.write_report(args.out, "Benchmark: ranking, retraining, pruning and the whole pipeline on a GPU", details, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
