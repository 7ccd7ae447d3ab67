"""The trainer: distill a student from the teacher's logits (cached or live) with accelerate.

The same code retrains candidates in the architecture search and runs the full
distillation stage (Minitron, Sec. 3: logit-only KD, forward KL, no CLM term by default).

`retrain` uses `accelerate.Accelerator`: the same code runs on CPU, on one GPU or on several
under `accelerate launch` (each process takes its slice of every global batch; `batch_size`
is per process and micro-batch). It trains where the student was placed; a bf16/fp16
student trains with float32 master weights under autocast to its dtype and is cast back at
the end. The intermediate-state projection is prepared with the student, so under several
processes its gradients are averaged and clipped with them. AdamW, linear warm-up, flat,
then a cosine decay (`RetrainSettings.lr_factor`: no step has a learning rate of 0), gradient
accumulation, gradient clipping, a data order fixed by the seed. A run can stop at a step
and hand back its state (`snapshot_at` -> `RetrainResult.snapshot`), and another can continue
from it (`resume=`): the search trains a candidate's stable phase once across its rungs.
Every `eval_every` optimizer steps (and after the last) the held-out blocks are scored.
Held-out sums are gathered from every process (`gather_for_metrics`), so all record the
same value. With a `Checkpoint`, the state is saved through accelerate's
`save_state` every `checkpoint.every` steps and a rerun continues from it.

Held-out metric: the KD loss against the teacher (the objective being trained, top-k when
`settings.top_k` is set) whenever `teacher` is given (its held-out top-k is then computed
once, in memory, before training); otherwise the held-out LM loss (next-token
cross-entropy). `RetrainResult.eval_metric` says which; the LM loss is recorded in every
case. Both are lower-is-better.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from minitron_nas.config.settings import RetrainSettings
from minitron_nas.distill.checkpoint import Checkpoint, Progress
from minitron_nas.distill.losses import IntermediateStates, clm_loss, kd_loss
from minitron_nas.distill.signals import TeacherSignal, live_teacher, teacher_signal
from minitron_nas.distill.teacher_cache import TeacherLogitCache, blocks_sha256
from minitron_nas.errors import MinitronError
from minitron_nas.model.devices import HALF, model_device, model_dtype, resolve_device, to_model_device

__all__ = ["RetrainResult", "RetrainSettings", "TrainState", "batch_loss", "make_accelerator", "make_optimizer", "retrain"]


@dataclass
class TrainState:
    """Where a run stood after optimizer step `step`: float32 weights and AdamW's state (on the CPU)."""

    step: int
    model: dict
    optimizer: dict


@dataclass
class RetrainResult:
    curve: list[tuple[int, float]]  # (optimizer step, mean training loss of that step)
    eval_curve: list[tuple[int, float]]  # (step, held-out eval_metric); step 0 = before training
    eval_metric: str | None  # "kd" (vs teacher) or "lm" (next-token CE); None without held-out blocks
    eval_lm_curve: list[tuple[int, float]] = field(default_factory=list)  # held-out LM loss at the same steps
    tokens_seen: int = 0  # student tokens over all processes
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    snapshot: TrainState | None = None  # the state at `snapshot_at`, when asked for


