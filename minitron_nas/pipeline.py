"""Stages as plain functions over paths, shared by the CLI and notebooks."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from .architecture import Architecture, ParamCounter
from .data import token_blocks
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
