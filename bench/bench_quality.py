"""Quality at equal retraining cost: the NAS winner against what a user would do otherwise.

For each budget (a fraction of SmolLM2-135M's parameters) six students are built from the
real teacher and given the same retraining (logit KD on the same cached teacher top-k, the
same WikiText-2 tokens, steps, learning rate and seed):

  NAS winner           - `run_search` over bench/quality-space.yaml: every candidate is
                         pruned, scored, briefly retrained, scored again; best after retraining
  depth-only (BI)      - full width, the layer count closest to the budget, kept by Block Importance
  uniform width        - one ratio r on hidden size, FFN and query heads per KV group, all layers
  Model-Optimizer-style- the k candidates closest to the budget, scored WITHOUT retraining
                         (the scores the search recorded before retraining): best of those
  random rankings      - the NAS winner's architecture sliced along random importance
  random init          - the NAS winner's architecture, freshly initialised

and, for equal total compute, the strongest of the first three baselines (by perplexity)
once more, retrained on the common tokens plus as many as the search spent retraining
its candidates.

Every student is then measured on WikiText-2 test perplexity and lm-eval (arc_easy, piqa,
winogrande, lambada_openai; first --limit documents of each), like the teacher. Results
per student are kept in --work, so an interrupted run resumes where it stopped. Writes
reports/benchmarks/quality.md (+ .json). Run from the repository root:

    .venv/bin/python bench/bench_quality.py [--budgets 0.6 0.8] [--limit 200]
        [--retrain-tokens 16384] [--search-retrain-tokens 4096] [--work runs/bench-quality]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from common import REPO, REPORTS, Run, markdown_table
from minitron_nas.architecture import Architecture, ParamCounter, student_config
from minitron_nas.data import token_blocks
from minitron_nas.distill import RetrainSettings, TeacherLogitCache, retrain
from minitron_nas.pipeline import RankSettings, rank
from minitron_nas.pruning import prune
from minitron_nas.ranking import Rankings
from minitron_nas.scoring import lm_eval_scores, lm_loss
from minitron_nas.search import run_search, trials_table
from minitron_nas.space import enumerate_candidates, load_space
from minitron_nas.teachers import load_teacher

TEACHER = "smollm2-135m"
SPACE = REPO / "bench" / "quality-space.yaml"
TASKS = ("arc_easy", "piqa", "winogrande", "lambada_openai")
# (task, metric) shown per task: length-normalised accuracy where lm-eval defines it
SHOWN = (("arc_easy", "acc_norm"), ("piqa", "acc_norm"), ("winogrande", "acc"), ("lambada_openai", "acc"))
CONTENDERS = {
    "nas": "NAS winner (search with retraining)",
    "depth": "Depth-only pruning (Block Importance)",
    "uniform": "Uniform width pruning",
    "mo": "Model-Optimizer-style (top-k closest, scored without retraining)",
    "random_rankings": "NAS architecture, random rankings",
    "random_init": "NAS architecture, random init",
    "matched": "Strongest baseline, retrained on the common tokens plus those the search spent",
}
BASELINES = ("depth", "uniform", "mo")  # what a user would do without the search


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.8], help="fractions of the teacher's parameters")
    p.add_argument("--data-dir", default="../shared/data", help="benchmark data folder (default: %(default)s)")
    p.add_argument("--rank-samples", type=int, default=64, help="calibration blocks of 256 tokens (default: %(default)s)")
    p.add_argument("--search-retrain-tokens", type=int, default=4096, help="per search candidate (default: %(default)s)")
    p.add_argument("--retrain-tokens", type=int, default=16384, help="per contender after pruning (default: %(default)s)")
    p.add_argument("--lr", type=float, default=3e-4, help="retraining learning rate for every contender (default: %(default)s)")
    p.add_argument("--mo-top-k", type=int, default=5, help="candidates closest to the budget for the Model-Optimizer-style pick")
    p.add_argument("--limit", type=int, default=200, help="lm-eval documents per task (default: %(default)s)")
    p.add_argument("--ppl-blocks", type=int, default=32, help="WikiText-2 test blocks of 512 tokens (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "bench-quality", help="resumable work folder")
    p.add_argument("--out", type=Path, default=REPORTS / "quality.md", help="markdown report (a .json is written beside it)")
    args = p.parse_args(argv)
    for name in ("rank_samples", "search_retrain_tokens", "retrain_tokens", "mo_top_k", "limit", "ppl_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not all(0 < b < 1 for b in args.budgets):
        p.error("--budgets are fractions of the teacher's parameters, between 0 and 1 (e.g. 0.6 0.8)")
    for name in ("wikitext2/valid.txt", "wikitext2/test.txt"):
        if not (Path(args.data_dir) / name).is_file():
            p.error(f"--data-dir '{args.data_dir}' has no {name}: point it at the benchmark data folder")
    return args


def settings_key(args) -> dict:
    """What the stored results depend on; a work folder made with other settings is refused."""
    keys = ("data_dir", "rank_samples", "search_retrain_tokens", "retrain_tokens", "lr", "mo_top_k", "limit", "ppl_blocks", "seed")
    return {k: getattr(args, k) for k in keys} | {"space_sha256": hashlib.sha256(SPACE.read_bytes()).hexdigest()[:16]}


def open_work(args) -> Path:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    stamp, key = work / "settings.json", settings_key(args)
    if stamp.is_file() and json.loads(stamp.read_text()) != key:
        sys.exit(f"error: '{work}' holds results made with other settings: give another --work or delete that folder")
    stamp.write_text(json.dumps(key, indent=2))
    return work


# --------------------------------------------------------------------------- contenders


def depth_only(counter: ParamCounter, teacher: Architecture, target: int) -> Architecture:
    """Full width; the layer count whose total is closest to the target."""
    options = [replace(teacher, num_hidden_layers=n) for n in range(1, teacher.num_hidden_layers + 1)]
    return min(options, key=lambda a: abs(counter.count(a).total - target))


def uniform_width(counter: ParamCounter, teacher: Architecture, target: int) -> Architecture:
    """One ratio r on every width axis: hidden, FFN and query heads per KV group (groups kept).

    Hidden sizes are rounded to a multiple of 8 that the head count divides (transformers
    refuses others), FFN to a multiple of 8; the ratio whose total is closest wins.
    """
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


def random_rankings(rankings: Rankings, seed: int) -> Rankings:
    g = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.rand(t.shape, generator=g)  # noqa: E731
    return Rankings(
        heads=rand(rankings.heads),
        neurons=rand(rankings.neurons),
        channels=rand(rankings.channels),
        block_importance=rand(rankings.block_importance),
        meta={**rankings.meta, "random": seed},
    )


def random_init(teacher_model, arch: Architecture, seed: int):
    torch.manual_seed(seed)
    model = type(teacher_model)(student_config(teacher_model.config, arch))
    model.tie_weights()
    return model.eval()


def search_budget(space, teacher, rankings_dir: Path, folder: Path, k: int) -> tuple[Architecture, Architecture, dict]:
    """Run (or resume) the NAS for one budget: (winner, Model-Optimizer-style pick, cost)."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "rankings").exists():
        shutil.copytree(rankings_dir, folder / "rankings")
    study = run_search(space, folder, resume=(folder / "study.db").is_file(), teacher=teacher)
    base = Architecture.from_config(teacher.model.config)
    best = json.loads((folder / "best_arch.json").read_text())
    table = trials_table(study)
    done = table[(table.state.isin(["COMPLETE", "PRUNED"])) & table.score_before.notna()]
    feasible, _ = enumerate_candidates(space, teacher.model.config)  # closest to the budget first
    closest = [c.arch.to_dict() for c in feasible[:k]]
    scored = []
    for t in study.get_trials(deepcopy=False):
        arch = t.user_attrs.get("architecture")
        if arch in closest and t.user_attrs.get("score_before") is not None:
            scored.append((t.user_attrs["score_before"], closest.index(arch), arch))
    if len(scored) < len(closest):
        raise SystemExit(f"error: the search in '{folder}' lacks pre-retraining scores for the {k} closest candidates")
    mo = min(scored)[2]
    evaluated = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("score_before") is not None]
    tokens_per_step = space.retrain.batch_size * space.retrain.seq_len
    cost = {
        "candidates": len(feasible),
        "trials_scored": int(len(done)),
        "trials_complete": int((table.state == "COMPLETE").sum()),
        "trials_pruned": int((table.state == "PRUNED").sum()),
        "retrain_tokens_per_trial": space.retrain.steps * tokens_per_step,
        # a trial stopped early by the pruner ran up to its last reported step
        "retrain_tokens_spent": tokens_per_step * sum(
            max(len(t.user_attrs.get("retrain_curve") or []), max(t.intermediate_values, default=0)) for t in evaluated
        ),
        # from the study itself, so a rerun over a finished search reports the same
        "seconds": (max(t.datetime_complete for t in evaluated) - min(t.datetime_start for t in evaluated)).total_seconds(),
        "kendall_tau_before_after": best.get("kendall_tau_before_after"),
    }
    return Architecture.from_dict(best["architecture"], base), Architecture.from_dict(mo, base), cost


