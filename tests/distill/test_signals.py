"""Teacher signals: cached and live top-k agree, the full signal is the KL by hand, the choice follows what is given."""

from __future__ import annotations

import pytest
import torch
from helpers import random_blocks, tiny_model

from minitron_nas.distill.signals import CachedTopK, LiveFull, LiveTopK, NoTeacher, live_teacher, teacher_signal
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.errors import MinitronError


@pytest.fixture(scope="module")
def pair():
    teacher, student = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    blocks = random_blocks(4, 16)
    with torch.no_grad():
        logits = student(input_ids=blocks).logits
    return teacher, blocks, logits


def test_cached_top_k_is_the_live_top_k_of_the_same_blocks(pair):
    teacher, blocks, logits = pair
    cache = TeacherLogitCache.compute(teacher, blocks, 16, 1.0, 2, meta={"teacher_fingerprint": "x"}, progress=False)
    rows = torch.tensor([2, 0])  # any order: the cache is looked up by row
    cached = CachedTopK(cache).kd(logits[rows], blocks[rows], rows, 1.0)
    live = LiveTopK(teacher, 16).kd(logits[rows], blocks[rows], None, 1.0)
    assert cached.item() == pytest.approx(live.item(), rel=1e-2)  # the cache stores float16 log-probabilities


def test_full_signal_is_the_forward_kl_by_hand(pair):
    teacher, blocks, logits = pair
    with torch.no_grad():
        p = torch.softmax(teacher(input_ids=blocks).logits.double() / 2.0, -1)
    q = torch.softmax(logits.double() / 2.0, -1)
    by_hand = (p * (p.log() - q.log())).sum(-1).mean().item() * 2.0**2  # x T^2 keeps gradient scale
    assert LiveFull(teacher).kd(logits, blocks, None, 2.0).item() == pytest.approx(by_hand, rel=1e-4)


def test_the_signal_follows_what_is_given(pair):
    teacher, blocks, logits = pair
    cache = TeacherLogitCache.compute(teacher, blocks, 8, 1.0, 2, meta={"teacher_fingerprint": "x"}, progress=False)
    assert isinstance(teacher_signal(cache, teacher, 8), CachedTopK)
    assert isinstance(teacher_signal(None, teacher, 8), LiveTopK)
    assert isinstance(teacher_signal(None, teacher, None), LiveFull)
    none = teacher_signal()
    assert isinstance(none, NoTeacher) and none.kd(logits, blocks, None, 1.0).item() == 0.0
    with pytest.raises(MinitronError, match="needs the live teacher"):
        live_teacher(none)
    assert live_teacher(teacher_signal(None, teacher, 8)) is teacher
