"""`minitron-nas`: one typer command per recipe (see README for the stages).

Every command calls one function of the Python API (minitron_nas.recipes and the rooms below)
and only prints what it returns. Options that mirror a settings field take their default and
help from that field (`_from`), so each is declared once. Each command imports what it runs
inside its own body, so `--help` and argument errors answer without loading torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minitron_nas.cli.handling import console, one_line_errors
from minitron_nas.config.settings import DEFAULT_TEACHER, Aggregation, RankSettings, field_doc
from minitron_nas.config.space import DeviceSettings, ScoringSettings
from minitron_nas.errors import MinitronError
from minitron_nas.files import RunFolder, run_lock

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Minitron pruning and architecture search.")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", help="show lm-eval's own logs, warnings and progress bars")):
    """Minitron pruning and architecture search."""
    if verbose:
        from minitron_nas.evaluate.harness import set_lm_eval_verbose

        set_lm_eval_verbose(True)


def _tables() -> Console:
    """Stdout console; wide when piped so tables are not truncated."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _from(cls, name: str):
    """A typer option whose default and help are those of a settings field: one source for both."""
    return typer.Option(getattr(cls, name), help=field_doc(cls, name))


def _as_options(section: str, cls, **values):
    """`cls(**values)`; a refused value is named as the command's option (--samples), not the space key (ranking.samples)."""
    try:
        return cls(**values)
    except MinitronError as err:
        text = str(err)
        for name in values:
            text = text.replace(f"{section}.{name} is", f"--{name.replace('_', '-')} is")
        raise MinitronError(text) from None


def _space_option(cls, name: str, extra: str = ""):
    """A settings field as an option of a command that reads a space: unset keeps the space's value."""
    return typer.Option(None, help=f"{field_doc(cls, name)} Default: the space's {name} setting{extra}.")


MODEL_HELP = f"Hugging Face id or folder, a .gguf file, or '{DEFAULT_TEACHER}' (embedded)"
DATA_HELP = "a .txt/.jsonl/.parquet file or folder, 'shakespeare' (embedded), or a local datasets name"
SPACE_HELP = "search space YAML"
RUN_HELP = "run folder (default: runs/<space name>)"
FAMILY_LABELS = (  # the family-specific sizes enumerate shows where a candidate has them
    ("num_experts", "experts"),
    ("moe_intermediate_size", "expert ffn"),
    ("shared_expert_intermediate_size", "shared ffn"),
    ("mamba_num_heads", "mamba heads"),
    ("mamba_head_dim", "mamba dim"),
    ("num_mamba_layers", "mamba layers"),
    ("num_attention_layers", "attn layers"),
    ("num_mlp_layers", "mlp layers"),
)
# the search's own options, shared by `search` and `run`
STORAGE_OPTION = typer.Option(None, help="Optuna storage URL (default: sqlite in the run folder)")
N_TRIALS_OPTION = typer.Option(
    None,
    help="most search trials to run now (rung-0 work units count one each); a search it stops is unfinished (nothing exported yet), "
    "and the same command goes on with it",
)


