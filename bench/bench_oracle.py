"""The oracle: every feasible candidate distilled on the full T, and how well each strategy picks among them.

For each budget (a fraction of SmolLM2-135M's parameters), every feasible candidate of
bench/quality-space.yaml is pruned from the real teacher and distilled on the whole token
budget T (logit KD on the teacher's cached top-k, seed 0; the best 4 also on seeds 1 and 2),
and its KL divergence to the teacher is stored per WikiText-2 test block. That is the
oracle: the final ranking a strategy tries to predict. Then each strategy picks:

  search S/T      - `run_search` over the space with a token budget S = 5%, 10%, 20% of T,
                    on --search-seeds seeds (each a different data order);
  pruned, all     - every feasible candidate scored pruned (held-out KL on WikiText-2 valid),
                    the best;
  Model-Optimizer - the --mo-top-k candidates closest to the budget, scored pruned, the best;
  depth-only      - full width, the layer count closest to the budget (distilled on T);
  uniform width   - one ratio on hidden, FFN and query heads per group (distilled on T).

A pick's selection regret is its oracle KL minus the oracle's best, paired over the test
blocks; over the search seeds it is reported as mean +- SE with a one-sided 95% bound, and
P(pick within noise of the best) with a Wilson interval. Kendall tau (bootstrap CI) relates
the final ranking to the pruned score and to each rung of the search. The token-cost regret
compares at equal total tokens T: the search's winner distilled on T - S from its rung state.

Resumable and runnable in parts: every result is written once to --work as it is done and
the finished parts are copied to reports/benchmarks/oracle-parts/; the report is rebuilt from
whatever is present and lists what is missing. Run from the repository root:

    .venv/bin/python bench/bench_oracle.py [--budgets 0.8 0.6] [--parts pruned oracle search seeds baselines cost]
        [--search-seeds 10] [--cost-seeds 1] [--tokens 81920] [--work runs/bench-oracle]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
from bench_quality import SPACE, TOKENS_PER_STEP, Bench, arch_text, cached, depth_only, uniform_width
from common import REPO, REPORTS, Run, markdown_table

from minitron_nas.config.settings import RetrainSettings
from minitron_nas.data import token_blocks
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import retrain
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.metrics import HeldoutKLD, Measurement, mean_and_stderr, one_se_t
from minitron_nas.model.architecture import Architecture
from minitron_nas.prune.pruning import prune
from minitron_nas.search.candidates import enumerate_candidates, load_space
from minitron_nas.search.halving import TIE_RULE, rung_tau, tie_keys
from minitron_nas.search.rung_states import read_state
from minitron_nas.search.runner import run_search, schedule_for
from minitron_nas.search.samplers import sampler_named

PARTS = ("pruned", "oracle", "search", "seeds", "baselines", "cost")
FRACTIONS = (0.05, 0.10, 0.20)  # the search's S / T
PARTS_DIR = REPORTS / "oracle-parts"
KEEP_PARTS = True  # False when the kept parts were made with other settings (see parts_match)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6], help="fractions of the teacher's parameters")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="which parts to run (default: all, in order)")
    p.add_argument("--search-seeds", type=int, default=10, help="search runs per S/T, each its own data order")
    p.add_argument("--st", type=float, nargs="+", default=list(FRACTIONS), choices=FRACTIONS, help="which S/T the search and cost parts run")
    p.add_argument("--tokens", type=int, default=81920, help="T: each oracle distillation's tokens (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--mo-top-k", type=int, default=5)
    p.add_argument("--cost-seeds", type=int, default=1, help="search seeds whose winner is distilled on T - S for the token-cost regret")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--rank-samples", type=int, default=64)
    p.add_argument("--test-blocks", type=int, default=32, help="WikiText-2 test blocks of 512 tokens")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-oracle")
    p.add_argument("--out", type=Path, default=REPORTS / "oracle.md")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.tokens < TOKENS_PER_STEP * 20:
        p.error(f"--tokens {args.tokens} is below 20 steps of {TOKENS_PER_STEP}: raise it")
    return args


def key_of(a: dict) -> str:
    return arch_text(a)


class Oracle(Bench):
    """The shared teacher, rankings and test blocks (bench_quality.Bench), with per-block results."""

    def distill_per_block(self, arch: Architecture, seed: int, tokens: int | None = None, start: Path | None = None) -> dict:
        """`arch` pruned and distilled on `tokens` (default T) from the same pool of T tokens;
        with `start`, from the weights of a search's rung state (as `distill` continues a winner)."""
        blocks, cache = self.train_cache(self.args.tokens)
        steps = (tokens or self.args.tokens) // TOKENS_PER_STEP
        settings = RetrainSettings(steps=steps, batch_size=4, lr=self.args.lr, top_k=64, eval_every=0, seed=seed)
        student = prune(self.teacher.model, self.rankings, arch)
        if start is not None:
            student.load_state_dict(read_state(start)["model"])
        result = retrain(student, blocks, cache, settings)
        kld = self.kld.measure(student)
        return {
            "architecture": arch.to_dict(),
            "parameters": self.counter.count(arch).total,
            "seed": seed,
            "tokens": result.tokens_seen,
            "seconds": round(result.seconds, 1),
            "kld": kld.value,
            "kld_stderr": kld.stderr,
            "per_block": kld.per_item,
        }

    def space_for(self, target: int, seed: int = 0, search_tokens: int | None = None):
        template = load_space(SPACE)
        return replace(
            template,
            budget=replace(template.budget, parameters=target),
            ranking=replace(template.ranking, data=self.train_text, samples=self.args.rank_samples),
            retrain=replace(template.retrain, data=self.train_text),
            halving=replace(template.halving, budget_tokens=search_tokens),
            seed=seed,
        )

    def score_all_pruned(self, target: int) -> dict:
        """Every feasible candidate pruned and scored on held-out KL (the search's rung 0, done once here)."""
        space = self.space_for(target)
        feasible, _ = enumerate_candidates(space, self.teacher.model.config)
        heldout = token_blocks(self.train_text, self.teacher.tokenizer, 256, space.scoring.heldout_samples, "heldout")
        cache = TeacherLogitCache.compute(self.teacher.model, heldout, 64, 1.0, 4, {"teacher_fingerprint": self.teacher.fingerprint})
        metric = HeldoutKLD(heldout, cache, 4)
        start, rows, forward = time.perf_counter(), [], 0.0
        for rank, c in enumerate(feasible):  # closest to the budget first
            m = metric.measure(prune(self.teacher.model, self.rankings, c.arch))
            forward += m.seconds
            rows.append({"key": key_of(c.arch.to_dict()), "architecture": c.arch.to_dict(), "parameters": c.total, "closeness_rank": rank,
                         "kld": m.value, "kld_stderr": m.stderr, "per_block": m.per_item})  # fmt: skip
        seconds = time.perf_counter() - start
        return {
            "candidates": rows,
            "seconds": round(seconds, 1),
            "per_minute": round(60 * len(rows) / seconds, 2),
            "forward_share": round(forward / seconds, 3),
        }

    def search_pick(self, target: int, fraction: float, seed: int, folder: Path) -> dict:
        search_tokens = int(fraction * self.args.tokens)
        space = self.space_for(target, seed, search_tokens)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "rankings").exists():
            self.rankings.save(folder / "rankings")
        n = sampler_named(space.sampler).size(enumerate_candidates(space, self.teacher.model.config)[0], space.trials)
        try:
            schedule_for(space, n)
        except MinitronError as err:  # a budget below the cheapest schedule is a result: the search cannot run there
            return {"refused": str(err), "budget_tokens": search_tokens}
        run_search(space, folder, resume=(folder / "study.db").is_file(), teacher=self.teacher)
        best = json.loads((folder / "best_arch.json").read_text())
        for state in (folder / "rung_states").glob("*.pt"):  # 1.4 GB each: only the winners the token cost continues are kept
            if seed >= self.args.cost_seeds or state != Path(best["state"]):
                state.unlink()
        trials = pd.read_csv(folder / "trials.csv")
        done = trials[(trials.state == "COMPLETE") & (trials.order == 0)]
        rungs = {int(r): dict(zip(g.key, g.value)) for r, g in done.groupby("rung")}
        return {
            k: best[k] for k in ("key", "architecture", "score", "score_stderr", "tied_with", "tie_broken_by", "search_tokens", "order_stderr", "order_dof")
        } | {
            "search_seconds": best["search_seconds"],
            "budget_tokens": search_tokens,
            "rung_values": rungs,
        }


