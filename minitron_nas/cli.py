"""`minitron-nas`: a thin command line over the Python API (see README for the stages)."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import MinitronError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Minitron pruning and architecture search.")
console = Console(stderr=True)


def _tables() -> Console:
    """Stdout console; wide when piped so tables are not truncated."""
    return Console() if sys.stdout.isatty() else Console(width=160)

MODEL_HELP = "Hugging Face id or folder, a .gguf file, or 'smollm2-135m' (embedded)"
DATA_HELP = "a .txt/.jsonl/.parquet file or folder, 'shakespeare' (embedded), or a local datasets name"
DEVICE_HELP = "auto (this process's GPU, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32"
SPACE_DEVICE_HELP = DEVICE_HELP + "; default: the space's device section"
SPACE_DTYPE_HELP = DTYPE_HELP + "; default: the space's device section"


def _with_device(spec, device: str | None, dtype: str | None):
    """The space with --device / --dtype, where given, replacing its `device:` section."""
    from dataclasses import replace

    from .space import DeviceSpec

    return replace(spec, device=DeviceSpec(device or spec.device.device, dtype or spec.device.dtype))


def _quiet_libraries() -> None:
    """Our own progress bars stay; transformers' weight-loading bars are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _one_line_errors(command):
    """Bad input -> `error: ...` on one line and exit status 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            _quiet_libraries()
            return command(*args, **kwargs)
        except MinitronError as err:
            console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_one_line_errors
def rank(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    data: str = typer.Option("shakespeare", help=DATA_HELP),
    out: Path = typer.Option(..., help="folder for rankings.safetensors + rankings.json"),
    samples: int = typer.Option(64, help="calibration blocks"),
    seq_len: int = typer.Option(256, help="tokens per block"),
    batch_size: int = typer.Option(8),
    batch_agg: str = typer.Option("l2", help="reduction over the batch: mean, l2, var"),
    seq_agg: str = typer.Option("mean", help="reduction over the sequence: mean, l2, var"),
    split: str = typer.Option("train", help="which part of the data to calibrate on: train, heldout, all"),
    layer_loss: bool = typer.Option(False, help="also score layers by held-out loss with each one dropped"),
    heldout_samples: int = typer.Option(16, help="held-out blocks for --layer-loss"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Score every head, neuron, channel and layer of the teacher on calibration text."""
    from .files import check_writable
    from .pipeline import RankSettings, rank as rank_stage
    from .ranking import Aggregation
    from .teachers import load_teacher

    settings = RankSettings(data, samples, seq_len, batch_size, Aggregation(batch_agg, seq_agg), layer_loss, heldout_samples, split)
    check_writable(out, overwrite)
    teacher = load_teacher(model, device, dtype)
    rankings = rank_stage(teacher, settings, out, overwrite)
    bi = rankings.block_importance
    console.print(
        f"ranked {teacher.name} on {rankings.meta['samples']} x {rankings.meta['seq_len']} tokens "
        f"in {rankings.meta['seconds']} s; least important layers by BI: {bi.argsort()[:5].tolist()} -> {out}"
    )


