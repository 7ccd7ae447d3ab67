"""Distillation: KD losses, the teacher top-k cache, and the accelerate-based trainer.

Unit tests use tiny random Llama models. The teacher is built with initializer_range=0.2
so that its next-token distributions are peaked enough (entropy ~4.0 nats of a maximum
4.85) for top-k truncation and retraining to matter. The last test uses the real
SmolLM2-135M teacher (marked `teacher`).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from helpers import random_blocks, tiny_model

from minitron_nas.config.settings import RetrainSettings
from minitron_nas.distill.losses import kd_loss, kd_loss_topk_per_token
from minitron_nas.distill.teacher_cache import CACHE_META, CACHE_TENSORS, TeacherLogitCache, blocks_sha256
from minitron_nas.distill.trainer import retrain
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings

VOCAB = 128
TOPK_KS = (8, 16, 32)


def bucketed_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int) -> float:
    """Oracle, by hand in float64: KL between the (k + 1)-bucket distributions, per token, averaged."""
    p, q = torch.softmax(teacher_logits.double(), -1), torch.softmax(student_logits.double(), -1)
    ids = p.topk(k, -1).indices
    p_top, q_top = p.gather(-1, ids), q.gather(-1, ids)
    p_tail, q_tail = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    kl = (p_top * (p_top.log() - q_top.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    return kl.mean().item()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spinning makes
    them ~10x slower; the real-teacher test keeps torch's default."""
    if request.node.get_closest_marker("teacher"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair():
    """(teacher, rankings, student architecture, train blocks, held-out blocks)."""
    teacher = tiny_model("llama", initializer_range=0.2)
    train = random_blocks(32, 32, seed=0)
    heldout = random_blocks(8, 32, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rankings = compute_rankings(teacher, train, progress=False)
    finally:
        torch.set_num_threads(threads)
    arch = replace(Architecture.from_config(teacher.config), intermediate_size=48, num_hidden_layers=3)
    return teacher, rankings, arch, train, heldout


def _student(pair):
    teacher, rankings, arch, *_ = pair
    return prune(teacher, rankings, arch)


def _manual_kd(student_logits, teacher_logits, temperature):
    total, count = 0.0, 0
    for s_row, t_row in zip(student_logits.reshape(-1, VOCAB).double(), teacher_logits.reshape(-1, VOCAB).double()):
        p = [math.exp(v) for v in (t_row / temperature).tolist()]
        q = [math.exp(v) for v in (s_row / temperature).tolist()]
        zp, zq = sum(p), sum(q)
        total += sum(pi / zp * math.log((pi / zp) / (qi / zq)) for pi, qi in zip(p, q))
        count += 1
    return total / count * temperature**2


# --------------------------------------------------------------------------- losses


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, VOCAB, generator=g), torch.randn(2, 5, VOCAB, generator=g)
    assert kd_loss(a, a.clone(), 1.0).abs().item() < 1e-6
    assert kd_loss(a + 3.0, a, 2.0).abs().item() < 1e-6  # shift-invariant
    assert kd_loss(a, b, 1.0).item() > 0.1
    assert kd_loss(a, b, 1.0).item() != pytest.approx(kd_loss(b, a, 1.0).item(), rel=1e-3)  # forward KL, not symmetric


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_equals_a_manual_computation(temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, VOCAB, generator=g) * 2, torch.randn(2, 3, VOCAB, generator=g) * 2
    assert kd_loss(s, t, temperature).item() == pytest.approx(_manual_kd(s, t, temperature), rel=1e-5)


def test_kd_loss_topk_with_k_equal_vocab_is_kd_loss(pair):
    teacher, *_, heldout = pair
    student = _student(pair)
    with torch.no_grad():
        s, t = student(input_ids=heldout).logits, teacher(input_ids=heldout).logits
    for temperature in (1.0, 2.0):
        values, ids = torch.log_softmax(t / temperature, -1).topk(VOCAB, -1)
        full = kd_loss(s, t, temperature).item()
        assert full > 0.1
        assert kd_loss_topk_per_token(s, values, ids, temperature).mean().item() == pytest.approx(full, abs=1e-5)


def test_kd_loss_topk_is_the_bucketed_kl_and_a_lower_bound(pair):
    teacher, *_, heldout = pair
    student = _student(pair)
    with torch.no_grad():
        s, t = student(input_ids=heldout).logits, teacher(input_ids=heldout).logits
    full = kd_loss(s, t, 1.0).item()
    gaps = {}
    for k in TOPK_KS:
        values, ids = torch.log_softmax(t, -1).topk(k, -1)
        topk = kd_loss_topk_per_token(s, values.half(), ids.int(), 1.0).mean().item()  # as stored in the cache
        assert topk == pytest.approx(bucketed_kl(s, t, k), rel=1e-2), k  # float16 log-probs: about 3 digits
        gaps[k] = (full - topk) / full
    for k, gap in gaps.items():
        assert gap >= 0, (k, gap)  # merging buckets only lowers a KL divergence
    assert gaps[8] > gaps[16] > gaps[32]  # fewer buckets, more of the divergence merged away


def test_kd_loss_topk_is_stable_when_the_student_puts_all_mass_in_the_top_k():
    teacher_logits = torch.randn(1, 4, VOCAB)
    values, ids = torch.log_softmax(teacher_logits, -1).topk(4, -1)
    student_logits = torch.full((1, 4, VOCAB), -1e4)
    student_logits.scatter_(-1, ids, 50.0)  # tail mass underflows to exactly 0
    student_logits.requires_grad_()
    loss = kd_loss_topk_per_token(student_logits, values, ids, 1.0).mean()
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(student_logits.grad).all()


# --------------------------------------------------------------------------- cache


def test_cache_round_trip(pair, tmp_path):
    teacher, _, _, train, _ = pair
    out = tmp_path / "cache"
    built = TeacherLogitCache.load_or_build(teacher, train, 16, 2.0, 8, out, meta={"teacher_fingerprint": "abc", "teacher": "tiny"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no temporary folder left behind
    meta = json.loads((out / CACHE_META).read_text())
    assert meta["teacher_fingerprint"] == "abc" and meta["top_k"] == 16 and meta["temperature"] == 2.0
    assert meta["blocks_sha256"] == blocks_sha256(train)
    loaded = TeacherLogitCache.load(out, {"teacher_fingerprint": "abc", "blocks": train, "top_k": 16, "temperature": 2.0})
    assert loaded.logprobs.dtype == torch.float16 and loaded.indices.dtype == torch.int32
    assert loaded.logprobs.shape == (32, 32, 16) and len(loaded) == 32
    assert torch.equal(loaded.logprobs, built.logprobs) and torch.equal(loaded.indices, built.indices)
    assert loaded.nbytes == 32 * 32 * 16 * 6  # float16 log-probability + int32 id per entry
    assert abs((out / CACHE_TENSORS).stat().st_size - loaded.nbytes) < 1024  # the formula is the file size
    rows = [3, 0, 7]
    lp, ix = loaded[rows]
    with torch.no_grad():
        expected = torch.log_softmax(teacher(input_ids=train[rows]).logits / 2.0, -1).topk(16, -1)
    assert torch.equal(ix.long(), expected.indices)
    assert torch.allclose(lp.float(), expected.values, atol=1e-2)  # float16 storage
    assert (lp[..., :-1] >= lp[..., 1:]).all()  # sorted, best first


def test_cache_refuses_other_blocks_teacher_k_or_temperature(pair, tmp_path):
    teacher, _, _, train, heldout = pair
    out = tmp_path / "cache"
    TeacherLogitCache.load_or_build(teacher, train, 16, 1.0, 8, out, meta={"teacher_fingerprint": "abc"})
    mismatches = [  # what is asked for, and the first difference the refusal names
        ({"blocks": heldout}, "blocks_sha256 was"),
        ({"blocks": train.flip(0)}, "blocks_sha256 was"),  # same tokens, other order
        ({"teacher_fingerprint": "def"}, 'teacher_fingerprint was "abc", now "def"'),
        ({"top_k": 32}, "top_k was 16, now 32"),
        ({"temperature": 2.0}, "temperature was 1.0, now 2.0"),
    ]
    for expected, named in mismatches:
        with pytest.raises(MinitronError) as err:
            TeacherLogitCache.load(out, expected)
        assert "\n" not in str(err.value) and named in str(err.value) and "rebuild" in str(err.value)
    with pytest.raises(MinitronError, match="already exists"):
        TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"}).save(out)
    with pytest.raises(MinitronError, match="no teacher logit cache"):
        TeacherLogitCache.load(tmp_path / "missing")
    reused = TeacherLogitCache.load_or_build(teacher, train, 16, 1.0, 8, out, meta={"teacher_fingerprint": "abc"})
    assert reused.top_k == 16
    with pytest.raises(MinitronError, match="top_k was 16, now 8"):
        TeacherLogitCache.load_or_build(teacher, train, 8, 1.0, 8, out, meta={"teacher_fingerprint": "abc"})


def test_retrain_refuses_a_cache_of_other_blocks_or_settings(pair):
    teacher, _, _, train, heldout = pair
    cache = TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    settings = RetrainSettings(steps=1, batch_size=4, top_k=16)
    with pytest.raises(MinitronError, match="not made for these training blocks"):
        retrain(_student(pair), heldout, cache, settings, progress=False)
    with pytest.raises(MinitronError, match="top_k=8"):
        retrain(_student(pair), train, cache, replace(settings, top_k=8), progress=False)
    with pytest.raises(MinitronError, match="temperature"):
        retrain(_student(pair), train, cache, replace(settings, temperature=2.0), progress=False)
    with pytest.raises(MinitronError, match=r"retrain\.lr is -1: give a positive number"):
        RetrainSettings(lr=-1.0)


# --------------------------------------------------------------------------- trainer


def test_retraining_a_pruned_student_lowers_the_heldout_kd_loss(pair):
    teacher, _, _, train, heldout = pair
    cache = TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    settings = RetrainSettings(steps=30, batch_size=4, lr=1e-3, warmup_steps=3, top_k=16, eval_every=10)
    result = retrain(_student(pair), train, cache, settings, heldout, teacher=teacher, progress=False)
    print("held-out KD", result.eval_curve, "LM", result.eval_lm_curve)
    assert result.eval_metric == "kd"
    assert [s for s, _ in result.eval_curve] == [0, 10, 20, 30]
    assert [s for s, _ in result.curve] == list(range(1, 31))
    assert result.tokens_seen == 30 * 4 * 32 and result.seconds > 0
    before, after = result.eval_curve[0][1], result.eval_curve[-1][1]
    assert after < before  # by how much is the benchmarks' business
    assert result.curve[-1][1] < result.curve[0][1]


@pytest.mark.parametrize("top_k", [16, VOCAB])
def test_cached_training_matches_live_teacher_training_at_step_one(pair, top_k):
    """With k = vocab the live side uses full-vocabulary KD, so the cache is checked against plain kd_loss."""
    teacher, _, _, train, _ = pair
    cache = TeacherLogitCache.compute(teacher, train, top_k, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    settings = RetrainSettings(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, top_k=top_k, seed=3)
    cached = retrain(_student(pair), train, cache, settings, progress=False)
    live_settings = settings if top_k < VOCAB else replace(settings, top_k=None)
    live = retrain(_student(pair), train, None, live_settings, teacher=teacher, progress=False)
    # float16 log-probabilities in the cache: about 1e-3 relative
    assert cached.curve[0][1] == pytest.approx(live.curve[0][1], rel=2e-3)
    assert cached.curve[1][1] == pytest.approx(live.curve[1][1], rel=2e-2)


def test_data_order_is_fixed_by_the_seed_and_accumulation_matches_a_bigger_batch(pair):
    teacher, _, _, train, _ = pair
    cache = TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    base = RetrainSettings(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, top_k=16, seed=5, max_grad_norm=None)
    run = lambda s: [v for _, v in retrain(_student(pair), train, cache, s, progress=False).curve]
    first = run(base)
    assert run(base) == first
    assert run(replace(base, seed=6))[0] != first[0]
    accumulated = run(replace(base, batch_size=2, grad_accum=2))
    assert accumulated == pytest.approx(first, rel=1e-4)


def test_heldout_blocks_are_scored_at_step_zero_and_every_eval_every_steps(pair):
    _, _, _, train, heldout = pair
    student = _student(pair)
    calls = []
    student.register_forward_pre_hook(lambda module, args: calls.append(1))
    settings = RetrainSettings(steps=10, batch_size=8, lr=1e-3, warmup_steps=0, top_k=None, eval_every=5, clm_weight=1.0)
    result = retrain(student, train, None, settings, heldout, progress=False)
    assert result.eval_metric == "lm" and [s for s, _ in result.eval_curve] == [0, 5, 10]
    assert result.eval_curve == result.eval_lm_curve  # without a teacher the held-out metric is the LM loss
    assert len(calls) == 3 + 10  # one held-out batch at each of three evaluations, one per step
    assert not student.training


def test_a_nan_loss_raises_a_one_line_error_naming_the_step(pair):
    teacher, _, _, train, _ = pair
    student = _student(pair)
    forwards = []

    def poison(module, args, output):
        forwards.append(1)
        return output * float("nan") if len(forwards) == 3 else output

    student.model.layers[1].mlp.register_forward_hook(poison)
    settings = RetrainSettings(steps=10, batch_size=4, lr=1e-3, warmup_steps=0, top_k=None)
    with pytest.raises(MinitronError) as err:
        retrain(student, train, None, settings, teacher=teacher, progress=False)
    message = str(err.value)
    assert "NaN/inf at step 3" in message and "learning rate" in message and "\n" not in message


def test_a_nan_gradient_with_a_finite_loss_raises_too(pair):
    teacher, _, _, train, _ = pair
    student = _student(pair)
    backwards = []

    def poison(grad):
        backwards.append(1)
        return grad * float("nan") if len(backwards) == 2 else grad

    student.model.layers[0].mlp.up_proj.weight.register_hook(poison)
    settings = RetrainSettings(steps=10, batch_size=4, lr=1e-3, warmup_steps=0, top_k=None)
    with pytest.raises(MinitronError, match="NaN/inf at step 2"):
        retrain(student, train, None, settings, teacher=teacher, progress=False)


# --------------------------------------------------------------------------- real teacher


@pytest.mark.teacher
def test_retraining_a_pruned_smollm2_recovers_heldout_losses(shared_data, tmp_path):
    from minitron_nas.model.teachers import load_teacher

    teacher = load_teacher("smollm2-135m")
    tokenizer = teacher.tokenizer
    train = token_blocks_(shared_data / "wikitext2" / "valid.txt", tokenizer, 16)
    heldout = token_blocks_(shared_data / "wikitext2" / "test.txt", tokenizer, 4)
    rankings = compute_rankings(teacher.model, train, batch_size=4, progress=False)
    arch = replace(Architecture.from_config(teacher.model.config), intermediate_size=768, num_hidden_layers=26)
    student = prune(teacher.model, rankings, arch)
    meta = {"teacher_fingerprint": teacher.fingerprint, "teacher": teacher.name}
    cache = TeacherLogitCache.load_or_build(teacher.model, train, 64, 1.0, 4, tmp_path / "cache", meta)
    assert cache.nbytes == 16 * 128 * 64 * 6

    with torch.no_grad():  # how much of the full KD the top-64 buckets see, on held-out text
        s_logits, t_logits = student(input_ids=heldout).logits, teacher.model(input_ids=heldout).logits
    full = kd_loss(s_logits, t_logits).item()
    top = {}
    for k in (16, 64):
        values, ids = torch.log_softmax(t_logits.float(), -1).topk(k, -1)
        top[k] = kd_loss_topk_per_token(s_logits, values.half(), ids.int()).mean().item()
    print(f"pruned student: full KD {full:.3f}, top-64 KD {top[64]:.3f}, top-16 KD {top[16]:.3f}")
    # the top-16 buckets merge some of the top-64 ones, which merge some of the full vocabulary: each can only lower the KL
    assert 0 <= top[16] <= top[64] * (1 + 1e-3) and top[64] <= full * (1 + 1e-3)  # float16 log-probabilities

    settings = RetrainSettings(steps=8, batch_size=4, lr=3e-4, warmup_steps=1, top_k=64, eval_every=8)
    result = retrain(student, train, cache, settings, heldout, teacher=teacher.model, progress=False)
    (_, kd0), (_, kd1) = result.eval_curve
    (_, lm0), (_, lm1) = result.eval_lm_curve
    print(f"held-out KD {kd0:.3f} -> {kd1:.3f}, LM {lm0:.3f} -> {lm1:.3f}, {result.seconds:.0f} s")
    assert kd1 < kd0 and lm1 < lm0  # retraining recovers both; by how much is measured in reports/benchmarks


def token_blocks_(path, tokenizer, n):
    from minitron_nas.data import token_blocks

    return token_blocks(str(path), tokenizer, 128, n)


# --------------------------------------------------------------------------- learning-rate schedule and continuation


@pytest.mark.parametrize("steps,warmup,decay", [(1, None, None), (1, 1, 0), (4, 2, 1), (10, 1, 3), (7, 0, None)])
def test_no_step_has_a_learning_rate_of_zero(steps, warmup, decay):
    settings = RetrainSettings(steps=steps, warmup_steps=warmup, decay_steps=decay)
    factors = [settings.lr_factor(s) for s in range(1, steps + 1)]
    assert all(f > 0 for f in factors), factors
    # warm-up by hand: step s of w is s / w; the flat part is 1; the decay only goes down
    w, start = settings.warmup, steps - settings.decay
    assert factors[: min(w, start)] == [s / w for s in range(1, min(w, start) + 1)]
    tail = factors[max(w, start) :]
    assert tail == sorted(tail, reverse=True)  # after warm-up: flat, then only down


def test_warmup_stable_decay_by_hand():
    settings = RetrainSettings(steps=8, warmup_steps=2, decay_steps=3)
    cos = lambda i: 0.5 * (1 + math.cos(math.pi * i / 4))  # i-th of 3 decay steps, stopping short of 0
    assert [settings.lr_factor(s) for s in range(1, 9)] == pytest.approx([0.5, 1, 1, 1, 1, cos(1), cos(2), cos(3)])


def test_the_first_step_of_a_one_step_run_changes_the_weights(pair):
    teacher, _, _, train, _ = pair
    cache = TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    student = _student(pair)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    retrain(student, train, cache, RetrainSettings(steps=1, batch_size=4, lr=1e-3, top_k=16), progress=False)  # default warm-up: 1 step
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)


def test_a_continued_run_reaches_the_weights_of_one_run_in_one_go(pair):
    """Stable phase in two pieces (snapshot at step 3, resumed to step 6) == six steps at once, same rows."""
    teacher, _, _, train, _ = pair
    cache = TeacherLogitCache.compute(teacher, train, 16, 1.0, 8, meta={"teacher_fingerprint": "abc"})
    whole = RetrainSettings(steps=6, batch_size=2, lr=1e-3, warmup_steps=2, decay_steps=0, top_k=16, seed=4)
    one_go = _student(pair)
    retrain(one_go, train, cache, whole, progress=False)
    piece = _student(pair)
    first = retrain(piece, train, cache, replace(whole, steps=4, decay_steps=1), progress=False, snapshot_at=3)
    assert first.snapshot is not None and first.snapshot.step == 3
    # the snapshot is the state before the decay step; the decayed weights are thrown away
    continued = _student(pair)
    retrain(continued, train, cache, whole, progress=False, resume=first.snapshot)
    for (name, a), b in zip(one_go.state_dict().items(), continued.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.allclose(piece.state_dict()["model.embed_tokens.weight"], one_go.state_dict()["model.embed_tokens.weight"])