def budget_dir(work: Path, fraction: float) -> Path:
    return work / f"budget-{round(fraction * 100)}"


def parts_key(args) -> dict:
    """What the kept parts depend on (the budget is in their folder's name)."""
    keys = ("tokens", "lr", "rank_samples", "test_blocks", "data_dir", "mo_top_k")
    return {k: getattr(args, k) for k in keys} | {"space_sha256": hashlib.sha256(SPACE.read_bytes()).hexdigest()[:16]}


def parts_match(args) -> bool:
    """True when the parts kept beside the report were made with these settings (or none are kept).
    Otherwise they are neither restored nor added to, so one report never mixes settings."""
    stamp = PARTS_DIR / "settings.json"
    if not stamp.is_file():
        PARTS_DIR.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(parts_key(args), indent=2))
        return True
    if json.loads(stamp.read_text()) == parts_key(args):
        return True
    print(f"note: {PARTS_DIR} holds parts made with other settings: they are not restored into --work, and this run's are not kept there", file=sys.stderr)
    return False


def restore_parts(work: Path) -> None:
    """Finished parts come back into a fresh --work, so a new machine resumes where the last one stopped."""
    for kept in PARTS_DIR.glob("budget-*/**/*.json"):
        target = work / kept.relative_to(PARTS_DIR)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(kept, target)


