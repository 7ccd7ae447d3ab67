"""Quality at equal total training tokens: the search against what a user would do otherwise.

For each budget (a fraction of SmolLM2-135M's parameters) and each seed, five contenders
are built from the real teacher and given the same total number of training tokens T:

  search          - `run_search` over bench/quality-space.yaml with a token budget S
                    (synchronous successive halving, rungs compared on held-out KL), then
                    its winner distilled on D = T - S tokens (D >= 4 S);
  Model-Optimizer - the --mo-top-k candidates closest to the budget, each scored pruned
                    (held-out KL, no retraining: what Model Optimizer's Minitron mode
                    does), the best distilled on T tokens;
  pruned, all     - every feasible candidate scored pruned the same way, the best
                    distilled on T tokens: whether the rungs' retraining, and not only
                    looking at the whole space, is what pays (if it picks the
                    Model-Optimizer-style pick's architecture, that result is reused);
  depth-only      - full width, the layer count closest to the budget, layers kept by
                    Block Importance, distilled on T tokens;
  uniform width   - one ratio on hidden, FFN and query heads per group, all layers,
                    distilled on T tokens.

Every distillation is logit KD on the teacher's cached top-k (T = 1) over WikiText-2 valid
(train paragraphs), AdamW with warm-up and cosine decay; the seed sets the data order of
the search's retraining and of the distillation. Every student is then measured on
WikiText-2 test: KL divergence to the teacher (top-k + tail, per block) and perplexity;
and lm-eval 0-shot arc_easy, piqa, winogrande, lambada_openai (--limit documents each).

Resumable and runnable in parts: each (budget, seed, contender) result is stored in --work
as it finishes; `--budgets 0.6 --seeds 0` runs one part; the report is rebuilt from every
result present (missing ones are listed). Run from the repository root:

    .venv/bin/python bench/bench_quality.py [--budgets 0.6 0.8] [--seeds 0 1 2] [--limit 300]
        [--search-tokens 16384] [--distill-tokens 65536] [--work runs/bench-quality]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch
from common import REPO, REPORTS, Run, markdown_table, require_at_least

from minitron_nas.config.settings import RankSettings, RetrainSettings
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import retrain
from minitron_nas.evaluate.harness import lm_eval_scores
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.evaluate.metrics import HeldoutKLD, Measurement, paired_stderr
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import load_or_rank
from minitron_nas.search.candidates import enumerate_candidates, load_space
from minitron_nas.search.runner import run_search

TEACHER = "smollm2-135m"
SPACE = REPO / "bench" / "quality-space.yaml"
TASKS = ("arc_easy", "piqa", "winogrande", "lambada_openai")
SHOWN = (("arc_easy", "acc_norm"), ("piqa", "acc_norm"), ("winogrande", "acc"), ("lambada_openai", "acc"))
CONTENDERS = {
    "search": "Search (successive halving, then distilled)",
    "mo": "Model-Optimizer-style (top-k closest, scored pruned)",
    "pruned": "Pruned scoring over the whole feasible set",
    "depth": "Depth-only (Block Importance)",
    "uniform": "Uniform width",
}
METRICS = (("kld", "KLD to teacher", False), ("ppl", "Wiki-2 test ppl", False), ("acc", "mean acc (4 tasks)", True))
TOKENS_PER_STEP = 4 * 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8], help="fractions of the teacher's parameters")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-dir", default="../shared/data", help="benchmark data folder (default: %(default)s)")
    p.add_argument("--rank-samples", type=int, default=64, help="calibration blocks of 256 tokens (default: %(default)s)")
    p.add_argument("--search-tokens", type=int, default=16384, help="the search's whole training budget S (default: %(default)s)")
    p.add_argument("--distill-tokens", type=int, default=65536, help="the search winner's distillation D >= 4 S (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of every distillation (default: %(default)s)")
    p.add_argument("--mo-top-k", type=int, default=5, help="candidates closest to the budget for the Model-Optimizer-style pick")
    p.add_argument("--limit", type=int, default=300, help="lm-eval documents per task (default: %(default)s)")
    p.add_argument("--test-blocks", type=int, default=32, help="WikiText-2 test blocks of 512 tokens (default: %(default)s)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality", help="resumable work folder")
    p.add_argument("--out", type=Path, default=REPORTS / "quality.md", help="markdown report (a .json is written beside it)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the results in --work")
    args = p.parse_args(argv)
    require_at_least(p, args, ("rank_samples", "search_tokens", "distill_tokens", "mo_top_k", "limit", "test_blocks"))
    if args.distill_tokens < 4 * args.search_tokens:
        p.error(f"--distill-tokens {args.distill_tokens} is below 4 x --search-tokens {args.search_tokens}: raise it")
    if not all(0 < b < 1 for b in args.budgets):
        p.error("--budgets are fractions of the teacher's parameters, between 0 and 1 (e.g. 0.6 0.8)")
    for name in ("wikitext2/valid.txt", "wikitext2/test.txt"):
        if not (Path(args.data_dir) / name).is_file():
            p.error(f"--data-dir '{args.data_dir}' has no {name}: point it at the benchmark data folder")
    return args


def settings_key(args) -> dict:
    """What the stored results depend on; a work folder made with other settings is refused."""
    keys = ("data_dir", "rank_samples", "search_tokens", "distill_tokens", "lr", "mo_top_k", "limit", "test_blocks")
    return {k: getattr(args, k) for k in keys} | {"space_sha256": hashlib.sha256(SPACE.read_bytes()).hexdigest()[:16]}


def open_work(args) -> Path:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    stamp, key = work / "settings.json", settings_key(args)
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        sys.exit(f"error: '{work}' holds results made with other settings: give another --work or delete that folder")
    stamp.write_text(json.dumps(key, indent=2))
    return work


def cached(path: Path, compute) -> dict:
    """Each result is written once, whole, so a rerun skips what is done."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
    return value


