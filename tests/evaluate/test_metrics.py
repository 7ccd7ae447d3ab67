"""Metrics with standard errors, checked against hand computations on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import random_blocks, tiny_model

from minitron_nas.distill.losses import kd_loss
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.evaluate.metrics import (
    HeldoutKLD,
    HeldoutLoss,
    Measurement,
    one_se_t,
    paired_stderr,
    tied,
)


@pytest.fixture(scope="module")
def models():
    return tiny_model("llama", seed=0, vocab_size=128).eval(), tiny_model("llama", seed=1, vocab_size=128).eval()


def _hand_cross_entropy(model, blocks) -> list[float]:
    """Per block: minus the mean log-probability the model gives each next token, by hand."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=blocks).logits.double(), dim=-1)
    picked = logp[:, :-1].gather(-1, blocks[:, 1:, None]).squeeze(-1)  # [N, S-1]
    return (-picked.mean(dim=1)).tolist()


def test_heldout_loss_is_the_token_mean_with_the_standard_error_of_block_means(models):
    student, _ = models
    blocks = random_blocks(10, 16, vocab=128)
    m = HeldoutLoss(blocks, batch_size=3).measure(student)
    per_block = _hand_cross_entropy(student, blocks)
    assert m.per_item == pytest.approx(per_block, rel=1e-5)
    assert m.value == pytest.approx(float(np.mean(per_block)), rel=1e-5)
    assert m.stderr == pytest.approx(np.std(per_block, ddof=1) / math.sqrt(10), rel=1e-5)
    assert lm_loss(student, blocks, batch_size=4) == pytest.approx(float(np.mean(per_block)), rel=1e-5)  # equal blocks: mean of means = token mean


def test_heldout_kld_at_k_equal_vocab_is_the_full_kl(models):
    student, teacher = models
    blocks = random_blocks(6, 16, vocab=128)
    cache = TeacherLogitCache.compute(teacher, blocks, top_k=128, meta={"teacher_fingerprint": "t"})
    m = HeldoutKLD(blocks, cache, batch_size=4).measure(student)
    with torch.no_grad():
        full = kd_loss(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits).item()
    assert m.value == pytest.approx(full, rel=0.03)  # the cache keeps float16 log-probabilities
    assert HeldoutKLD(blocks, cache).measure(teacher).value == pytest.approx(0.0, abs=1e-3)


def test_paired_errors_are_smaller_than_unpaired_for_shared_blocks():
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 1.0, 50)  # block difficulty, common to both candidates
    a_items = list(shared + rng.normal(0, 0.05, 50))
    b_items = list(shared + 0.1 + rng.normal(0, 0.05, 50))
    se = lambda x: float(np.std(x, ddof=1) / math.sqrt(len(x)))
    a = Measurement(float(np.mean(a_items)), se(a_items), 0.0, a_items)
    b = Measurement(float(np.mean(b_items)), se(b_items), 0.0, b_items)
    diff = [x - y for x, y in zip(a_items, b_items)]
    assert paired_stderr(a, b) == pytest.approx(se(diff))
    assert paired_stderr(a, b) < math.hypot(a.stderr, b.stderr) / 5
    assert not tied(a, b)  # 0.1 apart, paired SE ~0.01
    unpaired = Measurement(a.value, a.stderr, 0.0), Measurement(b.value, b.stderr, 0.0)
    assert tied(*unpaired)  # the same gap is inside the noise without pairing


def test_a_data_order_error_from_few_draws_widens_the_band_by_students_t():
    # unpaired errors 0.03 each and a data-order SD 0.02 per value: the difference's error is
    # sqrt(2 x 0.03^2 + 2 x 0.02^2) = 0.0510; t quantiles of 84.13% by hand (tables): 1.8373 (1 dof), 1.3213 (2)
    a, b = Measurement(1.0, 0.03, 0.0), Measurement(1.08, 0.03, 0.0)
    width = math.sqrt(2 * 0.03**2 + 2 * 0.02**2)
    assert one_se_t(1) == pytest.approx(1.8373, abs=1e-3) and one_se_t(2) == pytest.approx(1.3213, abs=1e-3)
    assert one_se_t(10_000) == pytest.approx(1.0, abs=1e-3)  # many draws: one standard error
    assert not tied(a, b, 2 * 0.02**2)  # 0.08 > 0.051 with the SD taken as known
    assert tied(a, b, 2 * 0.02**2, extra_dof=1)  # 0.08 <= 0.0937: one more order cannot tell them apart
    assert not tied(a, b, 2 * 0.02**2, extra_dof=2)  # 0.08 > 0.0674
    assert 0.08 <= width * one_se_t(1) and 0.08 > width * one_se_t(2)
