"""Stages as plain functions over paths, shared by the CLI and notebooks."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from minitron_nas.data import token_blocks
from minitron_nas.distill.checkpoint import Checkpoint
from minitron_nas.distill.signals import LiveFull
from minitron_nas.distill.stage import distill
from minitron_nas.errors import MinitronError, add_resume_hint, resume_hint
from minitron_nas.evaluate.harness import lm_eval_scores, lm_loss
from minitron_nas.evaluate.metrics import HeldoutKLD, HeldoutLoss
from minitron_nas.files import RunFolder, check_writable, write_json_atomic
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.devices import (
    is_main_process,
    model_device,
    model_dtype,
    process_count,
    wait_for_everyone,
)
from minitron_nas.model.gguf import check_gguf, write_gguf
from minitron_nas.model.saving import export_winner, save_model
from minitron_nas.model.teachers import Teacher, load_model, load_teacher
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import Rankings, load_or_rank
from minitron_nas.report.dashboard import build_dashboard
from minitron_nas.report.summary import write_report
from minitron_nas.search.runner import read_state, run_search


def prune_to(
    teacher: Teacher,
    rankings: Rankings,
    arch: Architecture,
    out: Path | None = None,
    layer_criterion: str = "block_importance",
    overwrite: bool = False,
    norm_correction: bool = False,
):
    """Prune the teacher to `arch`; with `out`, save model + tokenizer + provenance there."""
    if out is not None:
        check_writable(out, overwrite)
    student = prune(teacher.model, rankings, arch, layer_criterion, norm_correction)
    if out is not None:
        count = ParamCounter(teacher.model.config).count(arch)
        save_model(
            student,
            out,
            teacher.tokenizer,
            {
                "teacher": teacher.name,
                "teacher_fingerprint": teacher.fingerprint,
                "architecture": arch.to_dict(),
                "parameters": {"total": count.total, "non_embedding": count.non_embedding},
                "layer_criterion": layer_criterion,
                "rankings": {k: rankings.meta.get(k) for k in ("data", "samples", "seq_len", "aggregation")},
            },
            overwrite,
        )
    return student


def heldout_loss(model, tokenizer, data: str, samples: int = 32, seq_len: int = 256, split: str = "heldout") -> float:
    return lm_loss(model, token_blocks(data, tokenizer, seq_len, samples, split), progress=True)


# --------------------------------------------------------------------------- the whole run

STAGES = ("rank", "search", "distill", "export", "report")


def finished_stages(out: Path) -> dict:
    path = RunFolder(out).stages
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark_done(out: Path, stage: str, info: dict) -> None:
    summary = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items() if not isinstance(v, (dict, list)))
    print(f"stage {stage} done: {summary}", file=sys.stderr, flush=True)
    done = finished_stages(out)
    done[stage] = {"finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
    write_json_atomic(RunFolder(out).stages, done)


def run(space, out: Path, storage: str | None = None, n_trials: int | None = None, teacher: Teacher | None = None) -> Path:
    """rank -> search -> distill -> export -> report, each stage skipped once finished.

    With `space.family` (several budgets, largest first), each member is a run of its own in
    `out/<budget>`, and its teacher is the previous member's exported model (best practice 1).
    Returns the folder of the last exported model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if space.family:
        exported = None
        for budget in sorted(space.family, reverse=True):
            member = replace(space, budget=replace(space.budget, parameters=budget), family=())
            if exported is not None:
                member = replace(member, teacher=str(exported))
            exported = run(member, out / f"budget-{budget}", storage, n_trials)
        return exported
    return _run_single(space, out, storage, n_trials, teacher)