# --------------------------------------------------------------------------- contenders


def depth_only(counter: ParamCounter, teacher: Architecture, target: int) -> Architecture:
    options = [replace(teacher, num_hidden_layers=n) for n in range(1, teacher.num_hidden_layers + 1)]
    return min(options, key=lambda a: abs(counter.count(a).total - target))


def uniform_width(counter: ParamCounter, teacher: Architecture, target: int) -> Architecture:
    """One ratio r on hidden (a multiple of lcm(8, heads)), FFN (of 8) and query heads per group."""
    best = None
    for step in range(200, 1001):
        r = step / 1000
        per_group = max(1, round(teacher.heads_per_group * r))
        heads = per_group * teacher.num_key_value_heads
        unit = math.lcm(8, heads)
        hidden = max(unit, round(teacher.hidden_size * r / unit) * unit)
        ffn = max(8, round(teacher.intermediate_size * r / 8) * 8)
        if hidden > teacher.hidden_size or ffn > teacher.intermediate_size:
            continue
        arch = Architecture(hidden, ffn, heads, teacher.num_key_value_heads, teacher.num_hidden_layers)
        gap = abs(counter.count(arch).total - target)
        if best is None or gap < best[0]:
            best = (gap, arch)
    return best[1]


def arch_text(a: dict) -> str:
    return f"{a['hidden_size']}/{a['intermediate_size']}/{a['num_attention_heads']}:{a['num_key_value_heads']}/{a['num_hidden_layers']}"


