"""The distillation stage: the winner learns from the live teacher, resumable from checkpoints.

Logit KD (forward KL) always; intermediate hidden states too when depth was cut by 20% or
more (the paper's best practices 6-7). The trainer is `trainer.retrain`; checkpoints are
`checkpoint.Checkpoint`, on accelerate's state API.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from minitron_nas.config.settings import DistillSettings
from minitron_nas.distill.checkpoint import Checkpoint
from minitron_nas.distill.losses import IntermediateStates
from minitron_nas.distill.trainer import RetrainResult, retrain
from minitron_nas.errors import MinitronError
from minitron_nas.files import write_text_atomic
from minitron_nas.model.devices import is_main_process

__all__ = ["DistillSettings", "distill"]


def distill(
    student,
    teacher,
    train_blocks: torch.Tensor,
    settings: DistillSettings,
    folder: Path,
    heldout_blocks: torch.Tensor | None = None,
    layer_map: list[int] | None = None,
    channels: torch.Tensor | None = None,
    progress: bool = True,
) -> RetrainResult:
    """The full KD stage against the live teacher, checkpointed in `folder` (a rerun resumes).

    `layer_map[i]` is the teacher layer that student layer i was sliced from and `channels`
    the teacher hidden channels kept (both from pruning); they pair hidden states for the
    intermediate-state loss. Writes `folder/curve.json` ([{step, train_loss, eval_loss}]).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_student, n_teacher = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    intermediate = None
    active = settings.uses_intermediate(n_student, n_teacher)
    if active:
        if layer_map is None or len(layer_map) != n_student:
            raise MinitronError("intermediate-state distillation needs layer_map: one teacher layer per student layer")
        intermediate = IntermediateStates(
            layer_map, student.config.hidden_size, teacher.config.hidden_size, channels, settings.alpha, settings.intermediate_loss
        )
    checkpoint = Checkpoint(folder, settings, student, teacher, train_blocks, every=settings.checkpoint_every)
    checkpoint.verify()
    result = retrain(
        student,
        train_blocks,
        None,
        settings,
        heldout_blocks=heldout_blocks,
        teacher=teacher,
        progress=progress,
        intermediate=intermediate,
        checkpoint=checkpoint,
    )
    result.settings["intermediate_active"] = active
    evals = dict(result.eval_curve)
    curve = [{"step": step, "train_loss": loss, "eval_loss": evals.get(step)} for step, loss in result.curve]
    if is_main_process():  # one writer under `accelerate launch`
        write_text_atomic(folder / "curve.json", json.dumps(curve))
    return result
