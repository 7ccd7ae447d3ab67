"""What the student learns from: the teacher's signal, as small parts behind one interface.

A `TeacherSignal` turns the student's logits for a micro-batch into the KD loss against the
teacher. `CachedTopK` reads the teacher's top-k log-probabilities computed once for fixed
blocks (`teacher_cache.py`; the search's retraining, where the teacher would otherwise run
every step for every candidate); `LiveTopK` computes them each step; `LiveFull` compares
full-vocabulary distributions (the final distillation; a live teacher also gives the hidden
states of the intermediate-state loss); `NoTeacher` gives zero (next-token loss
only). `teacher_signal` picks one from what is given, in that order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from minitron_nas.distill.losses import kd_loss_per_token, kd_loss_topk_per_token
from minitron_nas.distill.teacher_cache import TeacherLogitCache, teacher_topk
from minitron_nas.errors import MinitronError
from minitron_nas.model.devices import to_model_device

__all__ = ["CachedTopK", "LiveFull", "LiveTopK", "NoTeacher", "TeacherSignal", "live_teacher", "teacher_signal"]


class TeacherSignal(ABC):
    """The KD loss of one micro-batch; `rows` are the micro-batch's block indices in the training tensor."""

    teacher = None  # the live teacher model, for signals that run it

    @abstractmethod
    def per_token(self, student_logits: torch.Tensor, input_ids: torch.Tensor, rows, temperature: float) -> torch.Tensor:
        """student_logits [B, S, V], input_ids [B, S] -> [B, S] per-token losses (float32)."""

    def kd(self, student_logits: torch.Tensor, input_ids: torch.Tensor, rows, temperature: float) -> torch.Tensor:
        """The mean over tokens: the training objective."""
        return self.per_token(student_logits, input_ids, rows, temperature).mean()


class CachedTopK(TeacherSignal):
    def __init__(self, cache: TeacherLogitCache):
        self.cache = cache

    def per_token(self, student_logits, input_ids, rows, temperature):
        logprobs, ids = self.cache[rows]  # [B, S, k] each
        device = student_logits.device
        return kd_loss_topk_per_token(student_logits, logprobs.to(device), ids.to(device), temperature)


class LiveTopK(TeacherSignal):
    def __init__(self, teacher, top_k: int):
        self.teacher, self.top_k = teacher, top_k

    def per_token(self, student_logits, input_ids, rows, temperature):
        logprobs, ids = teacher_topk(self.teacher, to_model_device(input_ids, self.teacher), self.top_k, temperature)
        device = student_logits.device
        return kd_loss_topk_per_token(student_logits, logprobs.to(device), ids.to(device), temperature)


class LiveFull(TeacherSignal):
    def __init__(self, teacher):
        self.teacher = teacher

    def per_token(self, student_logits, input_ids, rows, temperature):
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=to_model_device(input_ids, self.teacher), use_cache=False).logits
        return kd_loss_per_token(student_logits, teacher_logits.to(student_logits.device), temperature)


class NoTeacher(TeacherSignal):
    def per_token(self, student_logits, input_ids, rows, temperature):
        return student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.float32)


def teacher_signal(cache: TeacherLogitCache | None = None, teacher=None, top_k: int | None = None) -> TeacherSignal:
    """The cache if given, else the live teacher (top-k when `top_k` is set, else the full vocabulary), else none."""
    if cache is not None:
        return CachedTopK(cache)
    if teacher is not None:
        return LiveTopK(teacher, top_k) if top_k is not None else LiveFull(teacher)
    return NoTeacher()


def live_teacher(signal: TeacherSignal):
    """The teacher model a live signal runs: the intermediate-state loss needs its hidden states
    (and then compares full-vocabulary distributions, whatever top_k says)."""
    if signal.teacher is None:
        raise MinitronError("intermediate-state distillation needs the live teacher: pass teacher=")
    return signal.teacher