class Bench:
    """The teacher, rankings, data and caches every contender shares."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        data = Path(args.data_dir)
        self.train_text, test_text = str(data / "wikitext2/valid.txt"), str(data / "wikitext2/test.txt")
        self.teacher = load_teacher(TEACHER)
        self.base = Architecture.from_config(self.teacher.model.config)
        self.counter = ParamCounter(self.teacher.model.config)
        self.teacher_total = self.counter.count(self.base).total
        self.rankings = load_or_rank(self.teacher, RankSettings(data=self.train_text, samples=args.rank_samples, seq_len=256), work / "rankings")
        self.test = token_blocks(test_text, self.teacher.tokenizer, 512, args.test_blocks, "all")
        meta = {"teacher_fingerprint": self.teacher.fingerprint}
        test_cache = TeacherLogitCache.load_or_build(self.teacher.model, self.test, 64, 1.0, 4, work / "teacher_logits-test", meta)
        self.kld = HeldoutKLD(self.test, test_cache, batch_size=4)
        self.caches = {}
        self.pruned_scores = {}

    def train_cache(self, tokens: int) -> tuple[torch.Tensor, TeacherLogitCache]:
        """The first tokens / 1024 training blocks of 4 x 256 tokens per step, and their teacher top-k."""
        if tokens not in self.caches:
            steps = max(1, tokens // TOKENS_PER_STEP)
            blocks = token_blocks(self.train_text, self.teacher.tokenizer, 256, steps * 4, "train")
            cache = TeacherLogitCache.load_or_build(
                self.teacher.model, blocks, 64, 1.0, 4, self.work / f"teacher_logits-{tokens}", {"teacher_fingerprint": self.teacher.fingerprint}
            )
            self.caches[tokens] = (blocks, cache)
        return self.caches[tokens]

    def evaluate(self, model) -> dict:
        kld = self.kld.measure(model)
        tasks = lm_eval_scores(model, self.teacher.tokenizer, list(TASKS), self.args.data_dir, limit=self.args.limit, batch_size=16)
        accs = [tasks[t][m] for t, m in SHOWN]
        ses = [tasks[t].get(f"{m}_stderr") or 0.0 for t, m in SHOWN]
        return {
            "kld": kld.value,
            "kld_stderr": kld.stderr,
            "ppl": math.exp(lm_loss(model, self.test, batch_size=4)),
            "acc": sum(accs) / len(accs),
            "acc_stderr": math.sqrt(sum(s * s for s in ses)) / len(ses),
            "tasks": tasks,
        }

    def distilled(self, arch: Architecture, tokens: int, seed: int) -> dict:
        blocks, cache = self.train_cache(tokens)
        steps = max(1, tokens // TOKENS_PER_STEP)
        settings = RetrainSettings(steps=steps, batch_size=4, lr=self.args.lr, warmup_steps=max(1, steps // 10), top_k=64, eval_every=0, seed=seed)
        student = prune(self.teacher.model, self.rankings, arch)
        result = retrain(student, blocks, cache, settings)
        return {
            "architecture": arch.to_dict(),
            "parameters": self.counter.count(arch).total,
            "distill_tokens": result.tokens_seen,
            "distill_seconds": round(result.seconds, 1),
            **self.evaluate(student),
        }

    def search(self, target: int, seed: int, folder: Path) -> tuple[Architecture, dict]:
        template = load_space(SPACE)
        space = replace(
            template,
            budget=replace(template.budget, parameters=target),
            ranking=replace(template.ranking, data=self.train_text, samples=self.args.rank_samples),
            retrain=replace(template.retrain, data=self.train_text),
            halving=replace(template.halving, budget_tokens=self.args.search_tokens),
            seed=seed,
        )
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "rankings").exists():
            self.rankings.save(folder / "rankings")
        run_search(space, folder, resume=(folder / "study.db").is_file(), teacher=self.teacher)
        best = json.loads((folder / "best_arch.json").read_text())
        return Architecture.from_dict(best["architecture"], self.base), {
            k: best[k] for k in ("search_tokens", "search_seconds", "rungs", "schedule", "score", "score_stderr", "tied_with")
        }

    def pruned_pick(self, target: int, top_k: int | None) -> tuple[Architecture, list]:
        """The top_k candidates closest to the budget (all if None), each scored pruned; the best by held-out KL.

        Scoring pruned needs no seed, so every feasible candidate is scored once per budget.
        """
        if target not in self.pruned_scores:
            template = load_space(SPACE)
            space = replace(template, budget=replace(template.budget, parameters=target))
            feasible, _ = enumerate_candidates(space, self.teacher.model.config)  # closest to the budget first
            heldout = token_blocks(self.train_text, self.teacher.tokenizer, 256, space.scoring.heldout_samples, "heldout")
            cache = TeacherLogitCache.compute(self.teacher.model, heldout, 64, 1.0, 4, {"teacher_fingerprint": self.teacher.fingerprint})
            metric = HeldoutKLD(heldout, cache, 4)
            self.pruned_scores[target] = [(metric.measure(prune(self.teacher.model, self.rankings, c.arch)).value, c.arch) for c in feasible]
        scored = self.pruned_scores[target][:top_k]
        best = min(scored, key=lambda s: s[0])[1]
        return best, [[v, a.to_dict()] for v, a in scored]


def run_part(bench: Bench, fraction: float, seed: int) -> None:
    args = bench.args
    target = round(fraction * bench.teacher_total)
    folder = bench.work / f"budget-{round(fraction * 100)}" / f"seed-{seed}"
    total = args.search_tokens + args.distill_tokens
    print(f"budget {fraction:.0%} ({target:,} parameters), seed {seed} ...", flush=True)

    def searched() -> dict:
        arch, info = bench.search(target, seed, folder / "search")
        spent = info["search_tokens"]
        return {**bench.distilled(arch, total - spent, seed), "search": info}

    cached(folder / "search.json", searched)

    def mo() -> dict:
        arch, scored = bench.pruned_pick(target, args.mo_top_k)
        return {**bench.distilled(arch, total, seed), "scored_pruned": scored}

    mo_result = cached(folder / "mo.json", mo)

    def pruned_all() -> dict:
        arch, scored = bench.pruned_pick(target, None)
        if arch.to_dict() == mo_result["architecture"]:  # same student, same tokens and seed
            return {**mo_result, "scored_pruned": scored, "reused_from": "mo"}
        return {**bench.distilled(arch, total, seed), "scored_pruned": scored}

    cached(folder / "pruned.json", pruned_all)
    cached(folder / "depth.json", lambda: bench.distilled(depth_only(bench.counter, bench.base, target), total, seed))
    cached(folder / "uniform.json", lambda: bench.distilled(uniform_width(bench.counter, bench.base, target), total, seed))


# --------------------------------------------------------------------------- report


def collect(work: Path, budgets: list[float], seeds: list[int]) -> dict:
    found = {}
    for fraction in budgets:
        for key in CONTENDERS:
            for seed in seeds:
                path = work / f"budget-{round(fraction * 100)}" / f"seed-{seed}" / f"{key}.json"
                if path.is_file():
                    found.setdefault((fraction, key), {})[seed] = json.loads(path.read_text())
    return found


def spread(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def cell(values: list[float], digits: int) -> str:
    mean, sd = spread(values)
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def verdicts(found: dict, fraction: float) -> list[str]:
    """For each metric: does the search beat each contender by more than its noise?

    The noise is the larger of the two seed standard deviations and, where the metric has a
    standard error over its evaluation sample (test blocks, lm-eval documents), the unpaired
    error of the difference: every seed is measured on the same sample, so averaging over
    seeds does not shrink that part. Perplexity has no such error here (seed SD only).
    """
    lines = []
    mine = found.get((fraction, "search"), {})
    for metric, label, higher in METRICS:
        if len(mine) < 2:
            break
        m_mean, m_sd = spread([r[metric] for r in mine.values()])
        m = Measurement(m_mean, _mean_stderr(mine.values(), metric), 0.0)
        for key in list(CONTENDERS)[1:]:
            theirs = found.get((fraction, key), {})
            if len(theirs) < 2:
                continue
            t_mean, t_sd = spread([r[metric] for r in theirs.values()])
            sample = paired_stderr(m, Measurement(t_mean, _mean_stderr(theirs.values(), metric), 0.0)) or 0.0
            gap = (m_mean - t_mean) if higher else (t_mean - m_mean)  # > 0: the search is better
            seed_sd = max(m_sd or 0.0, t_sd or 0.0)
            noise = max(seed_sd, sample)
            if gap > noise:
                word = "beats"
            elif gap < -noise:
                word = "loses to"
            else:
                word = "ties (within the noise) with"
            lines.append(
                f"- {label}: the search {word} {CONTENDERS[key]} ({m_mean:.4g} vs {t_mean:.4g}; "
                f"seed SD {seed_sd:.2g}" + (f", sample SE of the difference {sample:.2g}" if sample else "") + ")."
            )
    return lines


def _mean_stderr(results, metric: str) -> float | None:
    """The mean over seeds of a metric's standard error over its evaluation sample, if recorded."""
    ses = [r.get(f"{metric}_stderr") for r in results]
    return None if any(s is None for s in ses) else statistics.fmean(ses)