def _run_single(space, out: Path, storage, n_trials, teacher) -> Path:
    done = finished_stages(out)
    made_from = _made_from(space)
    _check_made_from(out, made_from)  # settings and data: before the teacher loads
    teacher = teacher or load_teacher(space.teacher, space.device.device, space.device.dtype)
    made_from["teacher_fingerprint"] = teacher.fingerprint
    _check_made_from(out, made_from)
    write_json_atomic(RunFolder(out).run_file, made_from)
    stage = STAGES[0]
    try:
        stage = "rank"
        if "rank" not in done:
            folder = RunFolder(out).rankings
            load_or_rank(teacher, space.ranking, folder)
            _mark_done(out, "rank", {"rankings": str(folder)})
        stage = "search"
        if "search" not in done:
            resume = RunFolder(out).study_db.is_file() or storage is not None
            try:
                run_search(space, out, storage, n_trials, resume=resume, teacher=teacher, on_trial=lambda study, _: build_dashboard(out, study=study))
            except MinitronError:  # e.g. every candidate failed: the views still show what happened
                if RunFolder(out).study_db.is_file() or storage is not None:
                    build_dashboard(out, storage)
                    write_report(out, storage)
                raise
            best_file = RunFolder(out).best_arch
            if not best_file.is_file():
                raise MinitronError(f"the search has not finished its last rung yet: rerun the same command to continue ({out / 'trials.csv'})")
            best = json.loads(best_file.read_text())
            _mark_done(out, "search", {"best_architecture": best["architecture"], "score": best["score"], "search_tokens": best["search_tokens"]})
        stage = "distill"
        if "distill" not in done:
            summary = distill_winner(space, out, teacher)
            _mark_done(out, "distill", {"heldout_loss_after": summary.get("heldout_loss_after")})
        stage = "export"
        if "export" not in done:
            export_stage(space, out, teacher)
            _mark_done(out, "export", {"folder": str(RunFolder(out).export)})
        stage = "report"
        if "report" not in done:
            build_dashboard(out, storage)
            write_report(out, storage)
            _mark_done(out, "report", {"dashboard": str(RunFolder(out).dashboard)})
    except KeyboardInterrupt as err:
        kept = list(finished_stages(out))
        inner = resume_hint(err)
        err.resume_hint = f"{stage} stage stopped; {', '.join(kept) if kept else 'no stage'} finished and kept in '{out}'; " + (
            inner if inner and stage == "distill" else "rerun the same command to resume"
        )
        raise
    return RunFolder(out).export


# --------------------------------------------------------------------------- what a run was made from


def _made_from(space) -> dict:
    """The settings (teacher excepted: its fingerprint stands for it) and the data of a run."""
    settings = json.loads(json.dumps(asdict(space), default=str))
    for key in ("source", "teacher"):
        settings.pop(key, None)
    source = Path(space.source) if space.source else None
    names = {f"{section}.data": getattr(space, section).data for section in ("ranking", "retrain", "distill")}
    return {
        "space": space.source,
        "space_sha256": _sha256(source) if source and source.is_file() else None,
        "settings": settings,
        "data": {key: {"name": name, "signature": data_signature(name)} for key, name in names.items()},
    }


def data_signature(spec: str) -> str:
    """A file or folder by name, size and sampled content (first and last MiB); other names as they are."""
    path = Path(spec)
    if not path.exists():
        return spec
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _first_difference(old, new, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            found = _first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else k)
            if found:
                return found
        return None
    return None if old == new else f"{key} was {json.dumps(old)}, now {json.dumps(new)}"


def _check_made_from(out: Path, now: dict) -> None:
    """A run folder resumes only what it was made from: refuse changed settings, data or teacher."""
    path = RunFolder(out).run_file
    if not path.is_file():
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise MinitronError(f"'{path}' is corrupt: delete it to accept the run folder as it is, or use another --out") from None
    fix = "use another --out, or put the original back"
    change = _first_difference(before.get("settings"), now["settings"])
    if change:
        raise MinitronError(f"run folder '{out}' was made from other settings ({change}): {fix}")
    for key, data in now["data"].items():
        old = before.get("data", {}).get(key)
        if old and old != data:
            what = f"'{old['name']}', now '{data['name']}'" if old["name"] != data["name"] else f"'{data['name']}' whose content changed"
            raise MinitronError(f"run folder '{out}' was made from other data ({key} was {what}): {fix}")
    old, new = before.get("teacher_fingerprint"), now.get("teacher_fingerprint")
    if old and new and old != new:
        raise MinitronError(f"run folder '{out}' was made from another teacher (fingerprint {old}, now {new}): {fix}")