# --------------------------------------------------------------------------- measurements


@dataclass
class Evaluation:
    wikitext_ppl: float
    tasks: dict

    @property
    def shown(self) -> list[float]:
        return [self.tasks[task][metric] for task, metric in SHOWN]


def evaluate(model, tokenizer, test_blocks, args) -> Evaluation:
    ppl = math.exp(lm_loss(model, test_blocks, batch_size=4))
    tasks = lm_eval_scores(model, tokenizer, list(TASKS), args.data_dir, limit=args.limit, batch_size=16)
    return Evaluation(ppl, tasks)


def retrained(student, arch, counter, train, cache, settings, tokenizer, test_blocks, args) -> dict:
    """Perplexity of the pruned student, then the common retraining, then every metric."""
    ppl_before = math.exp(lm_loss(student, test_blocks, batch_size=4))
    result = retrain(student, train, cache, settings)
    after = evaluate(student, tokenizer, test_blocks, args)
    return {
        "architecture": arch.to_dict(),
        "parameters": counter.count(arch).total,
        "wikitext_ppl_before": ppl_before,
        **asdict(after),
        "retrain_tokens": result.tokens_seen,
        "retrain_seconds": result.seconds,
        "final_train_loss": result.curve[-1][1],
    }


def cached(path: Path, compute) -> dict:
    """Results are written once per student, so a rerun skips what is done."""
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)
    return value


