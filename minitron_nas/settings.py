"""The settings of each stage, as typed dataclasses, validated when built.

They import nothing heavy, so the command line, the search-space file and the Python API
can all build them before torch loads. `RankSettings` feeds `ranking.rank`;
`RetrainSettings` the trainer (`trainer.retrain`), for a candidate's short retraining in the
search; `DistillSettings` the final distillation (`distill.distill`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import MinitronError

__all__ = ["REDUCTIONS", "Aggregation", "DistillSettings", "RankSettings", "RetrainSettings"]

REDUCTIONS = ("mean", "l2", "var")


@dataclass(frozen=True)
class Aggregation:
    """Reductions of an activation [B, S, N] to one score per unit: over S first, then over B."""

    batch: str = "l2"
    """mean, l2 or var over the batch."""
    seq: str = "mean"
    """mean, l2 or var over the sequence."""

    def __post_init__(self):
        for axis in ("batch", "seq"):
            if getattr(self, axis) not in REDUCTIONS:
                raise MinitronError(
                    f"unknown {axis} aggregation '{getattr(self, axis)}': use one of {', '.join(REDUCTIONS)}"
                )


@dataclass(frozen=True)
class RankSettings:
    """One calibration pass over the teacher (the paper's activation-based importance)."""

    data: str = "shakespeare"
    """Calibration text: a file, a folder, 'shakespeare' (embedded) or a local datasets name."""
    samples: int = 64
    """Calibration blocks; the paper finds 1,024 samples enough, rankings settle well before."""
    seq_len: int = 256
    """Tokens per calibration block."""
    batch_size: int = 8
    """Blocks per forward pass."""
    aggregation: Aggregation = Aggregation()
    """How activations are reduced over the batch and the sequence (best practice: l2 then mean)."""
    layer_loss: bool = False
    """Also measure the held-out loss with each layer dropped (one extra pass per layer)."""
    heldout_samples: int = 16
    """Held-out blocks for the layer-drop loss."""
    split: str = "train"
    """Which paragraphs of the data calibrate: train (held-out ones are kept for scoring)."""


@dataclass(frozen=True)
class RetrainSettings:
    steps: int = 100  # optimizer steps
    batch_size: int = 8  # blocks per micro-batch, per process
    lr: float = 1e-4
    warmup_steps: int = 10
    temperature: float = 1.0
    top_k: int | None = 64  # None: full-vocabulary KD (live teacher only)
    clm_weight: float = 0.0  # total = clm_weight * CE + KD
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 25  # optimizer steps between held-out evaluations; 0: only at the end
    seed: int = 0  # data order
    max_grad_norm: float | None = 1.0
    weight_decay: float = 0.0

    def __post_init__(self):
        checks = [
            (self.steps >= 1, "steps", "use at least 1"),
            (self.batch_size >= 1, "batch_size", "use at least 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "use a positive learning rate such as 1e-4"),
            (self.warmup_steps >= 0, "warmup_steps", "use 0 or more (more than steps never finishes warming up)"),
            (self.temperature > 0, "temperature", "use a positive temperature such as 1.0"),
            (self.top_k is None or self.top_k >= 1, "top_k", "use a positive k or None for the full vocabulary"),
            (self.clm_weight >= 0, "clm_weight", "use 0 or a positive weight"),
            (self.grad_accum >= 1, "grad_accum", "use at least 1"),
            (self.eval_every >= 0, "eval_every", "use 0 (only at the end) or a positive step count"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "use a positive norm or None"),
            (self.weight_decay >= 0, "weight_decay", "use 0 or a positive value"),
        ]
        for ok, name, fix in checks:
            if not ok:
                raise MinitronError(f"retraining setting {name}={getattr(self, name)!r} is invalid: {fix}")


@dataclass(frozen=True)
class DistillSettings(RetrainSettings):
    """The full distillation stage: retraining settings plus intermediate states and checkpoints."""

    intermediate: str = "auto"  # auto: on when >= 20% of the teacher's layers were dropped
    alpha: float = 1.0  # weight of the intermediate-state loss
    intermediate_loss: str = "nmse"  # normalised MSE, or "cosine"
    checkpoint_every: int = 25  # optimizer steps between checkpoints (and after the last)

    def __post_init__(self):
        super().__post_init__()
        if self.intermediate not in ("auto", "on", "off"):
            raise MinitronError(f"intermediate={self.intermediate!r} is invalid: use auto, on or off")
        if self.intermediate_loss not in ("nmse", "cosine"):
            raise MinitronError(f"intermediate_loss={self.intermediate_loss!r} is invalid: use nmse or cosine")
        if self.checkpoint_every < 1:
            raise MinitronError("checkpoint_every must be at least 1 step")

    def uses_intermediate(self, student_layers: int, teacher_layers: int) -> bool:
        """The paper's best practices 6-7: add intermediate states only when depth was cut a lot."""
        if self.intermediate == "auto":
            return student_layers <= 0.8 * teacher_layers
        return self.intermediate == "on"