@app.command()
@_one_line_errors
def prune(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    rankings: Path = typer.Option(..., help="folder written by `minitron-nas rank`"),
    arch: str = typer.Option(..., help="architecture JSON file or inline object (HF config names)"),
    out: Path = typer.Option(..., help="folder for the pruned model and tokenizer"),
    layer_criterion: str = typer.Option("block_importance", help="depth choice: block_importance, layer_loss, last"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Slice the teacher to an architecture; the result loads with plain transformers."""
    from .architecture import Architecture, ParamCounter, student_config, validate
    from .files import check_writable
    from .pipeline import prune_to
    from .ranking import Rankings
    from .teachers import load_config, load_teacher

    check_writable(out, overwrite)
    config = load_config(model)
    teacher_arch = Architecture.from_config(config)
    target = Architecture.load(arch, teacher_arch)
    validate(target, teacher_arch)
    student_config(config, target, list(target.layers or range(target.num_hidden_layers)))
    teacher = load_teacher(model, device, dtype)
    ranked = Rankings.load(rankings, teacher.fingerprint)
    prune_to(teacher, ranked, target, out, layer_criterion, overwrite)
    n = ParamCounter(config).count(target)
    console.print(f"pruned {teacher.name} to {n.total:,} parameters ({n.non_embedding:,} non-embedding) -> {out}")


@app.command()
@_one_line_errors
def count(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP + ", or a config.json (no weights needed)"),
    arch: str = typer.Option(None, help="architecture JSON file or inline object; default: the teacher's own"),
):
    """Exact parameter counts (total and non-embedding) of an architecture, without weights."""
    from .architecture import Architecture, ParamCounter, student_config, validate
    from .teachers import load_config

    config = load_config(model)
    teacher_arch = Architecture.from_config(config)
    target = Architecture.load(arch, teacher_arch) if arch else teacher_arch
    validate(target, teacher_arch)
    student_config(config, target)
    n = ParamCounter(config).count(target)
    print(json.dumps({"architecture": target.to_dict(), "total": n.total, "non_embedding": n.non_embedding}, indent=2))


@app.command()
@_one_line_errors
def loss(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    data: str = typer.Option("shakespeare", help=DATA_HELP),
    samples: int = typer.Option(32),
    seq_len: int = typer.Option(256),
    split: str = typer.Option("heldout", help="train, heldout or all"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Mean next-token loss (nats) of a model on text."""
    from .pipeline import heldout_loss
    from .teachers import load_teacher

    teacher = load_teacher(model, device, dtype)
    value = heldout_loss(teacher.model, teacher.tokenizer, data, samples, seq_len, split)
    print(json.dumps({"model": teacher.name, "data": data, "split": split, "loss": round(value, 4)}))


@app.command()
@_one_line_errors
def evaluate(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks: arc_easy, arc_challenge, piqa, winogrande, lambada_openai, boolq, wikitext"),
    data_dir: Path = typer.Option(..., help="folder of the upstream benchmark files (e.g. ../shared/data)"),
    limit: int = typer.Option(None, help="score only the first N documents of each task"),
    batch_size: int = typer.Option(8),
    num_fewshot: int = typer.Option(0),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """lm-evaluation-harness scores (its own prompts and metrics) on local files, offline, as JSON."""
    from .lm_eval_tasks import prepare_tasks
    from .scoring import lm_eval_scores
    from .teachers import load_teacher

    names = [p.name for p in prepare_tasks(tasks, data_dir)]  # bad names or files fail before the model loads
    teacher = load_teacher(model, device, dtype)
    scores = lm_eval_scores(teacher.model, teacher.tokenizer, names, data_dir, limit, batch_size, num_fewshot)
    print(json.dumps({"model": teacher.name, "limit": limit, "num_fewshot": num_fewshot, "scores": scores}, indent=1))


@app.command("enumerate")
@_one_line_errors
def enumerate_space(
    space: Path = typer.Argument(..., help="search space YAML"),
    show: int = typer.Option(10, help="how many of the closest candidates to print"),
):
    """Every architecture of a search space within its budget (exact counts; no weights needed)."""
    from .space import enumerate_candidates, load_space, require_feasible
    from .teachers import load_config

    spec = load_space(space)
    config = load_config(spec.teacher)
    feasible = require_feasible(spec, config)
    _, valid = enumerate_candidates(spec, config)
    table = Table(title=f"{len(feasible)} of {len(valid)} valid architectures meet the budget ({spec.budget.parameters:,} {spec.budget.count})")
    for column in ("hidden", "ffn", "heads", "kv groups", "layers", "total", "non-embedding", "memory GiB"):
        table.add_column(column, justify="right")
    for c in feasible[:show]:
        a = c.arch
        table.add_row(*map(str, (a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers)),
                      f"{c.total:,}", f"{c.non_embedding:,}", f"{c.memory_gb:.2f}")
    _tables().print(table)


@app.command()
@_one_line_errors
def search(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder (default: runs/<space name>)"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: sqlite in the run folder)"),
    n_trials: int = typer.Option(None, help="trials to run now (default: the space's trials, or the whole grid)"),
    resume: bool = typer.Option(False, help="continue the study already in the run folder or storage"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP + "; one worker per GPU: --device cuda:N"),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """Budget-constrained architecture search: prune, score, retrain by KD, score again."""
    from .search import best_trial, run_search
    from .space import load_space, require_feasible
    from .teachers import load_config, load_teacher

    spec = _with_device(load_space(space), device, dtype)
    require_feasible(spec, load_config(spec.teacher))  # an infeasible budget fails before the weights load
    teacher = load_teacher(spec.teacher, spec.device.device, spec.device.dtype)
    study = run_search(spec, _run_folder(space, out), storage, n_trials, resume, teacher=teacher)
    best = best_trial(study)
    if best is None:
        raise MinitronError(f"no trial finished in {out}: see trials.csv for the errors")
    console.print(f"best: {best.user_attrs['architecture']} score {best.values[0]:.4f} -> {_run_folder(space, out) / 'best_arch.json'}")


def _run_folder(space: Path, out: Path | None) -> Path:
    return out or Path("runs") / space.stem


@app.command()
@_one_line_errors
def run(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder (default: runs/<space name>)"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: sqlite in the run folder)"),
    n_trials: int = typer.Option(None, help="search trials (default: the space's trials, or the whole grid)"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """The whole recipe: rank -> search -> distill -> export -> report; a rerun resumes."""
    from .pipeline import run as run_pipeline
    from .space import load_space

    exported = run_pipeline(_with_device(load_space(space), device, dtype), _run_folder(space, out), storage, n_trials)
    console.print(f"exported model (loads with AutoModelForCausalLM.from_pretrained): {exported}")


@app.command()
@_one_line_errors
def distill(
    space: Path = typer.Argument(..., help="search space YAML (its distill section)"),
    out: Path = typer.Option(None, help="run folder holding best_arch.json and rankings/"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP + "; under accelerate launch: auto"),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """Fully distill the search's winner (checkpointed: a rerun resumes; several GPUs with accelerate launch)."""
    from .pipeline import distill_winner
    from .space import load_space
    from .teachers import load_teacher

    spec = _with_device(load_space(space), device, dtype)
    folder = _run_folder(space, out)
    if not (folder / "best_arch.json").is_file():
        raise MinitronError(f"no best_arch.json in '{folder}': run `minitron-nas search` first")
    summary = distill_winner(spec, folder, load_teacher(spec.teacher, spec.device.device, spec.device.dtype))
    console.print(f"held-out loss {summary['before']['heldout_loss']:.3f} -> {summary['after']['heldout_loss']:.3f} "
                  f"(teacher {summary['teacher']['heldout_loss']:.3f}) -> {folder / 'distill'}")


@app.command()
@_one_line_errors
def export(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder holding distill/model"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """Write RUN_DIR/export: the distilled winner, best_arch.json with provenance, a model card."""
    from .pipeline import export_stage
    from .space import load_space
    from .teachers import load_teacher

    spec = _with_device(load_space(space), device, dtype)
    folder = _run_folder(space, out)
    if not (folder / "distill" / "model").is_dir():
        raise MinitronError(f"no distilled model in '{folder}': run `minitron-nas distill` first")
    console.print(f"exported -> {export_stage(spec, folder, load_teacher(spec.teacher, spec.device.device, spec.device.dtype))}")


@app.command()
@_one_line_errors
def dashboard(
    run_dir: Path = typer.Argument(..., help="run folder of `minitron-nas search`"),
    storage: str = typer.Option(None, help="Optuna storage URL of the study (default: sqlite:///RUN_DIR/study.db)"),
):
    """Rebuild RUN_DIR/dashboard.html (interactive, offline) and RUN_DIR/report.md from the study."""
    from .report import build_dashboard, open_run_study, write_report

    study = open_run_study(run_dir, storage)
    page = build_dashboard(run_dir, storage, study=study)
    report = write_report(run_dir, storage, study=study)
    console.print(f"{len(study.trials)} trials -> {page} and {report}")


if __name__ == "__main__":
    app()
