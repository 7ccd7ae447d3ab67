"""The rank and prune recipes: a teacher's rankings, and the teacher sliced to an architecture along them, saved with provenance.

Also the two questions the CLI answers beside them: exact parameter counts of an architecture
(weightless), and a model's mean next-token loss on text.
"""

from __future__ import annotations

from pathlib import Path

from minitron_nas.config.settings import RankSettings
from minitron_nas.data import token_blocks
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.files import check_writable
from minitron_nas.model.architecture import Architecture, ParamCount, ParamCounter, student_config, validate
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import Teacher, check_context, load_config, load_teacher
from minitron_nas.prune.experts import EXPERT_CRITERIA
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, rank

__all__ = ["check_architecture", "count_parameters", "model_loss", "prune_model", "prune_to", "rank_model"]


def rank_model(
    model: str, out: Path, settings: RankSettings = RankSettings(), overwrite: bool = False, device: str = "auto", dtype: str = "auto"
) -> tuple[Teacher, Rankings]:
    """`minitron-nas rank`: `out` checked before the weights load, then the teacher's rankings saved there."""
    check_writable(out, overwrite)
    teacher = load_teacher(model, device, dtype)
    return teacher, rank(teacher, settings, out, overwrite)


def check_architecture(model: str, arch: str | None) -> tuple[object, Architecture]:
    """(teacher config, target) for an architecture JSON file or inline object; None is the teacher's own.

    Checked against the teacher and transformers' own config rules, from the config alone."""
    config = load_config(model)
    teacher_arch = Architecture.from_config(config)
    target = Architecture.load(arch, teacher_arch) if arch else teacher_arch
    validate(target, teacher_arch)
    student_config(config, target, list(target.layers or range(target.num_hidden_layers)))
    return config, target


def count_parameters(model: str, arch: str | None = None) -> tuple[Architecture, ParamCount]:
    """Exact total and non-embedding parameters of `arch` cut from `model`, without weights."""
    config, target = check_architecture(model, arch)
    return target, ParamCounter(config).count(target)


def prune_model(
    model: str,
    rankings: Path,
    arch: str,
    out: Path,
    layer_criterion: str = "block_importance",
    norm_correction: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    expert_criterion: str = "reap",
) -> tuple[Teacher, ParamCount]:
    """`minitron-nas prune`: everything checked before the weights load, then `prune_to` into `out`."""
    check_writable(out, overwrite)
    if expert_criterion not in EXPERT_CRITERIA:
        raise MinitronError(f"unknown expert criterion '{expert_criterion}': use one of {', '.join(EXPERT_CRITERIA)}")
    config, target = check_architecture(model, arch)
    teacher = load_teacher(model, device, dtype)
    prune_to(teacher, Rankings.load(rankings, teacher.fingerprint), target, out, layer_criterion, overwrite, norm_correction, expert_criterion)
    return teacher, ParamCounter(config).count(target)


def prune_to(
    teacher: Teacher,
    rankings: Rankings,
    arch: Architecture,
    out: Path | None = None,
    layer_criterion: str = "block_importance",
    overwrite: bool = False,
    norm_correction: bool = False,
    expert_criterion: str = "reap",
):
    """Prune the teacher to `arch`; with `out`, save model + tokenizer + provenance there."""
    if out is not None:
        check_writable(out, overwrite)
    student = prune(teacher.model, rankings, arch, layer_criterion, norm_correction, expert_criterion)
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
                "parameters": {"total": count.total, "non_embedding": count.non_embedding, "active": count.active},
                "layer_criterion": layer_criterion,
                **({"expert_criterion": expert_criterion} if arch.num_experts is not None else {}),
                "rankings": {k: rankings.meta.get(k) for k in ("data", "samples", "seq_len", "aggregation")},
            },
            overwrite,
        )
    return student


def model_loss(
    model: str, data: str = "shakespeare", samples: int = 32, seq_len: int = 256, split: str = "heldout", device: str = "auto", dtype: str = "auto"
) -> tuple[Teacher, float]:
    """`minitron-nas loss`: the mean next-token loss (nats) of `model` on `samples` blocks of `data`."""
    teacher = load_teacher(model, device, dtype)
    check_context(teacher.model.config, seq_len, "--seq-len")
    return teacher, lm_loss(teacher.model, token_blocks(data, teacher.tokenizer, seq_len, samples, split), progress=True)