def keep_part(path: Path, work: Path) -> None:
    """A finished part is kept beside the report (small JSON), so the figures survive the work folder."""
    if not KEEP_PARTS:
        return
    target = PARTS_DIR / path.relative_to(work)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, target)


def run_budget(bench: Oracle, fraction: float, parts: list[str]) -> None:
    args, folder = bench.args, budget_dir(bench.work, fraction)
    target = round(fraction * bench.teacher_total)
    say = lambda line: print(f"[{fraction:.0%}] {line}", file=sys.stderr, flush=True)
    if "pruned" in parts or not (folder / "pruned.json").is_file():
        pruned = cached(folder / "pruned.json", lambda: bench.score_all_pruned(target))
        keep_part(folder / "pruned.json", bench.work)
        say(f"pruned scoring: {len(pruned['candidates'])} candidates, {pruned['per_minute']} per minute, {pruned['forward_share']:.0%} in the forward passes")
    pruned = json.loads((folder / "pruned.json").read_text())
    archs = {c["key"]: Architecture.from_dict(c["architecture"], bench.base) for c in pruned["candidates"]}
    if "oracle" in parts:
        for key, arch in archs.items():
            path = folder / "oracle" / f"{key.replace('/', '_').replace(':', '-')}-seed0.json"
            if not path.is_file():
                say(f"oracle: {key} on {args.tokens:,} tokens, seed 0")
            cached(path, lambda arch=arch: bench.distill_per_block(arch, 0))
            keep_part(path, bench.work)
    if "search" in parts:
        for fraction_st in args.st:
            for seed in range(args.search_seeds):
                path = folder / "search" / f"st{round(fraction_st * 100)}-seed{seed}.json"
                if not path.is_file():
                    say(f"search at S/T {fraction_st:.0%}, seed {seed}")
                pick = cached(path, lambda s=seed, f=fraction_st: bench.search_pick(target, f, s, folder / "search" / f"st{round(f * 100)}-seed{s}"))
                keep_part(path, bench.work)
                if "refused" in pick:  # the same for every seed: the schedule depends on the budget only
                    say(f"search at S/T {fraction_st:.0%} refused: {pick['refused']}")
                    break
    if "seeds" in parts:
        seed0 = load_oracle(folder)
        for key in sorted(seed0, key=lambda k: seed0[k][0]["kld"])[:4]:
            for seed in (1, 2):
                path = folder / "oracle" / f"{key.replace('/', '_').replace(':', '-')}-seed{seed}.json"
                if not path.is_file():
                    say(f"oracle: {key}, seed {seed}")
                cached(path, lambda arch=archs[key], s=seed: bench.distill_per_block(arch, s))
                keep_part(path, bench.work)
    if "cost" in parts:  # the token-cost regret: the search's winner gets T - S, continued from its rung state
        for fraction_st in args.st:
            for seed in range(args.cost_seeds):
                pick_path = folder / "search" / f"st{round(fraction_st * 100)}-seed{seed}.json"
                pick = json.loads(pick_path.read_text()) if pick_path.is_file() else {"refused": "not run"}
                path = folder / "cost" / f"st{round(fraction_st * 100)}-seed{seed}.json"
                if "refused" in pick or path.is_file():
                    continue
                search = pick_path.with_suffix("")
                state = Path(json.loads((search / "best_arch.json").read_text())["state"])
                if not state.is_file():
                    say(f"token cost at S/T {fraction_st:.0%}, seed {seed}: the winner's rung state is gone; delete {pick_path} to search again")
                    continue
                tokens = args.tokens - pick["search_tokens"]
                say(f"token cost at S/T {fraction_st:.0%}, seed {seed}: {pick['key']} on T - S = {tokens:,} tokens from its rung state")
                arch = Architecture.from_dict(pick["architecture"], bench.base)
                cached(
                    path,
                    lambda arch=arch, t=tokens, st=state, s=seed, spent=pick["search_tokens"]: (
                        bench.distill_per_block(arch, s, t, st) | {"search_tokens": spent}
                    ),
                )
                keep_part(path, bench.work)
    if "baselines" in parts:
        for name, arch in (("depth", depth_only(bench.counter, bench.base, target)), ("uniform", uniform_width(bench.counter, bench.base, target))):
            path, key = folder / f"{name}.json", arch_text(arch.to_dict())
            if key in archs:  # a candidate of the space: its oracle run is the baseline's result, not run twice
                cached(path, lambda key=key: {"in_space": key})
            elif not path.is_file():
                say(f"{name}: {key} on {args.tokens:,} tokens")
            cached(path, lambda arch=arch: bench.distill_per_block(arch, 0))
            keep_part(path, bench.work)