@torch.no_grad()
def heldout_metrics(model, teacher_model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Held-out LM loss and KL divergence to the teacher (full vocabulary), in nats, each with
    its standard error over the blocks. Student and teacher may live on different devices."""
    loss = HeldoutLoss(blocks, batch_size).measure(model)
    kld = HeldoutKLD(blocks, LiveFull(teacher_model), batch_size).measure(model)
    return {"heldout_loss": loss.value, "heldout_loss_stderr": loss.stderr, "kld": kld.value, "kld_stderr": kld.stderr}


def winner(out: Path, teacher: Teacher) -> tuple[Architecture, Rankings, dict]:
    best = json.loads(RunFolder(out).best_arch.read_text())
    rankings = Rankings.load(RunFolder(out).rankings, teacher.fingerprint)
    arch = Architecture.from_dict(best["architecture"], Architecture.from_config(teacher.model.config))
    return arch, rankings, best


def distill_winner(space, out: Path, teacher: Teacher) -> dict:
    """Full KD of the search's winner into out/distill (checkpointed; a rerun resumes).

    Under `accelerate launch` with N processes, `distill.tokens` stays the total: each
    optimizer step takes N x batch_size blocks, so there are N times fewer steps.
    """
    folder = RunFolder(out).distill
    try:
        return _distill_winner(space, out, teacher, folder)
    except KeyboardInterrupt as err:
        step, steps = Checkpoint.saved_step(folder), space.distill.total_steps
        if step is None:
            add_resume_hint(
                err,
                f"no checkpoint yet (the first comes at step {min(space.distill.checkpoint_every, steps)} of {steps}); rerun the same command to start the distillation again",
            )
        else:
            add_resume_hint(err, f"checkpoint at step {step} of {steps} kept in '{folder}'; rerun the same command to resume from it")
        raise


def _distill_winner(space, out: Path, teacher: Teacher, folder: Path) -> dict:

    arch, rankings, best = winner(out, teacher)
    chosen = select(rankings, arch, Architecture.from_config(teacher.model.config))
    student = prune(teacher.model, rankings, arch)
    continued = _continue_from_search(student, arch, best)
    spec = space.distill
    settings = replace(spec, seed=space.seed)
    processes = process_count()
    if processes > 1:
        settings = replace(settings, steps=max(1, settings.total_steps // processes))
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, settings.total_steps * spec.batch_size * spec.grad_accum * processes, "train")
    heldout = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, spec.heldout_samples, "heldout")
    before = heldout_metrics(student, teacher.model, heldout)
    result = distill(student, teacher.model, train, settings, folder, heldout, chosen.layers, chosen.channels)
    after = heldout_metrics(student, teacher.model, heldout)
    summary = {
        "architecture": arch.to_dict(),
        "teacher": heldout_metrics(teacher.model, teacher.model, heldout),
        "before": before,
        "after": after,
        "heldout_loss_after": after["heldout_loss"],
        "tokens": result.tokens_seen,
        "seconds": round(result.seconds, 1),
        "intermediate": result.settings.get("intermediate_active"),
        "continued_from_search_steps": continued,
    }
    if is_main_process():  # under `accelerate launch` every process holds the same student
        save_model(student, RunFolder(out).distilled_model, teacher.tokenizer, {"architecture": arch.to_dict()}, overwrite=True)
        write_json_atomic(RunFolder(out).distill_summary, summary)
    wait_for_everyone()
    return summary


def _continue_from_search(student, arch: Architecture, best: dict) -> int:
    """Start from the winner's last stable state in the search (the steps it already trained,
    before its rung's decay), so no search token is wasted; returns those steps (0: from the slice).

    Only the weights carry over: AdamW starts afresh with the distillation's own warm-up,
    since its batch, sequence length, teacher signal and losses may differ from the rungs'.
    """
    saved = read_state(Path(best["state"])) if best.get("state") else None
    sizes = lambda a: {k: v for k, v in a.items() if k != "layers"}
    if saved is None or sizes(saved["architecture"]) != sizes(arch.to_dict()):
        return 0  # none kept, or made for another architecture than best_arch.json names now
    student.load_state_dict(saved["model"])
    print(f"distill: continuing the winner's search run from its step {saved['step']} (the state before its last rung's decay)", file=sys.stderr, flush=True)
    return int(saved["step"])


def export_stage(space, out: Path, teacher: Teacher) -> Path:
    """out/export: the distilled winner, best_arch.json with provenance, and a model card."""

    arch, rankings, best = winner(out, teacher)
    fix = "delete it and rerun `minitron-nas distill` (it resumes from its last checkpoint)"
    model = load_model(
        RunFolder(out).distilled_model, fix=fix, dtype=model_dtype(teacher.model), device_map=model_device(teacher.model)
    ).eval()  # scored where, and in the dtype in which, the teacher runs
    summary = json.loads(RunFolder(out).distill_summary.read_text())
    counter = ParamCounter(teacher.model.config)
    teacher_arch = Architecture.from_config(teacher.model.config)
    scores = {"teacher": {}, "student": {}}
    if space.scoring.metric == "lm_eval":
        spec = space.scoring
        scores["teacher"] = _cached_json(
            RunFolder(out).teacher_scores,
            lambda: lm_eval_scores(teacher.model, teacher.tokenizer, spec),
        )
        scores["student"] = lm_eval_scores(model, teacher.tokenizer, spec)
    scores["teacher"]["heldout"] = {"loss": summary["teacher"]["heldout_loss"]}
    scores["student"]["heldout"] = {"loss": summary["after"]["heldout_loss"], "kld_to_teacher": summary["after"]["kld"]}
    n, t = counter.count(arch), counter.count(teacher_arch)
    provenance = {
        "name": f"{teacher.name}-minitron-{n.total / 1e6:.0f}M",
        "teacher": teacher.name,
        "teacher_fingerprint": teacher.fingerprint,
        "teacher_architecture": teacher_arch.to_dict(),
        "teacher_parameters": {"total": t.total, "non_embedding": t.non_embedding},
        "architecture": arch.to_dict(),
        "parameters": {"total": n.total, "non_embedding": n.non_embedding},
        "rankings": {
            **{k: rankings.meta.get(k) for k in ("data", "samples", "seq_len", "aggregation")},
            "sha256": _sha256(Rankings.weights_file(RunFolder(out).rankings)),
        },
        "budget": asdict(space.budget),
        "search": {k: best.get(k) for k in ("metric", "score", "score_stderr", "tied_with", "rung_metric", "trial", "rungs", "search_tokens")},
        "distill_tokens": summary["tokens"],
        "space": space.source,
    }
    return export_winner(model, teacher.tokenizer, RunFolder(out).export, provenance, scores)


def export_gguf(space, out: Path, teacher: Teacher, gguf_type: str, check: bool = False) -> tuple[Path, str | None]:
    """RUN/export-TYPE.gguf beside RUN/export; with `check`, one line comparing llama.cpp's
    next-token NLL on the distillation's held-out text with transformers' (or why it was skipped)."""
    folder = RunFolder(out).export
    path = write_gguf(folder, gguf_type=gguf_type)
    if not check:
        return path, None
    spec = space.distill
    blocks = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, spec.heldout_samples, "heldout")
    return path, check_gguf(path, load_model(folder).eval(), blocks)


def _cached_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    write_json_atomic(path, value)
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
