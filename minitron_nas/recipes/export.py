"""The export recipe: RUN/export, a folder plain transformers loads (the distilled winner, its
scores beside the teacher's, provenance and a model card), and optionally a GGUF beside it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from minitron_nas.data import token_blocks
from minitron_nas.evaluate.harness import lm_eval_scores
from minitron_nas.files import RunFolder, read_stage_file, write_json_atomic
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.devices import model_device, model_dtype
from minitron_nas.model.gguf import check_gguf, write_gguf
from minitron_nas.model.saving import export_winner
from minitron_nas.model.teachers import Teacher, load_model
from minitron_nas.provenance import file_sha256
from minitron_nas.prune.ranking import Rankings
from minitron_nas.recipes.search import best_arch

__all__ = ["export_candidate", "export_gguf", "export_stage"]


def export_stage(space, out: Path, teacher: Teacher) -> Path:
    """out/export: the distilled winner, best_arch.json with provenance, and a model card."""
    best = best_arch(out)
    search = {k: best.get(k) for k in ("metric", "score", "score_stderr", "tied_with", "rung_metric", "trial", "rungs", "search_tokens")}
    return export_candidate(space, out, teacher, best["architecture"], search, RunFolder(out), RunFolder(out).export)


def export_candidate(space, out: Path, teacher: Teacher, architecture: dict, search: dict, source: RunFolder, dest: Path) -> Path:
    """`dest`: the model distilled in `source.distill`, scored beside the teacher, with provenance
    (`search`: what the search said of it) and a model card; the winner's and each front member's."""
    summary = read_stage_file(source.distill_summary, "rerun `minitron-nas distill` (it resumes from its last checkpoint)", keys=("teacher", "after", "tokens"))
    fix = "delete it and rerun `minitron-nas distill` (it resumes from its last checkpoint)"
    model = load_model(
        source.distilled_model, fix=fix, dtype=model_dtype(teacher.model), device_map=model_device(teacher.model)
    ).eval()  # scored where, and in the dtype in which, the teacher runs
    counter = ParamCounter(teacher.model.config)
    teacher_arch = Architecture.from_config(teacher.model.config)
    arch = Architecture.from_dict(architecture, teacher_arch)
    rankings = Rankings.load(RunFolder(out).rankings, teacher.fingerprint)
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
        "teacher_parameters": {"total": t.total, "non_embedding": t.non_embedding, **({"active": t.active} if t.active != t.total else {})},
        "architecture": arch.to_dict(),
        "parameters": {"total": n.total, "non_embedding": n.non_embedding, **({"active": n.active} if n.active != n.total else {})},
        "rankings": {
            **{k: rankings.meta.get(k) for k in ("data", "samples", "seq_len", "aggregation")},
            "sha256": file_sha256(Rankings.weights_file(RunFolder(out).rankings))[:16],
        },
        "budget": asdict(space.budget),
        "search": search,
        "distill_tokens": summary["tokens"],
        "space": space.source,
    }
    return export_winner(model, teacher.tokenizer, dest, provenance, scores)


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
        return read_stage_file(path, "delete it (the teacher is scored again)")
    value = compute()
    write_json_atomic(path, value)
    return value