# --------------------------------------------------------------------------- report


def load_oracle(folder: Path) -> dict[str, dict[int, dict]]:
    """{key: {seed: result}} of the oracle distillations present."""
    found: dict[str, dict[int, dict]] = {}
    for path in sorted((folder / "oracle").glob("*.json")) if (folder / "oracle").is_dir() else []:
        r = json.loads(path.read_text())
        found.setdefault(key_of(r["architecture"]), {})[r["seed"]] = r
    return found


def paired(a: list[float], b: list[float]) -> Measurement:
    """mean(a - b) over shared blocks with its paired standard error."""
    diff = [x - y for x, y in zip(a, b)]
    mean, se = mean_and_stderr(diff)
    return Measurement(mean, se, 0.0, diff)


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def seed_variance(oracle: dict) -> tuple[float, int]:
    """(pooled variance, its degrees of freedom) of a candidate's final KL across seeds (the candidates with several seeds)."""
    groups = [[r["kld"] for r in seeds.values()] for seeds in oracle.values() if len(seeds) > 1]
    dof = sum(len(g) - 1 for g in groups)
    return (sum(statistics.variance(g) * (len(g) - 1) for g in groups) / dof if dof else 0.0), dof


def shipped_pick(run: dict, candidates: dict) -> str:
    """The search's pick under the shipped tie rule. A run recorded under an earlier rule has its
    last-rung tie (winner and `tied_with`: the same group whatever the rule) resolved again by
    halving.tie_keys; the rule acts on nothing else (promotion orders by it only on equal values),
    so this is the pick a rerun makes."""
    if run.get("tie_broken_by") in (None, TIE_RULE):
        return run["key"]
    attrs = lambda k: {"architecture": candidates[k]["architecture"], "pruned": candidates[k]["kld"], "params_total": candidates[k]["parameters"]}
    return min([run["key"], *run["tied_with"]], key=lambda k: tie_keys(attrs(k)))


TIE_RULES = {  # name: the sort key among a search's tied candidates (lowest wins)
    "fewer layers, then lower pruned score (the shipped rule)": lambda c, last: (c["architecture"]["num_hidden_layers"], c["kld"]),
    "lower pruned score (the earlier rule)": lambda c, last: (c["kld"],),
    "fewer parameters": lambda c, last: (c["parameters"],),
    "lower last-rung value (the tie ignored)": lambda c, last: (last[c["key"]],),
}


