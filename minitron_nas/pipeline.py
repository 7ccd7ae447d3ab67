"""Stages as plain functions over paths, shared by the CLI and notebooks."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .architecture import Architecture, ParamCounter
from .data import token_blocks
from .devices import is_main_process, model_device, model_dtype, process_count, to_model_device, wait_for_everyone
from .export import save_model
from .files import check_writable
from .pruning import prune
from .ranking import Aggregation, Rankings, compute_rankings
from .scoring import lm_loss
from .teachers import Teacher, load_teacher


@dataclass(frozen=True)
class RankSettings:
    data: str = "shakespeare"
    samples: int = 64
    seq_len: int = 256
    batch_size: int = 8
    aggregation: Aggregation = Aggregation()
    layer_loss: bool = False
    heldout_samples: int = 16
    split: str = "train"


def rank(teacher: Teacher, settings: RankSettings, out: Path | None = None, overwrite: bool = False) -> Rankings:
    """Calibrate on `settings.data` and (optionally) save the rankings to `out`."""
    if out is not None:
        check_writable(out, overwrite)
    blocks = token_blocks(settings.data, teacher.tokenizer, settings.seq_len, settings.samples, settings.split)
    heldout = None
    if settings.layer_loss:
        heldout = token_blocks(settings.data, teacher.tokenizer, settings.seq_len, settings.heldout_samples, "heldout")
    rankings = compute_rankings(
        teacher.model,
        blocks,
        settings.aggregation,
        settings.batch_size,
        heldout=heldout,
        meta={
            "teacher": teacher.name,
            "teacher_fingerprint": teacher.fingerprint,
            "teacher_dtype": str(model_dtype(teacher.model)).removeprefix("torch."),  # the fingerprint depends on it
            "data": settings.data,
            "split": settings.split,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if out is not None:
        rankings.save(out, overwrite)
    return rankings


def prune_to(
    teacher: Teacher,
    rankings: Rankings,
    arch: Architecture,
    out: Path | None = None,
    layer_criterion: str = "block_importance",
    overwrite: bool = False,
):
    """Prune the teacher to `arch`; with `out`, save model + tokenizer + provenance there."""
    if out is not None:
        check_writable(out, overwrite)
    student = prune(teacher.model, rankings, arch, layer_criterion)
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


def _stages_file(out: Path) -> Path:
    return out / "stages.json"


def finished_stages(out: Path) -> dict:
    path = _stages_file(out)
    return json.loads(path.read_text()) if path.is_file() else {}


def _mark_done(out: Path, stage: str, info: dict) -> None:
    done = finished_stages(out)
    done[stage] = {"finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **info}
    tmp = out / ".stages.json.partial"
    tmp.write_text(json.dumps(done, indent=2))
    tmp.replace(_stages_file(out))


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
    from .report import build_dashboard, write_report
    from .search import run_search

    done = finished_stages(out)
    teacher = teacher or load_teacher(space.teacher, space.device.device, space.device.dtype)
    if "rank" not in done:
        spec = space.ranking
        folder = out / "rankings"
        if not (folder / "rankings.json").is_file():
            rank(teacher, RankSettings(data=spec.data, samples=spec.samples, seq_len=spec.seq_len), folder)
        _mark_done(out, "rank", {"rankings": str(folder)})
    if "search" not in done:
        resume = (out / "study.db").is_file() or storage is not None
        run_search(space, out, storage, n_trials, resume=resume, teacher=teacher)
        best = json.loads((out / "best_arch.json").read_text())
        _mark_done(out, "search", {"best_architecture": best["architecture"], "score_after": best["score_after"]})
    if "distill" not in done:
        summary = distill_winner(space, out, teacher)
        _mark_done(out, "distill", {"heldout_loss_after": summary.get("heldout_loss_after")})
    if "export" not in done:
        export_stage(space, out, teacher)
        _mark_done(out, "export", {"folder": str(out / "export")})
    if "report" not in done:
        build_dashboard(out, storage)
        write_report(out, storage)
        _mark_done(out, "report", {"dashboard": str(out / "dashboard.html")})
    return out / "export"


@torch.no_grad()
def heldout_metrics(model, teacher_model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Held-out LM loss and KL divergence to the teacher (full vocabulary), both in nats.

    Student and teacher may live on different devices: each gets the batch on its own, and
    the teacher's logits are brought to the student's.
    """
    from .distill import kd_loss

    kld, tokens = 0.0, 0
    for batch in blocks.split(batch_size):
        student_logits = model(input_ids=to_model_device(batch, model), use_cache=False).logits  # [B, S, V]
        teacher_logits = teacher_model(input_ids=to_model_device(batch, teacher_model), use_cache=False).logits
        teacher_logits = teacher_logits.to(student_logits.device)
        kld += kd_loss(student_logits, teacher_logits).item() * batch.numel()
        tokens += batch.numel()
    return {"heldout_loss": lm_loss(model, blocks, batch_size), "kld": kld / tokens}