def arch_text(a: dict) -> str:
    return (f"{a['hidden_size']} / {a['intermediate_size']} / {a['num_attention_heads']}:{a['num_key_value_heads']} / "
            f"{a['num_hidden_layers']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Run()
    work = open_work(args)
    data_dir = Path(args.data_dir)
    train_text, test_text = str(data_dir / "wikitext2/valid.txt"), str(data_dir / "wikitext2/test.txt")

    teacher = load_teacher(TEACHER)
    tok, base = teacher.tokenizer, Architecture.from_config(teacher.model.config)
    counter = ParamCounter(teacher.model.config)
    teacher_total = counter.count(base).total

    rankings_dir = work / "rankings"
    if (rankings_dir / "rankings.json").is_file():
        rankings = Rankings.load(rankings_dir, teacher.fingerprint)
    else:
        rankings = rank(teacher, RankSettings(data=train_text, samples=args.rank_samples, seq_len=256), rankings_dir)

    # The same retraining for every contender: same blocks, same cached teacher top-k, same settings.
    steps = max(1, args.retrain_tokens // (4 * 256))
    settings = RetrainSettings(
        steps=steps, batch_size=4, lr=args.lr, warmup_steps=max(1, steps // 10), top_k=64, eval_every=0, seed=args.seed
    )
    train = token_blocks(train_text, tok, 256, settings.steps * settings.batch_size, "train")
    cache = TeacherLogitCache.load_or_build(
        teacher.model, train, settings.top_k, settings.temperature, settings.batch_size, work / "teacher_logits",
        {"teacher_fingerprint": teacher.fingerprint},
    )
    test_blocks = token_blocks(test_text, tok, 512, args.ppl_blocks, "all")

    print("teacher ...", flush=True)
    teacher_row = cached(work / "teacher.json", lambda: asdict(evaluate(teacher.model, tok, test_blocks, args)))

    template = load_space(SPACE)
    budgets = []
    for fraction in args.budgets:
        target = round(fraction * teacher_total)
        space = replace(
            template,
            budget=replace(template.budget, parameters=target),
            ranking=replace(template.ranking, data=train_text, samples=args.rank_samples),
            retrain=replace(template.retrain, tokens=args.search_retrain_tokens, data=train_text),
            seed=args.seed,
        )
        folder = work / f"budget-{round(fraction * 100)}"
        print(f"search at {fraction:.0%} ({target:,} parameters) ...", flush=True)
        nas, mo, search_cost = search_budget(space, teacher, rankings_dir, folder / "search", args.mo_top_k)
        archs = {
            "nas": (nas, "rankings"),
            "depth": (depth_only(counter, base, target), "rankings"),
            "uniform": (uniform_width(counter, base, target), "rankings"),
            "mo": (mo, "rankings"),
            "random_rankings": (nas, "random_rankings"),
            "random_init": (nas, "random_init"),
        }
        rows = {}
        for key, (arch, how) in archs.items():
            same = next((k for k, (a, h) in archs.items() if (a, h) == (arch, how) and k in rows), None)
            if same is not None:  # e.g. the Model-Optimizer-style pick is the NAS winner: same student, same result
                rows[key] = {**rows[same], "same_as": same}
                continue

            def measure(arch=arch, how=how) -> dict:
                print(f"  {key}: {arch_text(arch.to_dict())} ...", flush=True)
                if how == "random_init":
                    student = random_init(teacher.model, arch, args.seed)
                else:
                    source = rankings if how == "rankings" else random_rankings(rankings, args.seed)
                    student = prune(teacher.model, source, arch)
                return retrained(student, arch, counter, train, cache, settings, tok, test_blocks, args)

            rows[key] = cached(folder / f"{key}.json", measure)

        # Equal total compute: the strongest baseline also gets the tokens the search spent retraining candidates.
        baseline = min((k for k in BASELINES if rows[k].get("same_as") != "nas"), key=lambda k: rows[k]["wikitext_ppl"])

        def matched() -> dict:
            steps = settings.steps + math.ceil(search_cost["retrain_tokens_spent"] / (settings.batch_size * 256))
            longer = replace(settings, steps=steps, warmup_steps=max(1, steps // 10))
            blocks = token_blocks(train_text, tok, 256, steps * longer.batch_size, "train")
            longer_cache = TeacherLogitCache.load_or_build(
                teacher.model, blocks, longer.top_k, longer.temperature, longer.batch_size, folder / "teacher_logits-matched",
                {"teacher_fingerprint": teacher.fingerprint},
            )
            arch = Architecture.from_dict(rows[baseline]["architecture"], base)
            print(f"  matched ({baseline}, {steps} steps): {arch_text(arch.to_dict())} ...", flush=True)
            student = prune(teacher.model, rankings, arch)
            return {**retrained(student, arch, counter, blocks, longer_cache, longer, tok, test_blocks, args), "baseline": baseline}

        rows["matched"] = cached(folder / "matched.json", matched)
        budgets.append({"fraction": fraction, "target": target, "search": search_cost, "rows": rows})

    write(bench, args, teacher_total, base, teacher_row, budgets, settings)
    return 0


# --------------------------------------------------------------------------- report


def fmt_acc(x: float) -> str:
    return f"{x:.3f}"


def write(bench: Run, args, teacher_total: int, base: Architecture, teacher_row: dict, budgets: list, settings) -> None:
    teacher_eval = Evaluation(teacher_row["wikitext_ppl"], teacher_row["tasks"])
    header = ["Student", "hidden / FFN / heads:KV / layers", "Params", "Wiki-2 ppl, pruned", "Wiki-2 ppl, retrained",
              *(f"{t} {m}" for t, m in SHOWN), "mean acc"]
    body = [
        f"Every student gets the same retraining after pruning: {settings.steps} steps x {settings.batch_size} x 256 = "
        f"{settings.steps * settings.batch_size * 256:,} tokens of WikiText-2 (valid file, train paragraphs), logit KD "
        f"on the teacher's cached top-{settings.top_k} (T = 1), AdamW lr {args.lr} with warm-up and cosine decay, seed "
        f"{args.seed}. Perplexity: WikiText-2 test file, first {args.ppl_blocks} blocks of 512 tokens (token-level, "
        f"SmolLM2 tokenizer). Accuracies: lm-eval 0-shot on the first {args.limit} documents of each task "
        f"(acc_norm for arc_easy and piqa, acc for winogrande and lambada_openai); one standard error at "
        f"p = 0.5 is {0.5 / math.sqrt(args.limit):.3f}, so smaller differences are noise.",
        "",
    ]
    summary = {"teacher": teacher_row, "budgets": budgets, "settings": settings_key(args)}
    for b in budgets:
        rows = b["rows"]
        table = [[
            "Teacher (SmolLM2-135M-Instruct)", arch_text(base.to_dict()), f"{teacher_total / 1e6:.1f}M (100%)", "",
            f"{teacher_eval.wikitext_ppl:.2f}", *map(fmt_acc, teacher_eval.shown), fmt_acc(sum(teacher_eval.shown) / 4),
        ]]
        for key in CONTENDERS:
            r = rows[key]
            ev = Evaluation(r["wikitext_ppl"], r["tasks"])
            name = f"**{label_of(key, r)}**" if key == "nas" else label_of(key, r)
            if r.get("same_as"):
                name += f" (= {r['same_as']})"
            table.append([
                name, arch_text(r["architecture"]), f"{r['parameters'] / 1e6:.1f}M ({r['parameters'] / teacher_total:.0%})",
                f"{r['wikitext_ppl_before']:.1f}", f"{ev.wikitext_ppl:.2f}", *map(fmt_acc, ev.shown),
                fmt_acc(sum(ev.shown) / 4),
            ])
        s = b["search"]
        body += [
            f"## {b['fraction']:.0%} of the teacher ({b['target'] / 1e6:.1f}M parameters)",
            "",
            *markdown_table(header, table),
            "",
            f"Search cost (NAS only, before the common retraining): {s['trials_scored']} of {s['candidates']} feasible "
            f"candidates pruned and scored, {s['trials_complete']} retrained to the end on "
            f"{s['retrain_tokens_per_trial']:,} tokens each ({s['trials_pruned']} stopped early by successive halving), "
            f"{s['retrain_tokens_spent']:,} retraining tokens in all ({s['retrain_tokens_spent'] / settings.steps / settings.batch_size / 256:.1f}x "
            f"the common retraining); {s['seconds'] / 60:.1f} min from the first trial's start to the last trial's end; "
            f"Kendall tau between candidate rankings before and after retraining: "
            f"{'n/a' if s['kendall_tau_before_after'] is None else format(s['kendall_tau_before_after'], '.2f')}. "
            f"The Model-Optimizer-style pick reuses the search's pre-retraining scores of the {args.mo_top_k} candidates "
            f"closest to the budget (held-out WikiText-2 loss), so it costs {args.mo_top_k} scorings and no training.",
            "",
            *where_nas_loses(rows, args.limit),
            "",
        ]
    body += [
        "Architecture columns: hidden size / FFN size / query heads:KV groups / layers. \"ppl, pruned\" is before "
        "any retraining. Every figure can be regenerated with the command above; per-student results are kept "
        f"in the work folder (`{shown_path(args.work)}`, written {computed_between(args.work)}; a rerun over it only "
        f"rewrites this report) and in `{args.out.with_suffix('.json').name}` beside this report.",
    ]
    bench.write_report(
        args.out,
        "Benchmark: quality at equal retraining cost, NAS winner vs alternatives",
        [f"- Teacher: {TEACHER} ({teacher_total:,} parameters); search space: `bench/quality-space.yaml`"],
        body,
    )
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2))


def label_of(key: str, row: dict) -> str:
    if key == "matched":
        return f"{CONTENDERS[row['baseline']]}, retrained on {row['retrain_tokens']:,} tokens (common + the search's)"
    return CONTENDERS[key]


def shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def computed_between(work: Path) -> str:
    import datetime as dt

    stamps = sorted(p.stat().st_mtime for p in work.glob("**/*.json"))
    first, last = (dt.datetime.fromtimestamp(t).astimezone().isoformat(timespec="minutes") for t in (stamps[0], stamps[-1]))
    return f"from {first} to {last}"


def where_nas_loses(rows: dict, limit: int) -> list[str]:
    """Plain sentences on every metric where another student beats the NAS winner."""
    nas = Evaluation(rows["nas"]["wikitext_ppl"], rows["nas"]["tasks"])
    se = 0.5 / math.sqrt(limit)
    lines = []
    for key in CONTENDERS:
        if key == "nas" or rows[key].get("same_as") == "nas":
            continue
        label = label_of(key, rows[key])
        other = Evaluation(rows[key]["wikitext_ppl"], rows[key]["tasks"])
        if other.wikitext_ppl < nas.wikitext_ppl:
            lines.append(f"- {label} has lower perplexity ({other.wikitext_ppl:.2f} vs {nas.wikitext_ppl:.2f}).")
        for (task, metric), mine, theirs in zip(SHOWN, nas.shown, other.shown):
            if theirs > mine:
                note = "within one standard error" if theirs - mine <= se else "more than one standard error"
                lines.append(f"- {label} is ahead on {task} {metric} ({theirs:.3f} vs {mine:.3f}, {note}).")
    if not lines:
        return ["The NAS winner is best or tied on every metric at this budget."]
    return ["Where the NAS winner does not win:", "", *lines]


if __name__ == "__main__":
    sys.exit(main())