def tie_rules(folder: Path, candidates: dict, seed0: dict, best: str, regret, near_best) -> list[str]:
    """What each tie rule would have picked from each search's tied candidates (its winner and
    `tied_with`): the shipped rule's choice set against the alternatives, on the same runs.
    A counterfactual over the recorded ties, not a rerun: the rungs are the ones the search ran."""
    rows = []
    for f in FRACTIONS:
        paths = sorted((folder / "search").glob(f"st{round(f * 100)}-seed*.json")) if (folder / "search").is_dir() else []
        runs = [json.loads(p.read_text()) for p in paths]
        runs = [r for r in runs if "refused" not in r]
        if not runs or any(k not in seed0 for r in runs for k in [r["key"], *r["tied_with"]]):
            continue
        for name, rule in TIE_RULES.items():
            picks = []
            for r in runs:
                last = r["rung_values"][max(r["rung_values"], key=int)]
                picks.append(min([r["key"], *r["tied_with"]], key=lambda k, last=last: rule(candidates[k], last)))
            values = [regret(k).value for k in picks]
            mean, se_seeds = mean_and_stderr(values)
            blocks = paired([statistics.fmean(v) for v in zip(*[seed0[k]["per_block"] for k in picks])], seed0[best]["per_block"])
            se = math.hypot(se_seeds or 0.0, blocks.stderr or 0.0)
            hits = sum(near_best(k) for k in picks)
            low, high = wilson(hits, len(picks))
            rows.append([f"S/T {f:.0%}", name, f"{mean:+.4f} ± {se:.4f}", f"{hits}/{len(picks)} [{low:.2f}, {high:.2f}]",
                         ", ".join(f"{k} x{picks.count(k)}" for k in dict.fromkeys(picks))])  # fmt: skip
    if not rows:
        return []
    return [
        "Tie rules, counterfactual: each search run's last-rung tie (its winner and the candidates within noise of it) "
        "resolved by each rule, on the same runs; regret and hits as above. The shipped rule (fewer layers first: the faster "
        "decoder) replaced the lower pruned score after both budgets' oracle orders were seen, and two budgets are two top "
        "pairs: its lead here is evidence for these two budgets, a hypothesis for a budget or teacher it was not chosen on.",
        "",
        *markdown_table(["search", "tie rule", "selection regret", "picks the best (within noise)", "picks"], rows),
        "",
    ]