def winner(out: Path, teacher: Teacher) -> tuple[Architecture, Rankings, dict]:
    best = json.loads((out / "best_arch.json").read_text())
    rankings = Rankings.load(out / "rankings", teacher.fingerprint)
    arch = Architecture.from_dict(best["architecture"], Architecture.from_config(teacher.model.config))
    return arch, rankings, best


def distill_winner(space, out: Path, teacher: Teacher) -> dict:
    """Full KD of the search's winner into out/distill (checkpointed; a rerun resumes).

    Under `accelerate launch` with N processes, `distill.tokens` stays the total: each
    optimizer step takes N x batch_size blocks, so there are N times fewer steps.
    """
    from .distill import distill
    from .pruning import select

    folder = out / "distill"
    arch, rankings, _ = winner(out, teacher)
    chosen = select(rankings, arch, Architecture.from_config(teacher.model.config))
    student = prune(teacher.model, rankings, arch)
    spec = space.distill
    settings = spec.settings(space.seed)
    processes = process_count()
    if processes > 1:
        steps = max(1, settings.steps // processes)
        settings = replace(settings, steps=steps, warmup_steps=max(1, steps // 20))
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, settings.steps * spec.batch_size * processes, "train")
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
    }
    if is_main_process():  # under `accelerate launch` every process holds the same student
        save_model(student, folder / "model", teacher.tokenizer, {"architecture": arch.to_dict()}, overwrite=True)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    wait_for_everyone()
    return summary


def export_stage(space, out: Path, teacher: Teacher) -> Path:
    """out/export: the distilled winner, best_arch.json with provenance, and a model card."""
    from transformers import AutoModelForCausalLM

    from .export import export_winner

    arch, rankings, best = winner(out, teacher)
    model = AutoModelForCausalLM.from_pretrained(
        str(out / "distill" / "model"), dtype=model_dtype(teacher.model), device_map=model_device(teacher.model)
    ).eval()  # scored where, and in the dtype in which, the teacher runs
    summary = json.loads((out / "distill" / "summary.json").read_text())
    counter = ParamCounter(teacher.model.config)
    teacher_arch = Architecture.from_config(teacher.model.config)
    scores = {"teacher": {}, "student": {}}
    if space.scoring.metric == "lm_eval":
        from .scoring import lm_eval_scores

        spec = space.scoring
        scores["teacher"] = _cached_json(
            out / "teacher_scores.json",
            lambda: lm_eval_scores(teacher.model, teacher.tokenizer, list(spec.tasks), spec.data_dir, spec.limit, spec.batch_size),
        )
        scores["student"] = lm_eval_scores(model, teacher.tokenizer, list(spec.tasks), spec.data_dir, spec.limit, spec.batch_size)
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
        "rankings": {**{k: rankings.meta.get(k) for k in ("data", "samples", "seq_len", "aggregation")},
                     "sha256": _sha256(out / "rankings" / "rankings.safetensors")},
        "budget": asdict(space.budget),
        "search": {k: best.get(k) for k in ("metric", "score_before", "score_after", "trial", "kendall_tau_before_after")},
        "search_retrain_tokens": space.retrain.tokens,
        "distill_tokens": summary["tokens"],
        "space": space.source,
    }
    return export_winner(model, teacher.tokenizer, out / "export", provenance, scores)


def _cached_json(path: Path, compute):
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value, indent=2))
    return value


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