def write(bench_run: Run, args, teacher_total: int | None) -> None:
    found = collect(args.work, args.budgets, args.seeds)
    header = ["Contender", "architecture (seeds)", "params", "seeds", "KLD to teacher", "Wiki-2 test ppl", "mean acc", "tokens (search + distill)"]
    total = args.search_tokens + args.distill_tokens
    body = [
        f"Every contender gets T = {total:,} training tokens: the search spends at most S = {args.search_tokens:,} "
        f"(synchronous successive halving over `bench/quality-space.yaml`, rungs compared on held-out KL) and its winner "
        f"is distilled on T minus what it spent; the others put all T into the distillation. Distillation: logit KD on the "
        f"teacher's cached top-64, WikiText-2 valid (train paragraphs), 4 x 256 tokens a step, lr {args.lr}. Measured on "
        f"WikiText-2 test ({args.test_blocks} blocks of 512 tokens): KL to the teacher (top-64 + tail) and perplexity; "
        f"lm-eval 0-shot, first {args.limit} documents of {', '.join(TASKS)} (acc_norm for arc_easy and piqa, acc for "
        "the others), mean of the four. Cells: mean ± standard deviation over seeds.",
        "",
    ]
    missing = []
    for fraction in args.budgets:
        rows = []
        for key, label in CONTENDERS.items():
            results = found.get((fraction, key), {})
            for seed in args.seeds:
                if seed not in results:
                    missing.append(f"{fraction:.0%} / seed {seed} / {key}")
            if not results:
                rows.append([label, "-", "-", "0", "-", "-", "-", "-"])
                continue
            vals = list(results.values())
            tokens = statistics.fmean(r.get("search", {}).get("search_tokens", 0) + r["distill_tokens"] for r in vals)
            rows.append(
                [
                    label,
                    picks_text(results),
                    " / ".join(sorted({f"{r['parameters'] / 1e6:.1f}M" for r in vals})),
                    str(len(vals)),
                    cell([r["kld"] for r in vals], 4),
                    cell([r["ppl"] for r in vals], 2),
                    cell([r["acc"] for r in vals], 3),
                    f"{tokens:,.0f}",
                ]
            )
        body += [f"## {fraction:.0%} of the teacher", "", *markdown_table(header, rows), ""]
        searches = found.get((fraction, "search"), {})
        for seed, r in sorted(searches.items()):
            s = r["search"]
            rungs = "; ".join(
                f"rung {g['rung']}: {g['finished']} finished"
                + (f", {g['kept']} kept" if "kept" in g else "")
                + (f", tau vs previous {_tau(g.get('tau_with_previous'))} (n={g.get('tau_n')})" if "tau_n" in g else "")
                + (f", {g['cut_within_one_se']} cut within 1 SE" if "cut_within_one_se" in g else "")
                for g in s["rungs"]
            )
            body.append(
                f"- seed {seed}: search spent {s['search_tokens']:,} tokens in {s['search_seconds']:.0f} s; {rungs}; winner {arch_text(r['architecture'])} "
                f"(last rung {s['score']:.3f} ± {s['score_stderr']:.3f}), tied with {len(s['tied_with'])} other(s)."
            )
        verdict = verdicts(found, fraction)
        rule = (
            "Verdicts: beats or loses only where the gap exceeds the noise, the larger of the seed standard deviations "
            "and the standard error of the difference over the evaluation sample (none for perplexity); otherwise a tie."
        )
        body += ["", *([rule, "", *verdict] if verdict else ["Fewer than two seeds of the search or of a contender: no verdict yet."]), ""]
    if missing:
        body += ["Not run yet (run these parts with --budgets/--seeds): " + ", ".join(missing), ""]
    bench_run.write_report(
        args.out,
        "Benchmark: quality at equal total training tokens, search vs alternatives",
        [f"- Teacher: {TEACHER}" + (f" ({teacher_total:,} parameters)" if teacher_total else "")],
        body,
    )
    args.out.with_suffix(".json").write_text(
        json.dumps({"settings": settings_key(args), "results": {f"{f:.2f}/{k}": v for (f, k), v in found.items()}}, indent=2, default=str)
    )


def picks_text(results: dict) -> str:
    """Each architecture picked, with the seeds that picked it: seeds may disagree."""
    seeds_of = {}
    for seed, r in sorted(results.items()):
        seeds_of.setdefault(arch_text(r["architecture"]), []).append(str(seed))
    if len(seeds_of) == 1:
        return next(iter(seeds_of))
    return "; ".join(f"{a} (seed {', '.join(s)})" for a, s in seeds_of.items())


def _tau(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    bench_run = Run()
    work = open_work(args)
    if args.report_only:
        write(bench_run, args, None)
        return 0
    bench = Bench(args, work)
    for fraction in args.budgets:
        for seed in args.seeds:
            run_part(bench, fraction, seed)
    write(bench_run, args, bench.teacher_total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