@app.command()
@one_line_errors
def rank(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    data: str = _from(RankSettings, "data"),
    out: Path = typer.Option(..., help="folder for rankings.safetensors + rankings.json"),
    samples: int = _from(RankSettings, "samples"),
    seq_len: int = _from(RankSettings, "seq_len"),
    batch_size: int = _from(RankSettings, "batch_size"),
    batch_agg: str = _from(Aggregation, "batch"),
    seq_agg: str = _from(Aggregation, "seq"),
    split: str = _from(RankSettings, "split"),
    layer_loss: bool = _from(RankSettings, "layer_loss"),
    heldout_samples: int = _from(RankSettings, "heldout_samples"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    device: str = _from(DeviceSettings, "device"),
    dtype: str = _from(DeviceSettings, "dtype"),
):
    """Score every head, neuron, channel and layer of the teacher on calibration text."""
    from minitron_nas.recipes.prune import rank_model

    settings = _as_options(
        "ranking",
        RankSettings,
        data=data,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        aggregation=Aggregation(batch=batch_agg, seq=seq_agg),
        layer_loss=layer_loss,
        heldout_samples=heldout_samples,
        split=split,
    )
    teacher, rankings = rank_model(model, out, settings, overwrite, device, dtype)
    bi = rankings.block_importance
    console.print(
        f"ranked {teacher.name} on {rankings.meta['samples']} x {rankings.meta['seq_len']} tokens "
        f"in {rankings.meta['seconds']} s; least important layers by BI: {bi.argsort()[:5].tolist()} -> {out}"
    )


@app.command()
@one_line_errors
def prune(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    rankings: Path = typer.Option(..., help="folder written by `minitron-nas rank`"),
    arch: str = typer.Option(..., help="architecture JSON file or inline object (HF config names)"),
    out: Path = typer.Option(..., help="folder for the pruned model and tokenizer"),
    layer_criterion: str = typer.Option("block_importance", help="depth choice: block_importance, layer_loss, last"),
    norm_correction: bool = typer.Option(False, help="rescale norm gains for the kept hidden channels (see reports/benchmarks/norm_correction.md)"),
    expert_criterion: str = typer.Option("reap", help="MoE teachers: which experts stay, by reap (router-weighted saliency) or activation"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    device: str = _from(DeviceSettings, "device"),
    dtype: str = _from(DeviceSettings, "dtype"),
):
    """Slice the teacher to an architecture; the result loads with plain transformers."""
    from minitron_nas.recipes.prune import prune_model

    teacher, n = prune_model(model, rankings, arch, out, layer_criterion, norm_correction, overwrite, device, dtype, expert_criterion)
    active = f", {n.active:,} active" if n.active != n.total else ""
    console.print(f"pruned {teacher.name} to {n.total:,} parameters ({n.non_embedding:,} non-embedding{active}) -> {out}")


@app.command()
@one_line_errors
def count(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP + ", or a config.json (no weights needed)"),
    arch: str = typer.Option(None, help="architecture JSON file or inline object; default: the teacher's own"),
):
    """Exact parameter counts (total and non-embedding) of an architecture, without weights."""
    from minitron_nas.recipes.prune import count_parameters

    target, n = count_parameters(model, arch)
    moe = {"active": n.active} if target.num_experts is not None else {}
    print(json.dumps({"architecture": target.to_dict(), "total": n.total, "non_embedding": n.non_embedding, **moe}, indent=2))


@app.command()
@one_line_errors
def loss(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    data: str = typer.Option("shakespeare", help=DATA_HELP),
    samples: int = typer.Option(32),
    seq_len: int = typer.Option(256),
    split: str = typer.Option("heldout", help="train, heldout or all"),
    device: str = _from(DeviceSettings, "device"),
    dtype: str = _from(DeviceSettings, "dtype"),
):
    """Mean next-token loss (nats) of a model on text."""
    from minitron_nas.recipes.prune import model_loss

    teacher, value = model_loss(model, data, samples, seq_len, split, device, dtype)
    print(json.dumps({"model": teacher.name, "data": data, "split": split, "loss": round(value, 4)}))


def _per_task_option(value: str | None, what: str):
    """'5' -> 5; 'arc_easy=5,piqa=0' -> {'arc_easy': 5, 'piqa': 0}; None stays None."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return int(value)
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in value.split(",") if part.strip())}
    except ValueError:
        raise MinitronError(f"--{what} '{value}' is not a number or task=number list: give e.g. 5 or arc_easy=5,piqa=0") from None


@app.command()
@one_line_errors
def evaluate(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    tasks: str = typer.Option(..., help=field_doc(ScoringSettings, "tasks") + " Comma-separated."),
    data_dir: Path = typer.Option(None, help=field_doc(ScoringSettings, "data_dir")),
    include_path: list[Path] = typer.Option(None, help=field_doc(ScoringSettings, "include_path") + " Repeatable."),
    limit: str = typer.Option(None, help=field_doc(ScoringSettings, "limit") + " Here: N, or task=N,task=N."),
    batch_size: int = typer.Option(ScoringSettings.batch_size, help=field_doc(ScoringSettings, "batch_size")),
    num_fewshot: str = typer.Option(None, help=field_doc(ScoringSettings, "num_fewshot") + " Here: N, or task=N,task=N."),
    objective: str = typer.Option(None, help=field_doc(ScoringSettings, "objective") + " Here: task/metric."),
    verbose: bool = typer.Option(False, "--verbose", help="show lm-eval's own logs, warnings and progress bars"),
    device: str = _from(DeviceSettings, "device"),
    dtype: str = _from(DeviceSettings, "dtype"),
):
    """lm-evaluation-harness scores (its own prompts, metrics and standard errors) as JSON."""
    from minitron_nas.recipes.evaluate import evaluate_model

    limits, shots = _per_task_option(limit, "limit"), _per_task_option(num_fewshot, "num-fewshot")
    result = evaluate_model(model, tasks, data_dir, include_path, limits, batch_size, shots, objective, verbose or None, device, dtype)
    print(json.dumps(result, indent=1))


@app.command("enumerate")
@one_line_errors
def enumerate_space(
    space: Path = typer.Argument(..., help=SPACE_HELP),
    show: int = typer.Option(10, help="how many of the closest candidates to print"),
):
    """Every architecture of a search space within its budget (exact counts; no weights needed)."""
    from minitron_nas.recipes.search import feasible_candidates

    spec, feasible, valid = feasible_candidates(space)
    table = Table(title=f"{len(feasible)} of {valid} valid architectures meet the budget ({spec.budget.parameters:,} {spec.budget.count})")
    extra = [(name, label) for name, label in FAMILY_LABELS if any(getattr(c.arch, name) is not None for c in feasible[:show])]
    moe = any(c.active != c.total for c in feasible[:show])
    for column in (
        "hidden",
        "ffn",
        "heads",
        "kv groups",
        "layers",
        *(label for _, label in extra),
        "total",
        "non-embedding",
        *(["active"] if moe else []),
        "memory GiB",
    ):
        table.add_column(column, justify="right")
    for c in feasible[:show]:
        a = c.arch
        table.add_row(
            str(a.hidden_size),
            "-" if a.moe_intermediate_size is not None else str(a.intermediate_size),  # unused where experts have their own width
            *map(str, (a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers)),
            *(str(getattr(a, name)) for name, _ in extra),
            f"{c.total:,}",
            f"{c.non_embedding:,}",
            *([f"{c.active:,}"] if moe else []),
            f"{c.memory_gb:.2f}",
        )
    _tables().print(table)


@app.command()
@one_line_errors
def search(
    space: Path = typer.Argument(..., help=SPACE_HELP),
    out: Path = typer.Option(None, help=RUN_HELP),
    resume: bool = typer.Option(False, help="continue the study already in the run folder or storage"),
    storage: str = STORAGE_OPTION,
    n_trials: int = N_TRIALS_OPTION,
    device: str = _space_option(DeviceSettings, "device", "; one worker per GPU: --device cuda:N"),
    dtype: str = _space_option(DeviceSettings, "dtype"),
):
    """Budget-constrained architecture search: every candidate retrained by KD in rungs of growing tokens."""
    from minitron_nas.recipes.search import run_folder, search, with_device
    from minitron_nas.search.candidates import load_space
    from minitron_nas.search.study import heartbeat_seconds

    spec = with_device(load_space(space), device, dtype)
    heartbeat_seconds()  # bad settings are refused before the run folder (and its lock) is made
    folder = run_folder(space, out)
    with run_lock(folder, "search"):
        found = search(spec, folder, storage, n_trials, resume)
    if found is not None:
        error = "" if found.get("score_stderr") is None else f" ± {found['score_stderr']:.4f}"
        console.print(
            f"best: {found['key']} ({found['params_total']:,} parameters), {found['metric']} {found['score']:.4f}{error} -> {RunFolder(folder).best_arch}"
        )
    else:
        console.print(f"no candidate reached the last rung yet: run more trials with --resume ({folder / 'trials.csv'})")


@app.command()
@one_line_errors
def run(
    space: Path = typer.Argument(..., help=SPACE_HELP),
    out: Path = typer.Option(None, help=RUN_HELP),
    storage: str = STORAGE_OPTION,
    n_trials: int = N_TRIALS_OPTION,
    device: str = _space_option(DeviceSettings, "device"),
    dtype: str = _space_option(DeviceSettings, "dtype"),
):
    """The whole recipe: rank -> search -> distill -> export -> report; a rerun resumes."""
    from minitron_nas.recipes.run import run as run_recipe
    from minitron_nas.recipes.search import run_folder, with_device
    from minitron_nas.search.candidates import load_space

    spec, folder = with_device(load_space(space), device, dtype), run_folder(space, out)
    with run_lock(folder, "run"):
        exported = run_recipe(spec, folder, storage, n_trials)
    console.print(f"exported model (loads with AutoModelForCausalLM.from_pretrained): {exported}")


@app.command()
@one_line_errors
def distill(
    space: Path = typer.Argument(..., help="search space YAML (its distill section)"),
    out: Path = typer.Option(None, help="run folder holding best_arch.json and rankings/"),
    device: str = _space_option(DeviceSettings, "device", "; under accelerate launch: auto"),
    dtype: str = _space_option(DeviceSettings, "dtype"),
):
    """Fully distill the search's winner (checkpointed: a rerun resumes; several GPUs with accelerate launch)."""
    from contextlib import nullcontext

    from minitron_nas.model.devices import is_main_process
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.recipes.distill import distill_winner
    from minitron_nas.recipes.search import run_folder, with_device
    from minitron_nas.search.candidates import load_space

    spec = with_device(load_space(space), device, dtype)
    folder = run_folder(space, out)
    if not RunFolder(folder).best_arch.is_file():
        raise MinitronError(f"no best_arch.json in '{folder}': run `minitron-nas search` first")
    with run_lock(folder, "distill") if is_main_process() else nullcontext():  # under accelerate launch, the writing process holds it
        summary = distill_winner(spec, folder, load_teacher(spec.teacher, spec.device.device, spec.device.dtype))
    console.print(
        f"held-out loss {summary['before']['heldout_loss']:.3f} -> {summary['after']['heldout_loss']:.3f} "
        f"(teacher {summary['teacher']['heldout_loss']:.3f}) -> {RunFolder(folder).distill}"
    )


@app.command()
@one_line_errors
def export(
    space: Path = typer.Argument(..., help=SPACE_HELP),
    out: Path = typer.Option(None, help="run folder holding distill/model"),
    gguf: str = typer.Option(None, help="also write RUN/export-TYPE.gguf for llama.cpp (Llama models): f16, bf16 or q8_0"),
    check: bool = typer.Option(
        False, "--check", help="with --gguf: compare the GGUF's next-token NLL in llama.cpp with transformers' (needs llama-cpp-python or ik-llama-cpp-python)"
    ),
    front: bool = typer.Option(False, "--front", help="export each member of the last rung's Pareto front: RUN/family/<key>/export (a full distillation each)"),
    front_by: str = typer.Option(None, help="with --front: the size the front is drawn over, params (default) or latency (needs latency.measure)"),
    device: str = _space_option(DeviceSettings, "device"),
    dtype: str = _space_option(DeviceSettings, "dtype"),
):
    """Write RUN_DIR/export: the distilled winner with provenance and a model card, optionally a GGUF beside it; --front: the whole Pareto front."""
    from minitron_nas.model.gguf import check_gguf_type, check_llama
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.recipes.export import export_gguf, export_stage
    from minitron_nas.recipes.family import export_front, front_members
    from minitron_nas.recipes.search import run_folder, with_device
    from minitron_nas.search.candidates import load_space

    if front_by is not None and not front:
        raise MinitronError("--front-by chooses the size of --front's Pareto front: add --front, or drop --front-by")
    if front and gguf is not None:
        raise MinitronError("--front writes model folders only: drop --gguf (`export --gguf TYPE` without --front writes the winner's GGUF)")
    if gguf is not None:
        check_gguf_type(gguf)
    elif check:
        raise MinitronError("--check compares a GGUF file with transformers: add --gguf f16 (or bf16, q8_0)")
    spec, folder = with_device(load_space(space), device, dtype), run_folder(space, out)
    if front:
        front_members(folder, front_by or "params")  # a bad --front-by, an unfinished search or no latency: refused before the teacher loads
        with run_lock(folder, "export"):
            index = export_front(spec, folder, load_teacher(spec.teacher, spec.device.device, spec.device.dtype), front_by or "params")
        return console.print(f"family exported, one folder per member -> {index}")
    if not RunFolder(folder).distilled_model.is_dir():
        raise MinitronError(f"no distilled model in '{folder}': run `minitron-nas distill` first")
    with run_lock(folder, "export"):
        teacher = load_teacher(spec.teacher, spec.device.device, spec.device.dtype)
        if gguf is not None:
            check_llama(teacher.model.config, f"the teacher '{teacher.name}'")
        console.print(f"exported -> {export_stage(spec, folder, teacher)}")
        if gguf is not None:
            path, note = export_gguf(spec, folder, teacher, gguf, check)
            console.print(f"GGUF ({gguf}) -> {path}")
            if note:
                console.print(escape(note))


@app.command()
@one_line_errors
def dashboard(
    run_dir: Path = typer.Argument(..., help="run folder of `minitron-nas search`"),
    storage: str = typer.Option(None, help="Optuna storage URL of the study (default: sqlite:///RUN_DIR/study.db)"),
):
    """Rebuild RUN_DIR/dashboard.html (interactive, offline) and RUN_DIR/report.md from the study."""
    from minitron_nas.recipes.report import report_stage

    study, page, report = report_stage(run_dir, storage)
    console.print(f"{len(study.trials)} trials -> {page} and {report}")


if __name__ == "__main__":
    app()
