"""`minitron-nas`: a thin command line over the Python API (see README for the stages).

Long (about 500 lines) because it holds one function per command, each with its typed
options and help; every option is declared once, here or in settings.py, and each command
only calls the Python API. Each command imports the stages it runs inside its own body, so
`--help` and argument errors answer without loading torch.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minitron_nas.config.settings import DEFAULT_TEACHER, Aggregation, RankSettings, field_doc
from minitron_nas.errors import MinitronError, add_resume_hint, resume_hint
from minitron_nas.files import RunFolder

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Minitron pruning and architecture search.")
console = Console(stderr=True)


_VERBOSE = False


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", help="show lm-eval's own logs, warnings and progress bars")):
    """Minitron pruning and architecture search."""
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        from minitron_nas.evaluate.harness import set_lm_eval_verbose

        set_lm_eval_verbose(True)


def _tables() -> Console:
    """Stdout console; wide when piped so tables are not truncated."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _from(cls, name: str):
    """A typer option whose default and help are those of a settings field: one source for both."""
    return typer.Option(getattr(cls, name), help=field_doc(cls, name))


MODEL_HELP = f"Hugging Face id or folder, a .gguf file, or '{DEFAULT_TEACHER}' (embedded)"
DATA_HELP = "a .txt/.jsonl/.parquet file or folder, 'shakespeare' (embedded), or a local datasets name"
DEVICE_HELP = "auto (this process's GPU, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32"
SPACE_DEVICE_HELP = DEVICE_HELP + "; default: the space's device section"
SPACE_DTYPE_HELP = DTYPE_HELP + "; default: the space's device section"


def _with_device(spec, device: str | None, dtype: str | None):
    """The space with --device / --dtype, where given, replacing its `device:` section."""
    from dataclasses import replace

    from minitron_nas.config.space import DeviceSpec

    return replace(spec, device=DeviceSpec(device or spec.device.device, dtype or spec.device.dtype))