def report_budget(work: Path, fraction: float, search_seeds: int) -> tuple[list[str], list[str]]:
    folder, lines, missing = budget_dir(work, fraction), [], []
    if not (folder / "pruned.json").is_file():
        return [f"## {fraction:.0%} of the teacher", "", "Not run yet.", ""], [f"{fraction:.0%}: everything"]
    pruned = json.loads((folder / "pruned.json").read_text())
    candidates = {c["key"]: c for c in pruned["candidates"]}
    oracle = load_oracle(folder)
    seed0 = {k: v[0] for k, v in oracle.items() if 0 in v}
    lines += [f"## {fraction:.0%} of the teacher: {len(candidates)} feasible candidates", ""]
    lines.append(
        f"Pruned scoring (rung 0) on the real teacher: {pruned['per_minute']} candidates per minute, "
        f"{pruned['forward_share']:.0%} of the time in the metric's forward passes (32 blocks of 256 tokens each)."
    )
    lines.append("")
    absent = [k for k in candidates if k not in seed0]
    if absent:
        missing.append(f"{fraction:.0%}: oracle seed 0 for {len(absent)} of {len(candidates)} candidates")
    if not seed0:
        return lines + ["The oracle has not run yet.", ""], [
            *missing,
            f"{fraction:.0%}: the seeds, the searches, the baselines and the token cost (after the oracle)",
        ]
    best = min(seed0, key=lambda k: seed0[k]["kld"])
    var_seed, seed_dof = seed_variance(oracle)
    top = sorted(seed0, key=lambda k: seed0[k]["kld"])[:4]
    runs = sum(s in oracle[k] for k in top for s in (1, 2))
    if runs < 2 * len(top):
        missing.append(f"{fraction:.0%}: oracle seeds 1 and 2 for the best {len(top)} ({2 * len(top) - runs} of {2 * len(top)} runs)")
    spread = (
        f"pooled seed SD {math.sqrt(var_seed):.4f} on {seed_dof} degree{'s' if seed_dof != 1 else ''} of freedom from the candidates run on seeds 1 and 2, "
        f"widened to Student's t at those degrees of freedom, x{one_se_t(seed_dof):.2f}"
        if any(len(v) > 1 for v in oracle.values())
        else "no candidate has run on seeds 1 and 2 yet, so that term is 0 for now"
    )

    def regret(key: str) -> Measurement | None:
        if key not in seed0:
            return None
        return paired(seed0[key]["per_block"], seed0[best]["per_block"])

    def over_seeds(key: str) -> tuple[Measurement, int] | None:
        """The difference to the best paired over the seeds both ran (each seed one data order for
        both) and over the test blocks: (mean, SE of blocks and seeds combined), seed dof."""
        shared = sorted(set(oracle.get(key, {})) & set(oracle[best]))
        if key == best or len(shared) < 2:
            return None
        per_seed = [[x - y for x, y in zip(oracle[key][s]["per_block"], oracle[best][s]["per_block"])] for s in shared]
        blocks = mean_and_stderr([statistics.fmean(d) for d in zip(*per_seed)])
        seeds = mean_and_stderr([statistics.fmean(d) for d in per_seed])
        return Measurement(blocks[0], math.hypot(blocks[1], seeds[1]), 0.0, None), len(shared) - 1

    def near_best(key: str) -> bool:
        """Within one standard error (Student's t at the seed term's degrees of freedom) of the best:
        paired over seeds and blocks where both ran several seeds; otherwise seed 0 paired over
        blocks plus the pooled seed spread of two independent runs (conservative)."""
        if key == best:
            return True
        if (both := over_seeds(key)) is not None:
            d, dof = both
            return d.value <= d.stderr * one_se_t(dof)
        r = regret(key)
        widen = one_se_t(seed_dof) if seed_dof else 1.0
        return r is not None and r.value <= math.sqrt((r.stderr or 0.0) ** 2 + 2 * var_seed) * widen

    rows = []
    for key in sorted(seed0, key=lambda k: seed0[k]["kld"]):
        r, seeds = regret(key), oracle[key]
        others = [seeds[s]["kld"] for s in sorted(seeds) if s]
        rows.append([key, f"{candidates[key]['parameters'] / 1e6:.1f}M", f"{candidates[key]['kld']:.4f}", f"{seeds[0]['kld']:.4f} ± {seeds[0]['kld_stderr']:.4f}",
                     ", ".join(f"{v:.4f}" for v in others) or "-", f"{statistics.fmean([seeds[0]['kld'], *others]):.4f}" if others else "-",
                     "best" if key == best else f"{r.value:+.4f} ± {r.stderr:.4f}",
                     f"{both[0].value:+.4f} ± {both[0].stderr:.4f}" if (both := over_seeds(key)) else "-",
                     "yes" if near_best(key) else ""])  # fmt: skip
    lines += [
        f"Oracle (each candidate distilled on T = {seed0[best]['tokens']:,} tokens): test KL per candidate, best first. "
        f"Within noise: the difference to the best is within one standard error of it. Where both ran seeds 0-2 (each "
        f"seed one data order for every candidate), the difference is paired over the seeds and the test blocks, its "
        f"error combining both, widened to Student's t at the seeds' degrees of freedom; otherwise seed 0's difference "
        f"paired over the blocks, its error plus the spread of two independent runs ({spread}).",
        "",
        *markdown_table(
            [
                "candidate",
                "params",
                "pruned KL (valid)",
                "final KL, seed 0",
                "seeds 1, 2",
                "mean of the seeds",
                "minus the best (seed 0, paired)",
                "minus the best (seeds 0-2, paired)",
                "within noise",
            ],
            rows,
        ),
        "",
    ]
    shared = {k: candidates[k]["kld"] for k in seed0}
    tau = rung_tau(shared, {k: v["kld"] for k, v in seed0.items()})
    if tau["tau"] is not None:
        lines.append(f"Kendall tau, final ranking vs pruned score: {tau['tau']:.2f} [{tau['low']:.2f}, {tau['high']:.2f}] (n = {tau['n']}, 95% bootstrap).")
        lines.append("")

    table, notes = [], []
    for f in FRACTIONS:
        paths = sorted((folder / "search").glob(f"st{round(f * 100)}-seed*.json")) if (folder / "search").is_dir() else []
        runs = [json.loads(p.read_text()) for p in paths]
        if not runs:
            missing.append(f"{fraction:.0%}: search at S/T {f:.0%}")
            continue
        if "refused" in runs[0]:
            reason = runs[0]["refused"].partition("; raise")[0]
            table.append([f"search, S/T {f:.0%}", "-", f"cannot run: {reason}", "-", "-", f"{runs[0]['budget_tokens']:,} allowed", "-"])
            continue
        picks = [shipped_pick(r, candidates) for r in runs]
        redone = sum(r.get("tie_broken_by") not in (None, TIE_RULE) for r in runs)
        if redone:
            notes.append(
                f"{fraction:.0%}, S/T {f:.0%}: {redone} of {len(runs)} runs ended in a last-rung tie recorded under the earlier tie rule, resolved here by the shipped one (bench_oracle.shipped_pick)"
            )
        # Runs recorded before rung 1's unused places went to the data-order pilot (their parts have no
        # order_dof): those that left tokens unused would train more pilot orders now and may pick otherwise.
        stale = sum("order_dof" not in r and r["search_tokens"] < r["budget_tokens"] for r in runs)
        if stale:
            notes.append(
                f"{fraction:.0%}, S/T {f:.0%}: {stale} of {len(runs)} runs were recorded before rung 1's unused places went to the "
                "data-order pilot and left some unused: a rerun trains more pilot orders and may pick otherwise"
            )
            missing.append(f"{fraction:.0%}: search at S/T {f:.0%} rerun with rung 1's unused places as pilot orders ({stale} runs)")
        if len(runs) < search_seeds:
            have = {int(p.stem.rpartition("seed")[2]) for p in paths}
            absent = ", ".join(str(s) for s in range(search_seeds) if s not in have)
            missing.append(f"{fraction:.0%}: search at S/T {f:.0%}, seed(s) {absent} (the row above has {len(runs)})")
        regrets = [regret(k) for k in picks]
        if any(x is None for x in regrets):
            missing.append(f"{fraction:.0%}: oracle of a search pick at S/T {f:.0%}")
            continue
        values = [x.value for x in regrets]
        mean, se_seeds = mean_and_stderr(values)
        # The seeds share the test blocks: the mean regret also carries their sampling error, the paired
        # error of the seeds' mean pick over the blocks (not 0 when every seed picks alike).
        picked = [seed0[k]["per_block"] for k in picks]
        blocks = paired([statistics.fmean(v) for v in zip(*picked)], seed0[best]["per_block"])
        se = math.sqrt((se_seeds or 0.0) ** 2 + (blocks.stderr or 0.0) ** 2)
        spread = "seeds and blocks" if len(values) > 1 else "blocks"
        hits = sum(near_best(k) for k in picks)
        low, high = wilson(hits, len(runs))
        bound = mean + 1.645 * (se or 0.0)
        taus = []
        for r in runs:
            for rung, vals in sorted(r["rung_values"].items(), key=lambda kv: int(kv[0])):
                t = rung_tau(vals, {k: seed0[k]["kld"] for k in vals if k in seed0})
                taus.append((int(rung), t))
        tau_text = "; ".join(
            f"rung {rung}: {statistics.fmean([t['tau'] for rr, t in taus if rr == rung and t['tau'] is not None]):.2f}"
            for rung in sorted({rr for rr, t in taus if t["tau"] is not None})
        )
        table.append([f"search, S/T {f:.0%}", str(len(runs)), f"{mean:+.4f} ± {se or 0:.4f} ({spread})", f"{bound:+.4f}", f"{hits}/{len(runs)} [{low:.2f}, {high:.2f}]",
                      f"{statistics.fmean(r['search_tokens'] for r in runs):,.0f}", tau_text or "-"])  # fmt: skip
    lines_ties = tie_rules(folder, candidates, seed0, best, regret, near_best)
    by_pruned = min(candidates, key=lambda k: candidates[k]["kld"])
    closest = sorted(candidates.values(), key=lambda c: c["closeness_rank"])[:5]
    by_mo = min(closest, key=lambda c: c["kld"])["key"]
    for name, key in (("pruned scoring, whole set", by_pruned), ("Model-Optimizer-style, top 5 closest", by_mo)):
        r = regret(key)
        if r is None:
            missing.append(f"{fraction:.0%}: oracle of the {name} pick {key}")
            continue
        table.append([f"{name} ({key})", "1 (no seed)", f"{r.value:+.4f} ± {r.stderr:.4f} (blocks)", f"{r.value + 1.645 * r.stderr:+.4f}",
                      "yes" if near_best(key) else "no", "0", "-"])  # fmt: skip
    for name, label in (("depth", "depth-only"), ("uniform", "uniform width")):
        path = folder / f"{name}.json"
        if not path.is_file():
            missing.append(f"{fraction:.0%}: {label}")
            continue
        result = json.loads(path.read_text())
        inside = candidates.get(result.get("in_space", ""))
        result = seed0.get(inside["key"]) if inside else result
        if result is None:
            missing.append(f"{fraction:.0%}: oracle of the {label} pick {inside['key']}")
            continue
        r = paired(result["per_block"], seed0[best]["per_block"])
        where = "in the space" if inside else "outside the space"
        table.append([f"{label} ({key_of(result['architecture'])}, {where})", "1 (no seed)", f"{r.value:+.4f} ± {r.stderr:.4f} (blocks)",
                      f"{r.value + 1.645 * r.stderr:+.4f}", "yes" if inside and near_best(inside["key"]) else "no" if inside else "-", "0", "-"])  # fmt: skip
    if table:
        lines += [
            "Selection regret: the pick's final KL minus the oracle's best, paired over the test blocks (search: mean over "
            "its seeds, each its own data order, ± the SE over seeds and the paired SE over the test blocks they share, "
            "combined; one-sided 95% upper bound). Hits: picks within noise of the best, with a 95% "
            "Wilson interval. Tau: mean over seeds between each rung's values and the final ranking, over the candidates it had.",
            "",
            *markdown_table(
                ["strategy", "seeds", "selection regret", "95% upper bound", "picks the best (within noise)", "search tokens", "Kendall tau per rung"], table
            ),
            "",
            *[f"- {n}" for n in notes],
            *([""] if notes else []),
        ]
    lines += lines_ties
    cost_rows = []
    for f in FRACTIONS:
        for path in sorted((folder / "cost").glob(f"st{round(f * 100)}-seed*.json")) if (folder / "cost").is_dir() else []:
            r = json.loads(path.read_text())
            key = key_of(r["architecture"])
            # Paired with the oracle's runs on the same seed (the same data order) where all three have one.
            ref = r["seed"] if all(r["seed"] in oracle.get(k, {}) for k in (best, key, by_pruned)) else 0
            on = lambda k, ref=ref: oracle[k][ref]["per_block"]
            total = paired(r["per_block"], on(best))
            lost = paired(r["per_block"], on(key)) if ref in oracle.get(key, {}) else None
            search = folder / "search" / path.name
            now = shipped_pick(json.loads(search.read_text()), candidates) if search.is_file() else key
            label = f"search, S/T {f:.0%}, seed {r['seed']} ({key}" + (f"; the earlier tie rule's pick, the shipped one picks {now})" if now != key else ")")
            label += f", against the oracle's seed-{ref} runs"
            versus = paired(r["per_block"], on(by_pruned)) if ref in oracle.get(by_pruned, {}) else None
            verdict = "" if versus is None else " (tie)" if abs(versus.value) <= versus.stderr else " (better)" if versus.value < 0 else " (worse)"
            cost_rows.append([label, f"{r['search_tokens']:,} + {r['tokens']:,}", f"{r['kld']:.4f} ± {r['kld_stderr']:.4f}",
                              f"{total.value:+.4f} ± {total.stderr:.4f}", f"{lost.value:+.4f} ± {lost.stderr:.4f}" if lost else "-",
                              f"{versus.value:+.4f} ± {versus.stderr:.4f}{verdict}" if versus else "-"])  # fmt: skip
    if cost_rows and by_pruned in seed0:
        r = regret(by_pruned)
        cost_rows.append([f"pruned scoring, whole set ({by_pruned})", f"0 + {seed0[best]['tokens']:,}", f"{seed0[by_pruned]['kld']:.4f} ± {seed0[by_pruned]['kld_stderr']:.4f}",
                          f"{r.value:+.4f} ± {r.stderr:.4f}", "0 (it is its pick on T)", "0"])  # fmt: skip
        lines += [
            "Token-cost regret: the strategy's final model at equal total training tokens T (the search spends S on its rungs; "
            "its winner is distilled on T - S, continuing from its rung state as `distill` does) minus the oracle's best on T, "
            "paired over the test blocks; minus the same candidate distilled on T from its slice (what the search's tokens cost it); "
            "and minus pruned scoring's final model, paired over the blocks (a tie: within one standard error). Each search row "
            "is one seed, paired with the oracle's runs on that seed (the same data order) where all three have one; the "
            "pruned-scoring row is seed 0. The seed-to-seed spread is not in these errors.",
            "",
            *markdown_table(
                ["strategy", "tokens (search + final)", "final KL", "minus the oracle's best", "minus its pick on T", "minus pruned scoring (paired)"],
                cost_rows,
            ),
            "",
        ]
    else:
        missing.append(f"{fraction:.0%}: the token-cost regret (the search winner distilled on T - S from its rung state)")
    return lines, missing


def write(args) -> None:
    run = Run()
    body, missing = [], []
    for fraction in args.budgets:
        lines, gaps = report_budget(PARTS_DIR, fraction, args.search_seeds)
        body += lines
        missing += gaps
    missing.append("the same protocol on a GPU at a T a hundred times larger: this script runs on the CPU")
    body += ["## Not measured yet", "", *[f"- {m}" for m in missing], ""]
    details = [f"T = {args.tokens:,} tokens per oracle distillation; search S/T of {', '.join(f'{f:.0%}' for f in FRACTIONS)}, {args.search_seeds} seeds each"]
    run.write_report(args.out, "Oracle benchmark: every feasible candidate distilled, and how well each strategy picks", details, body)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.report_only:
        global KEEP_PARTS
        args.work.mkdir(parents=True, exist_ok=True)
        KEEP_PARTS = parts_match(args)
        if KEEP_PARTS:
            restore_parts(args.work)
        bench = Oracle(args, args.work)
        for fraction in args.budgets:
            run_budget(bench, fraction, args.parts)
    write(args)


if __name__ == "__main__":
    main()