def make_accelerator(device: str | torch.device | None = None):
    """An Accelerator on `device` (default: this process's GPU, else the CPU); one per process.

    Mixed precision is not asked of accelerate: `retrain` autocasts to the student's own
    dtype (bf16 students train with float32 master weights), so the dtype chosen for the
    teacher is the one every stage computes in. Under `accelerate launch` each process
    takes its local GPU; alone, `cuda:N` becomes the current GPU, which accelerate uses.
    """
    device = resolve_device("auto" if device is None else device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    try:
        accelerator = Accelerator(cpu=device.type == "cpu")
    except ValueError as err:  # accelerate's state is per process and was set up for another device
        raise MinitronError(f"cannot train on {device} in this process ({str(err).splitlines()[0][:120]}): run one device per process") from None
    if accelerator.device.type != device.type:
        raise MinitronError(
            f"accelerate runs this process on {accelerator.device}, the model is on {device}: pass the same --device to every stage of one process"
        )
    return accelerator


def _autocast(accelerator, dtype: torch.dtype):
    """Autocast to a half `dtype` (bf16/fp16 students), else whatever the accelerator was set up for."""
    if dtype in HALF:
        return torch.autocast(device_type=accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


def make_optimizer(model, settings: RetrainSettings) -> torch.optim.Optimizer:
    """AdamW over all parameters; the fused kernel where the device has one (CPU and CUDA do)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused AdamW
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def batch_loss(
    student,
    input_ids: torch.Tensor,
    settings: RetrainSettings,
    signal: TeacherSignal,
    rows: torch.Tensor | None = None,
    intermediate: IntermediateStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KD part) of one micro-batch: clm_weight * CE + KD (+ alpha * L_is).

    KD comes from `signal` (signals.py); `rows` are the micro-batch's rows in the training
    blocks (what a cached signal looks up). With `intermediate`, hidden states of mapped
    layer pairs add a loss; that needs a live teacher.
    """
    if intermediate is not None:
        teacher = live_teacher(signal)
        out = student(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        kd = kd_loss(out.logits, t_out.logits, settings.temperature)
        total = kd + intermediate(out.hidden_states, t_out.hidden_states)  # alpha * L_is
        if settings.clm_weight:
            total = total + settings.clm_weight * clm_loss(out.logits, input_ids)
        return total, kd.detach()
    logits = student(input_ids=input_ids, use_cache=False).logits  # [B, S, V]
    kd = signal.kd(logits, input_ids, rows, settings.temperature)
    total = kd if settings.clm_weight == 0 else kd + settings.clm_weight * clm_loss(logits, input_ids)
    return total, kd.detach()


def _row_stream(n: int, seed: int):
    """Block rows in a fixed order: one seeded permutation per epoch, epochs concatenated."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


@torch.no_grad()
def _evaluate(model, blocks, signal: TeacherSignal | None, settings, accelerator, dtype=torch.float32) -> tuple[float | None, float]:
    """(held-out KD loss or None, held-out LM loss), token-weighted over all processes.

    Each process scores its share of the blocks; the per-process sums are gathered
    (`gather_for_metrics`) and added, so every process returns the same values.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    rows = torch.arange(len(blocks))[accelerator.process_index :: accelerator.num_processes]
    totals = [0.0, 0.0, 0.0, 0.0]  # kd * tokens, ce * targets, tokens, targets
    try:
        for chunk in rows.split(settings.batch_size):
            ids = to_model_device(blocks[chunk], model)  # [B, S]
            with _autocast(accelerator, dtype):
                logits = model(input_ids=ids, use_cache=False).logits
                kd = None if signal is None else signal.kd(logits, ids, chunk, settings.temperature)
            if kd is not None:
                totals[0] += kd.item() * ids.numel()
            totals[1] += clm_loss(logits, ids).item() * ids[:, 1:].numel()
            totals[2] += ids.numel()
            totals[3] += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    per_process = accelerator.gather_for_metrics(torch.tensor([totals], dtype=torch.float64, device=device))  # [P, 4]
    totals = per_process.reshape(-1, 4).sum(0).tolist()
    return (totals[0] / totals[2] if signal is not None else None), totals[1] / totals[3]


def _all_finite(value: torch.Tensor, accelerator) -> bool:
    bad = (~torch.isfinite(value.detach().float())).any().float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")  # every process raises together, none hangs
    return not bool(bad.item())


def retrain(
    student,
    train_blocks: torch.Tensor,
    cache: TeacherLogitCache | None,
    settings: RetrainSettings,
    heldout_blocks: torch.Tensor | None = None,
    teacher=None,
    accelerator=None,
    progress: bool = True,
    intermediate: IntermediateStates | None = None,
    checkpoint: Checkpoint | None = None,
    resume: TrainState | None = None,
    snapshot_at: int | None = None,
) -> RetrainResult:
    """Distill into `student` (trained in place; left in eval mode) for `settings.total_steps` steps.

    With `resume`, the student takes its weights and AdamW its state from there and training
    goes on at the next step, on the rows a run in one go would have seen then. With
    `snapshot_at`, the state right after that step is kept in `result.snapshot`.

    Teacher signal: `cache` (top-k of the teacher over exactly `train_blocks`) if given,
    else the live `teacher` each step. A non-finite loss or gradient raises MinitronError;
    the student is then partly trained and should be discarded.
    """
    if accelerator is None:
        accelerator = make_accelerator(model_device(student))  # train where the student was placed
    if accelerator.gradient_accumulation_steps != 1:
        raise MinitronError("pass an Accelerator with gradient_accumulation_steps=1: retrain accumulates via settings.grad_accum")
    vocab = student.config.vocab_size
    _check_inputs(train_blocks, cache, settings, teacher, vocab)
    device = accelerator.device
    if teacher is not None:
        teacher.to(device).eval()
    heldout_cache = None
    if heldout_blocks is not None and teacher is not None and settings.top_k is not None:
        heldout_cache = TeacherLogitCache.compute(
            teacher, heldout_blocks, settings.top_k, settings.temperature, settings.batch_size, meta={"teacher_fingerprint": "live"}
        )
    metric = None if heldout_blocks is None else ("kd" if teacher is not None else "lm")
    signal = teacher_signal(cache, teacher, settings.top_k)  # what each training step learns from
    heldout_signal = None if metric != "kd" else teacher_signal(heldout_cache, teacher)

    dtype = model_dtype(student)  # half students train with float32 master weights under autocast
    # before the optimizer: fused AdamW needs its parameters' device
    student.to(device, torch.float32 if dtype in HALF else dtype)
    if resume is not None:
        if not 0 < resume.step < settings.total_steps:
            raise MinitronError(f"cannot resume at step {resume.step} of a {settings.total_steps}-step run: continue from an earlier step")
        student.load_state_dict(resume.model)
    optimizer = make_optimizer(student, settings)
    if intermediate is not None:
        if teacher is None:
            raise MinitronError("intermediate-state distillation needs the live teacher: pass teacher=")
        intermediate.to(device)
        if intermediate.project is not None:
            optimizer.add_param_group({"params": list(intermediate.project.parameters())})

    if intermediate is not None and intermediate.project is not None:
        # Prepared with the model (DDP-wrapped under several processes): its gradients are averaged like the student's.
        model, projection, optimizer = accelerator.prepare(student, intermediate, optimizer)
    else:
        model, optimizer = accelerator.prepare(student, optimizer)
        projection = intermediate  # None, or nothing to learn: nothing to average
    clipped = list(model.parameters()) + (list(projection.parameters()) if projection is not None else [])
    result = RetrainResult(curve=[], eval_curve=[], eval_metric=metric, settings=asdict(settings))
    processes, rank, per_step = accelerator.num_processes, accelerator.process_index, settings.batch_size
    stream = _row_stream(len(train_blocks), settings.seed)
    seq_len = train_blocks.shape[1]
    first = 1
    if checkpoint is not None:
        # Saved and restored by accelerate with the prepared model(s) and optimizer; the learning rate follows from the step.
        accelerator.register_for_checkpointing(Progress(result))
    if checkpoint is not None and checkpoint.exists():  # before the progress bar: a refusal is one clean line
        first = checkpoint.restore(accelerator) + 1
    elif resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        first = resume.step + 1
    for _ in range(per_step * processes * settings.grad_accum * (first - 1)):
        next(stream)  # the data position follows from the step
    bar = tqdm(total=settings.total_steps, initial=first - 1, desc="retrain", unit="step", disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        kd, lm = _evaluate(model, heldout_blocks, heldout_signal, settings, accelerator, dtype)
        result.eval_curve.append((step, kd if metric == "kd" else lm))
        result.eval_lm_curve.append((step, lm))

    try:
        if heldout_blocks is not None and first == 1:
            evaluate(0)
        model.train()
        for step in range(first, settings.total_steps + 1):
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * settings.lr_factor(step)
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(settings.grad_accum):
                global_rows = [next(stream) for _ in range(per_step * processes)]
                rows = torch.tensor(global_rows[rank * per_step : (rank + 1) * per_step])
                ids = to_model_device(train_blocks[rows], model)  # [B, S]
                with contextlib.ExitStack() as sync:
                    if micro < settings.grad_accum - 1:  # gradients are averaged on the last micro-batch only
                        sync.enter_context(accelerator.no_sync(model))
                        if projection is not intermediate:
                            sync.enter_context(accelerator.no_sync(projection))
                    with _autocast(accelerator, dtype):
                        loss, _ = batch_loss(model, ids, settings, signal, rows, projection)
                    if not _all_finite(loss, accelerator):
                        raise MinitronError(_nan_message(step, settings))
                    accelerator.backward(loss / settings.grad_accum)
                step_loss += loss.detach().float() / settings.grad_accum
            if settings.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(clipped, settings.max_grad_norm)  # student and projection
                if not _all_finite(torch.as_tensor(norm), accelerator):
                    raise MinitronError(_nan_message(step, settings))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == snapshot_at:
                weights = {k: v.detach().to("cpu", copy=True) for k, v in accelerator.unwrap_model(model).state_dict().items()}
                result.snapshot = TrainState(step, weights, _to_cpu(copy.deepcopy(optimizer.state_dict())))
            if processes > 1:
                step_loss = accelerator.reduce(step_loss, "mean")
            result.curve.append((step, float(step_loss)))
            result.tokens_seen += per_step * processes * settings.grad_accum * seq_len
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{float(step_loss):.4f}", tok_s=f"{result.tokens_seen / max(elapsed, 1e-9):.0f}")
            if heldout_blocks is not None and (step == settings.total_steps or (settings.eval_every and step % settings.eval_every == 0)):
                evaluate(step)
            if checkpoint is not None and accelerator.is_main_process and checkpoint.due(step, settings.total_steps):
                checkpoint.save(step, accelerator, result)
    finally:
        bar.close()
        result.seconds = time.perf_counter() - start
        optimizer.zero_grad(set_to_none=True)
        accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # restore the plain forward
        if dtype in HALF:
            student.to(dtype)  # back to the dtype it came in (and is scored and saved) in
        student.eval()
        accelerator.free_memory()
    return result


def _to_cpu(state):
    """An optimizer state dict with every tensor moved to the CPU (kept off the accelerator between rungs)."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _to_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_to_cpu(v) for v in state]
    return state


def _nan_message(step: int, settings: RetrainSettings) -> str:
    return (
        f"loss became NaN/inf at step {step}: lower the learning rate (lr={settings.lr:g}) "
        "or raise warmup_steps, and check that the student produces finite logits"
    )


def _check_cache_settings(cache: TeacherLogitCache, settings: RetrainSettings, vocab: int) -> None:
    if settings.top_k is None:
        raise MinitronError(
            f"a training teacher cache holds top-{cache.top_k} logits but settings ask for full-vocabulary KD (top_k=None): set top_k={cache.top_k} or drop the cache"
        )
    if cache.top_k != settings.top_k:
        raise MinitronError(f"the training teacher cache holds top-{cache.top_k}, settings ask for top_k={settings.top_k}: rebuild it or change top_k")
    if not math.isclose(cache.temperature, settings.temperature):
        raise MinitronError(
            f"the training teacher cache was made at temperature {cache.temperature}, settings ask for {settings.temperature}: rebuild it at that temperature"
        )
    if cache.meta.get("vocab_size") not in (None, vocab):
        raise MinitronError(f"the training teacher cache is for a vocabulary of {cache.meta['vocab_size']}, the student has {vocab}: use the student's teacher")


def _check_inputs(train_blocks, cache, settings, teacher, vocab) -> None:
    if train_blocks.dim() != 2 or len(train_blocks) == 0:
        raise MinitronError(f"training blocks must be a non-empty [n, seq_len] tensor, got shape {tuple(train_blocks.shape)}")
    if cache is None and teacher is None and settings.clm_weight == 0:
        raise MinitronError("nothing to learn from: give a teacher logit cache, a teacher, or clm_weight > 0")
    if cache is not None:
        if not cache.matches(train_blocks):
            raise MinitronError(
                f"the teacher cache ({cache.meta.get('n_blocks')} blocks, {cache.blocks_hash}) was not made for these "
                f"training blocks ({len(train_blocks)} blocks, {blocks_sha256(train_blocks)}): build it from exactly these blocks"
            )
        _check_cache_settings(cache, settings, vocab)
    elif teacher is not None and settings.top_k is not None and settings.top_k > vocab:
        raise MinitronError(f"top_k {settings.top_k} exceeds the vocabulary ({vocab}): choose a smaller k or None")
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise MinitronError(f"teacher vocabulary {teacher.config.vocab_size} differs from the student's {vocab}: distill within one tokenizer")