def _quiet_libraries() -> None:
    """Our own progress bars stay; transformers' weight-loading bars are noise in a CLI."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# What an interrupted command kept and how to go on, unless the work in progress said more.
INTERRUPTED = {
    "rank": "rankings not written; rerun the same command",
    "prune": "pruned model not written; rerun the same command",
    "search": "finished trials are kept in the study; rerun with --resume to continue",
    "distill": "the last checkpoint (if any) is kept in RUN/distill; rerun the same command to resume",
    "export": "export not written (the distilled model is kept); rerun the same command",
    "run": "finished stages are kept in the run folder; rerun the same command to resume",
}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: outputs stay whole, one line is printed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _lost_connection(err: BaseException | None) -> BaseException | None:
    """The database error behind `err`, if any: libraries wrap it (Optuna raises others while handling it)."""
    exc = sys.modules.get("sqlalchemy.exc")
    if exc is None:
        return None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (exc.OperationalError, exc.InterfaceError)):
            return err
        err = err.__cause__ or err.__context__
    return None


def _reason(err: BaseException) -> str:
    return (str(getattr(err, "orig", None) or err).strip().splitlines() or [type(err).__name__])[0][:160]


def _storage_message(err: BaseException) -> str:
    return f"lost the connection to the study's database ({_reason(err)}): check that the server runs, then rerun with --resume"


@contextmanager
def _quiet_heartbeat_threads():
    """A trial's heartbeat thread that loses the database says so in one line, not a traceback."""
    previous = threading.excepthook

    def hook(args):
        lost = _lost_connection(args.exc_value)
        if lost is None:
            return previous(args)
        console.print(
            f"\nwarning: a trial's heartbeat stopped ({escape(_reason(lost))}); another worker may fail and retry that trial",
            highlight=False,
            soft_wrap=True,
        )

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _one_line_errors(command):
    """Bad input -> `error: ...` on one line and exit status 2, never a traceback.

    Ctrl-C or SIGTERM -> `interrupted: <what was kept; how to resume>` and exit status 130.
    """

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with _terminate_as_interrupt(), _quiet_heartbeat_threads():
                _quiet_libraries()
                return command(*args, **kwargs)
        except MinitronError as err:
            console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as err:
            hint = resume_hint(err) or INTERRUPTED.get(command.__name__, "nothing was written; rerun the same command")
            console.print(f"\ninterrupted: {escape(hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        except Exception as err:
            lost = _lost_connection(err)
            if lost is None:
                raise
            console.print(f"[red]error:[/red] {escape(_storage_message(lost))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_one_line_errors
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
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Score every head, neuron, channel and layer of the teacher on calibration text."""
    from minitron_nas.files import check_writable
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.prune.ranking import rank as rank_stage

    settings = RankSettings(
        data=data,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        aggregation=Aggregation(batch=batch_agg, seq=seq_agg),
        layer_loss=layer_loss,
        heldout_samples=heldout_samples,
        split=split,
    )
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
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    rankings: Path = typer.Option(..., help="folder written by `minitron-nas rank`"),
    arch: str = typer.Option(..., help="architecture JSON file or inline object (HF config names)"),
    out: Path = typer.Option(..., help="folder for the pruned model and tokenizer"),
    layer_criterion: str = typer.Option("block_importance", help="depth choice: block_importance, layer_loss, last"),
    norm_correction: bool = typer.Option(False, help="rescale norm gains for the kept hidden channels (see reports/benchmarks/norm_correction.md)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Slice the teacher to an architecture; the result loads with plain transformers."""
    from minitron_nas.files import check_writable
    from minitron_nas.model.architecture import Architecture, ParamCounter, student_config, validate
    from minitron_nas.model.teachers import load_config, load_teacher
    from minitron_nas.prune.ranking import Rankings
    from minitron_nas.recipes.run import prune_to

    check_writable(out, overwrite)
    config = load_config(model)
    teacher_arch = Architecture.from_config(config)
    target = Architecture.load(arch, teacher_arch)
    validate(target, teacher_arch)
    student_config(config, target, list(target.layers or range(target.num_hidden_layers)))
    teacher = load_teacher(model, device, dtype)
    ranked = Rankings.load(rankings, teacher.fingerprint)
    prune_to(teacher, ranked, target, out, layer_criterion, overwrite, norm_correction)
    n = ParamCounter(config).count(target)
    console.print(f"pruned {teacher.name} to {n.total:,} parameters ({n.non_embedding:,} non-embedding) -> {out}")


@app.command()
@_one_line_errors
def count(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP + ", or a config.json (no weights needed)"),
    arch: str = typer.Option(None, help="architecture JSON file or inline object; default: the teacher's own"),
):
    """Exact parameter counts (total and non-embedding) of an architecture, without weights."""
    from minitron_nas.model.architecture import Architecture, ParamCounter, student_config, validate
    from minitron_nas.model.teachers import load_config

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
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    data: str = typer.Option("shakespeare", help=DATA_HELP),
    samples: int = typer.Option(32),
    seq_len: int = typer.Option(256),
    split: str = typer.Option("heldout", help="train, heldout or all"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """Mean next-token loss (nats) of a model on text."""
    from minitron_nas.model.teachers import check_context, load_teacher
    from minitron_nas.recipes.run import heldout_loss

    teacher = load_teacher(model, device, dtype)
    check_context(teacher.model.config, seq_len, "--seq-len")
    value = heldout_loss(teacher.model, teacher.tokenizer, data, samples, seq_len, split)
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
@_one_line_errors
def evaluate(
    model: str = typer.Option(DEFAULT_TEACHER, help=MODEL_HELP),
    tasks: str = typer.Option(..., help="comma-separated lm-eval tasks or groups (any lm-eval knows, or defined under --include-path)"),
    data_dir: Path = typer.Option(
        None,
        help="folder of upstream benchmark files for the converted tasks (arc_easy, arc_challenge, "
        "piqa, winogrande, lambada_openai, boolq, wikitext), scored offline; default: lm-eval loads them",
    ),
    include_path: list[Path] = typer.Option(None, help="folder or YAML file of your own lm-eval task configs (repeatable)"),
    limit: str = typer.Option(None, help="score only the first N documents of each task: N, or task=N,task=N"),
    batch_size: int = typer.Option(None, help="requests per forward pass (default: the scoring section's, 16)"),
    num_fewshot: str = typer.Option(None, help="few-shot examples per prompt: N, or task=N,task=N (default: each task's own, mostly 0)"),
    objective: str = typer.Option(None, help="also report an objective: task/metric (default: mean acc_norm, else acc)"),
    verbose: bool = typer.Option(False, "--verbose", help="show lm-eval's own logs, warnings and progress bars"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
):
    """lm-evaluation-harness scores (its own prompts, metrics and standard errors) as JSON."""
    from minitron_nas.config.space import ScoringSpec
    from minitron_nas.evaluate.harness import check_lm_eval, lm_eval_objective, lm_eval_scores
    from minitron_nas.model.teachers import load_teacher

    spec = ScoringSpec(
        metric="lm_eval",
        tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
        data_dir=None if data_dir is None else str(data_dir),
        include_path=tuple(str(p) for p in include_path or ()),
        limit=_per_task_option(limit, "limit"),
        num_fewshot=_per_task_option(num_fewshot, "num-fewshot"),
        objective=objective,
        **({} if batch_size is None else {"batch_size": batch_size}),  # default: ScoringSpec's
    )
    check_lm_eval(spec, where="--")  # bad names, folders or files fail before the model loads
    teacher = load_teacher(model, device, dtype)
    scores = lm_eval_scores(teacher.model, teacher.tokenizer, spec, verbose=_VERBOSE or verbose)
    summary = None
    try:
        value, stderr, higher = lm_eval_objective(scores, spec)
        summary = {"name": objective or "mean acc_norm (else acc)", "value": value, "stderr": stderr, "higher_is_better": higher}
    except MinitronError:
        if objective:
            raise
        # no accuracy among the tasks (e.g. wikitext alone) and none asked for: scores only
    print(json.dumps({"model": teacher.name, "limit": spec.limit, "num_fewshot": spec.num_fewshot, "scores": scores, "objective": summary}, indent=1))


@app.command("enumerate")
@_one_line_errors
def enumerate_space(
    space: Path = typer.Argument(..., help="search space YAML"),
    show: int = typer.Option(10, help="how many of the closest candidates to print"),
):
    """Every architecture of a search space within its budget (exact counts; no weights needed)."""
    from minitron_nas.model.teachers import load_config
    from minitron_nas.search.candidates import enumerate_candidates, load_space, require_feasible

    spec = load_space(space)
    config = load_config(spec.teacher)
    feasible = require_feasible(spec, config)
    _, valid = enumerate_candidates(spec, config)
    table = Table(title=f"{len(feasible)} of {len(valid)} valid architectures meet the budget ({spec.budget.parameters:,} {spec.budget.count})")
    for column in ("hidden", "ffn", "heads", "kv groups", "layers", "total", "non-embedding", "memory GiB"):
        table.add_column(column, justify="right")
    for c in feasible[:show]:
        a = c.arch
        table.add_row(
            *map(str, (a.hidden_size, a.intermediate_size, a.num_attention_heads, a.num_key_value_heads, a.num_hidden_layers)),
            f"{c.total:,}",
            f"{c.non_embedding:,}",
            f"{c.memory_gb:.2f}",
        )
    _tables().print(table)


@app.command()
@_one_line_errors
def search(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder (default: runs/<space name>)"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: sqlite in the run folder)"),
    n_trials: int = typer.Option(
        None, help="most trials to run now (rung-0 work units count one each); a search it stops is unfinished, and the same command goes on with it"
    ),
    resume: bool = typer.Option(False, help="continue the study already in the run folder or storage"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP + "; one worker per GPU: --device cuda:N"),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """Budget-constrained architecture search: every candidate retrained by KD in rungs of growing tokens."""
    from minitron_nas.model.teachers import load_config, load_teacher
    from minitron_nas.search.candidates import load_space, require_feasible
    from minitron_nas.search.runner import run_search

    spec = _with_device(load_space(space), device, dtype)
    require_feasible(spec, load_config(spec.teacher))  # an infeasible budget fails before the weights load
    folder = _run_folder(space, out)
    teacher = load_teacher(spec.teacher, spec.device.device, spec.device.dtype)
    try:
        run_search(spec, folder, storage, n_trials, resume, teacher=teacher)
    except KeyboardInterrupt as err:
        add_resume_hint(err, f"finished trials are kept in {folder} and the running candidate is queued again; rerun the same command with --resume")
        raise
    best = RunFolder(folder).best_arch
    if best.is_file():
        found = json.loads(best.read_text())
        error = "" if found.get("score_stderr") is None else f" ± {found['score_stderr']:.4f}"
        console.print(f"best: {found['key']} ({found['params_total']:,} parameters), {found['metric']} {found['score']:.4f}{error} -> {best}")
    else:
        console.print(f"no candidate reached the last rung yet: run more trials with --resume ({folder / 'trials.csv'})")


def _run_folder(space: Path, out: Path | None) -> Path:
    return out or Path("runs") / space.stem


@app.command()
@_one_line_errors
def run(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder (default: runs/<space name>)"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: sqlite in the run folder)"),
    n_trials: int = typer.Option(None, help="most search trials to run now; a search it stops exports nothing yet, and the same command goes on with it"),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """The whole recipe: rank -> search -> distill -> export -> report; a rerun resumes."""
    from minitron_nas.recipes.run import run as run_pipeline
    from minitron_nas.search.candidates import load_space

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
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.recipes.run import distill_winner
    from minitron_nas.search.candidates import load_space

    spec = _with_device(load_space(space), device, dtype)
    folder = _run_folder(space, out)
    if not RunFolder(folder).best_arch.is_file():
        raise MinitronError(f"no best_arch.json in '{folder}': run `minitron-nas search` first")
    summary = distill_winner(spec, folder, load_teacher(spec.teacher, spec.device.device, spec.device.dtype))
    console.print(
        f"held-out loss {summary['before']['heldout_loss']:.3f} -> {summary['after']['heldout_loss']:.3f} "
        f"(teacher {summary['teacher']['heldout_loss']:.3f}) -> {RunFolder(folder).distill}"
    )


@app.command()
@_one_line_errors
def export(
    space: Path = typer.Argument(..., help="search space YAML"),
    out: Path = typer.Option(None, help="run folder holding distill/model"),
    gguf: str = typer.Option(None, help="also write RUN/export-TYPE.gguf for llama.cpp (Llama models): f16, bf16 or q8_0"),
    check: bool = typer.Option(
        False, "--check", help="with --gguf: compare the GGUF's next-token NLL in llama.cpp with transformers' (needs llama-cpp-python)"
    ),
    device: str = typer.Option(None, help=SPACE_DEVICE_HELP),
    dtype: str = typer.Option(None, help=SPACE_DTYPE_HELP),
):
    """Write RUN_DIR/export: the distilled winner, best_arch.json with provenance, a model card; optionally a GGUF beside it."""
    from minitron_nas.model.gguf import check_gguf_type, check_llama
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.recipes.run import export_gguf, export_stage
    from minitron_nas.search.candidates import load_space

    if gguf is not None:
        check_gguf_type(gguf)
    elif check:
        raise MinitronError("--check compares a GGUF file with transformers: add --gguf f16 (or bf16, q8_0)")
    spec = _with_device(load_space(space), device, dtype)
    folder = _run_folder(space, out)
    if not RunFolder(folder).distilled_model.is_dir():
        raise MinitronError(f"no distilled model in '{folder}': run `minitron-nas distill` first")
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
@_one_line_errors
def dashboard(
    run_dir: Path = typer.Argument(..., help="run folder of `minitron-nas search`"),
    storage: str = typer.Option(None, help="Optuna storage URL of the study (default: sqlite:///RUN_DIR/study.db)"),
):
    """Rebuild RUN_DIR/dashboard.html (interactive, offline) and RUN_DIR/report.md from the study."""
    from minitron_nas.report.dashboard import build_dashboard
    from minitron_nas.report.summary import open_run_study, write_report

    study = open_run_study(run_dir, storage)
    page = build_dashboard(run_dir, storage, study=study)
    report = write_report(run_dir, storage, study=study)
    console.print(f"{len(study.trials)} trials -> {page} and {report}")


if __name__ == "__main__":
    app()
