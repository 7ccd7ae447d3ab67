"""Knowledge distillation: losses, a cache of the teacher's top-k logits, and the trainer.

The same code retrains short-listed candidates in the architecture search and runs the
full distillation stage (Minitron, Sec. 3: logit-only KD, forward KL, no CLM term by
default).

**Losses** live in `losses.py`.

**Cache.** `TeacherLogitCache` runs the teacher once over a fixed tensor of training
blocks and keeps, for every token, the top-k log-probabilities (float16) and their token
ids (int32): `n_blocks * seq_len * k * 6` bytes, e.g. 64 x 256 x 64 -> 6.3 MB for SmolLM2
(whose full float32 logits would take 64 * 256 * 49152 * 4 = 3.2 GB). It is saved as
safetensors plus a JSON of what it was made from (teacher fingerprint, SHA-256 of the
blocks, k, temperature, vocabulary size), and loading it for anything else is refused.

**Trainer.** `retrain` uses `accelerate.Accelerator`: the same code runs on CPU, on one
GPU or on several under `accelerate launch` (each process takes its slice of every global
batch; `batch_size` is per process and micro-batch). It trains where the student was
placed; a bf16/fp16 student trains with float32 master weights under autocast to its dtype
and is cast back at the end. The intermediate-state projection is prepared with the
student, so under several processes its gradients are averaged and clipped with them.
AdamW, linear warmup then cosine decay, gradient accumulation, gradient clipping, a data
order fixed by the seed. Every `eval_every` optimizer steps (and after the last) the held-out blocks are
scored and the value is passed to `report(step, value)`; an exception raised by `report`
(for instance an Optuna `TrialPruned`) propagates and stops training. Held-out sums are
gathered from every process (`gather_for_metrics`), so all report the same value.

Held-out metric: the KD loss against the teacher (the objective being trained, top-k when
`settings.top_k` is set) whenever teacher logits for the held-out blocks are available,
i.e. `heldout_cache` is given or `teacher` is given (its held-out top-k is then computed
once, in memory, before training); otherwise the held-out LM loss (next-token
cross-entropy). `RetrainResult.eval_metric` says which; the LM loss is recorded in every
case. Both are lower-is-better.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from .devices import (
    HALF,
    is_main_process,
    model_device,
    model_dtype,
    resolve_device,
    to_model_device,
)
from .errors import MinitronError
from .files import atomic_dir, check_writable
from .losses import clm_loss, kd_loss, kd_loss_topk
from .teachers import fingerprint

CACHE_TENSORS = "teacher_topk.safetensors"
CACHE_META = "teacher_topk.json"
CACHE_FORMAT = 1
_BYTES_PER_ENTRY = 6  # float16 log-probability + int32 token id


# --------------------------------------------------------------------------- cache


def blocks_sha256(blocks: torch.Tensor) -> str:
    """Hash of a [N, S] tensor of token ids (values and shape; dtype-independent)."""
    data = blocks.detach().to("cpu", torch.int64).contiguous()
    digest = hashlib.sha256(str(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def teacher_topk(teacher, input_ids: torch.Tensor, top_k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-softmax(logits / T) (float32) and token ids (int64) for a batch."""
    logits = teacher(input_ids=input_ids, use_cache=False).logits
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.topk(top_k, dim=-1, sorted=True)


_CHECKED = ("teacher_fingerprint", "blocks_sha256", "top_k", "temperature", "vocab_size", "n_blocks", "seq_len")


class TeacherLogitCache:
    """Teacher top-k log-probabilities [N, S, k] (float16) and ids [N, S, k] (int32) of fixed blocks.

    `cache[rows]` gives (logprobs, indices) for those block rows (int, slice, list or
    tensor). Size on disk and in memory: N * S * k * 6 bytes.
    """

    def __init__(self, logprobs: torch.Tensor, indices: torch.Tensor, meta: dict):
        if logprobs.shape != indices.shape or logprobs.dim() != 3:
            raise MinitronError(f"teacher cache tensors disagree ({tuple(logprobs.shape)} vs {tuple(indices.shape)}): rebuild it")
        self.logprobs = logprobs.to(torch.float16)
        self.indices = indices.to(torch.int32)
        self.meta = meta

    # --- properties
    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def temperature(self) -> float:
        return float(self.meta["temperature"])

    @property
    def blocks_hash(self) -> str:
        return self.meta["blocks_sha256"]

    @property
    def nbytes(self) -> int:
        return self.logprobs.numel() * _BYTES_PER_ENTRY

    @staticmethod
    def size_bytes(n_blocks: int, seq_len: int, top_k: int) -> int:
        """Bytes a cache of this shape takes: n_blocks * seq_len * top_k * 6."""
        return n_blocks * seq_len * top_k * _BYTES_PER_ENTRY

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def __getitem__(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(rows, list):
            rows = torch.tensor(rows, dtype=torch.long)
        return self.logprobs[rows], self.indices[rows]

    def __repr__(self) -> str:
        n, s, k = self.logprobs.shape
        return f"TeacherLogitCache({n} blocks x {s} tokens, k={k}, T={self.temperature}, {self.nbytes / 2**20:.1f} MiB)"

    # --- construction
    @classmethod
    def compute(
        cls,
        teacher_model,
        blocks: torch.Tensor,
        top_k: int,
        temperature: float = 1.0,
        batch_size: int = 8,
        meta: dict | None = None,
        progress: bool = False,
    ) -> TeacherLogitCache:
        """Run the teacher over `blocks` once and keep its top-k (in memory; `save` writes it)."""
        vocab = teacher_model.config.vocab_size
        if not 1 <= top_k <= vocab:
            raise MinitronError(f"top_k {top_k} is outside 1..{vocab} (the vocabulary): choose a k in that range")
        if temperature <= 0:
            raise MinitronError(f"temperature {temperature} must be positive: use e.g. 1.0")
        meta = dict(meta or {})
        if "teacher_fingerprint" not in meta:
            meta["teacher_fingerprint"] = fingerprint(teacher_model)
        was_training = teacher_model.training
        teacher_model.eval()
        values, ids = [], []
        start = time.perf_counter()
        try:
            for batch in tqdm(blocks.split(batch_size), desc="teacher top-k", disable=not progress, unit="batch"):
                v, i = teacher_topk(teacher_model, to_model_device(batch, teacher_model), top_k, temperature)  # [B, S, k]
                values.append(v.to("cpu", torch.float16))
                ids.append(i.to("cpu", torch.int32))
        finally:
            teacher_model.train(was_training)
        meta.update(
            format=CACHE_FORMAT,
            blocks_sha256=blocks_sha256(blocks),
            n_blocks=int(blocks.shape[0]),
            seq_len=int(blocks.shape[1]),
            top_k=int(top_k),
            temperature=float(temperature),
            vocab_size=int(vocab),
            seconds=round(time.perf_counter() - start, 2),
        )
        return cls(torch.cat(values), torch.cat(ids), meta)

    def save(self, folder: Path, overwrite: bool = False) -> None:
        """Write atomically: a temporary sibling folder, renamed when complete."""
        with atomic_dir(Path(folder), overwrite) as tmp:
            save_file({"logprobs": self.logprobs.contiguous(), "indices": self.indices.contiguous()}, str(tmp / CACHE_TENSORS))
            (tmp / CACHE_META).write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def build(
        cls,
        teacher_model,
        blocks: torch.Tensor,
        top_k: int,
        temperature: float,
        batch_size: int,
        folder: Path,
        meta: dict | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> TeacherLogitCache:
        """`compute` then `save` to `folder`. `meta` should carry `teacher_fingerprint`
        (from `Teacher.fingerprint`); without it the fingerprint is computed here."""
        check_writable(Path(folder), overwrite)  # fail before the teacher pass
        cache = cls.compute(teacher_model, blocks, top_k, temperature, batch_size, meta, progress)
        cache.save(Path(folder), overwrite)
        return cache

    @classmethod
    def load(cls, folder: Path, expected_meta: dict | None = None) -> TeacherLogitCache:
        """Load and check against `expected_meta`: any of teacher_fingerprint, blocks_sha256
        (or `blocks`, a tensor that is hashed), top_k, temperature, vocab_size, n_blocks,
        seq_len. A mismatch raises MinitronError."""
        folder = Path(folder)
        meta_file, tensor_file = folder / CACHE_META, folder / CACHE_TENSORS
        if not meta_file.is_file() or not tensor_file.is_file():
            raise MinitronError(f"no teacher logit cache in '{folder}': build it with TeacherLogitCache.build first")
        try:
            meta = json.loads(meta_file.read_text())
            tensors = load_file(str(tensor_file))
            cache = cls(tensors["logprobs"], tensors["indices"], meta)
        except MinitronError:
            raise
        except Exception as err:  # corrupt JSON or safetensors, missing tensor
            raise MinitronError(f"teacher logit cache in '{folder}' is corrupt ({type(err).__name__}): rebuild it") from None
        cache.check(expected_meta or {}, where=f"in '{folder}'")
        return cache

    @classmethod
    def load_or_build(
        cls,
        teacher_model,
        blocks: torch.Tensor,
        top_k: int,
        temperature: float,
        batch_size: int,
        folder: Path,
        meta: dict | None = None,
        progress: bool = False,
    ) -> TeacherLogitCache:
        """Reuse the cache in `folder` if it was made for exactly this; build it if absent.
        A cache there made for something else is refused, never silently replaced."""
        if Path(folder).exists():
            expected = {**(meta or {}), "blocks": blocks, "top_k": top_k, "temperature": temperature}
            if "teacher_fingerprint" not in expected:
                expected["teacher_fingerprint"] = fingerprint(teacher_model)
            return cls.load(folder, {k: v for k, v in expected.items() if k in _CHECKED or k == "blocks"})
        return cls.build(teacher_model, blocks, top_k, temperature, batch_size, folder, meta, progress=progress)

    def check(self, expected_meta: dict, where: str = "") -> None:
        expected = dict(expected_meta)
        if "blocks" in expected:
            blocks = expected.pop("blocks")
            expected["blocks_sha256"] = blocks_sha256(blocks)
            expected.setdefault("n_blocks", int(blocks.shape[0]))
            expected.setdefault("seq_len", int(blocks.shape[1]))
        for key in _CHECKED:
            if key not in expected or expected[key] is None:
                continue
            have, want = self.meta.get(key), expected[key]
            same = math.isclose(float(have), float(want)) if key == "temperature" and have is not None else have == want
            if not same:
                raise MinitronError(
                    f"teacher logit cache{' ' + where if where else ''} was made for {key}={have}, not {want}: "
                    "rebuild it for this teacher, these blocks and this k/temperature (or use another folder)"
                )

    def matches(self, blocks: torch.Tensor) -> bool:
        return tuple(blocks.shape) == (self.meta.get("n_blocks"), self.meta.get("seq_len")) and blocks_sha256(blocks) == self.blocks_hash


# --------------------------------------------------------------------------- trainer


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


@dataclass
class RetrainResult:
    curve: list[tuple[int, float]]  # (optimizer step, mean training loss of that step)
    eval_curve: list[tuple[int, float]]  # (step, held-out eval_metric); step 0 = before training
    eval_metric: str | None  # "kd" (vs teacher) or "lm" (next-token CE); None without held-out blocks
    eval_lm_curve: list[tuple[int, float]] = field(default_factory=list)  # held-out LM loss at the same steps
    tokens_seen: int = 0  # student tokens over all processes
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)

    @property
    def final_eval(self) -> float | None:
        return self.eval_curve[-1][1] if self.eval_curve else None


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


class IntermediateStates(torch.nn.Module):
    """L_is: distance between mapped hidden states, through a learned projection if widths differ.

    Pairs are (student layer i, teacher layer layer_map[i]) on the residual stream after each
    layer but the last (HF applies the final norm to the last hidden state), plus the
    embeddings. The projection starts as the channel selection (exact for a fresh prune).
    """

    def __init__(self, layer_map: list[int], student_hidden: int, teacher_hidden: int, channels=None, alpha=1.0, kind="nmse"):
        super().__init__()
        self.pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map[:-1])]
        self.alpha, self.kind = alpha, kind
        self.project = None
        if student_hidden != teacher_hidden:
            self.project = torch.nn.Linear(student_hidden, teacher_hidden, bias=False)
            with torch.no_grad():
                self.project.weight.zero_()
                kept = channels if channels is not None else torch.arange(student_hidden)
                self.project.weight[kept.long(), torch.arange(student_hidden)] = 1.0

    def forward(self, student_states, teacher_states) -> torch.Tensor:
        """alpha * `loss`: called as a module so that, prepared by accelerate, its gradients are averaged."""
        return self.alpha * self.loss(student_states, teacher_states)

    def loss(self, student_states, teacher_states) -> torch.Tensor:
        total = 0.0
        for s, t in self.pairs:
            h_s, h_t = student_states[s].float(), teacher_states[t].float()
            if self.project is not None:
                h_s = self.project(h_s)
            if self.kind == "cosine":
                total = total + (1 - F.cosine_similarity(h_s, h_t, dim=-1)).mean()
            else:
                total = total + ((h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-6)).mean()
        return total / len(self.pairs)


class Checkpoint:
    """Everything a resumed run needs to continue the same trajectory, written atomically.

    Model and projection weights (safetensors), optimizer and scheduler states, RNG states,
    the step (which fixes the data position: the row order is a function of the seed) and
    the curves so far. A checkpoint made with other settings is refused.
    """

    def __init__(self, folder: Path, settings: RetrainSettings, student=None, teacher=None, train_blocks=None):
        self.folder = Path(folder) / "checkpoint"
        self.signature = json.dumps(asdict(settings), sort_keys=True)
        # What the trajectory was made from: resuming it with any of them changed is refused.
        self.made_from = {
            "training data": None if train_blocks is None else blocks_sha256(train_blocks),
            "teacher": None if teacher is None else fingerprint(teacher),
            "student architecture": None if student is None else _architecture_of(student.config),
        }

    def exists(self) -> bool:
        return (self.folder / "state.pt").is_file()

    @staticmethod
    def saved_step(folder: Path) -> int | None:
        """The step of the checkpoint kept in `folder` (a run's distill folder), without loading it."""
        try:
            return int(json.loads((Path(folder) / "checkpoint" / "step.json").read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, step, model, extra, optimizer, scheduler, result) -> None:
        import random

        import numpy as np

        state = {
            "step": step,
            "signature": self.signature,
            "made_from": self.made_from,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
            "result": {"curve": result.curve, "eval_curve": result.eval_curve, "eval_lm_curve": result.eval_lm_curve, "tokens_seen": result.tokens_seen},
        }
        tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        if extra is not None:
            tensors.update({f"extra.{k}": v.detach().contiguous() for k, v in extra.state_dict().items()})
        try:
            with atomic_dir(self.folder, overwrite=True) as tmp:
                save_file(tensors, str(tmp / "weights.safetensors"))
                torch.save(state, tmp / "state.pt")
                (tmp / "step.json").write_text(json.dumps({"step": step}))
        except OSError as err:
            raise MinitronError(f"cannot write checkpoint to '{self.folder}' ({err.strerror}): free disk space or move the run") from None

    def verify(self) -> None:
        """Refuse, before any training, a checkpoint that is unreadable or was made from other inputs."""
        if self.exists():
            self._load(mmap=True)

    def _load(self, mmap: bool = False):
        try:
            state = torch.load(self.folder / "state.pt", weights_only=False, mmap=mmap)
            if mmap:  # the header only: its offsets must cover the file
                with safe_open(str(self.folder / "weights.safetensors"), "pt") as handle:
                    tensors = list(handle.keys())
            else:
                tensors = load_file(str(self.folder / "weights.safetensors"))
        except Exception as err:
            raise MinitronError(
                f"the checkpoint in '{self.folder}' is unreadable ({type(err).__name__}): delete it to start the distillation over"
            ) from None
        if state["signature"] != self.signature:
            raise MinitronError(f"the checkpoint in '{self.folder}' was made with other settings: use another folder or delete it")
        for what, have in state.get("made_from", {}).items():
            want = self.made_from.get(what)
            if have is not None and want is not None and have != want:
                raise MinitronError(
                    f"the checkpoint in '{self.folder}' was made for other {what} ({_short(have)}, now {_short(want)}): "
                    "resume with the original, or delete the checkpoint to start over"
                )
        return state, tensors

    def restore(self, model, extra, optimizer, scheduler, result) -> int:
        import random

        import numpy as np

        state, tensors = self._load()
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        if extra is not None:
            extra.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("extra.")})
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        for key, value in state["result"].items():
            setattr(result, key, [tuple(p) for p in value] if isinstance(value, list) else value)
        return state["step"]


def _architecture_of(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")
    return {key: getattr(config, key, None) for key in keys}


def _short(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if v is not None)
    return str(value)


def make_accelerator(device: str | torch.device | None = None):
    """An Accelerator on `device` (default: this process's GPU, else the CPU); one per process.

    Mixed precision is not asked of accelerate: `retrain` autocasts to the student's own
    dtype (bf16 students train with float32 master weights), so the dtype chosen for the
    teacher is the one every stage computes in. Under `accelerate launch` each process
    takes its local GPU; alone, `cuda:N` becomes the current GPU, which accelerate uses.
    """
    from accelerate import Accelerator

    device = resolve_device("auto" if device is None else device)
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(device)
    try:
        accelerator = Accelerator(cpu=device.type == "cpu")
    except ValueError as err:  # accelerate's state is per process and was set up for another device
        raise MinitronError(f"cannot train on {device} in this process ({str(err).splitlines()[0][:120]}): run one device per process") from None
    if accelerator.device.type != device.type:
        raise MinitronError(
            f"accelerate runs this process on {accelerator.device}, the model is on {device}: "
            "pass the same --device to every stage of one process"
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
    topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    teacher=None,
    intermediate: IntermediateStates | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, KD part) of one micro-batch: clm_weight * CE + KD (+ alpha * L_is).

    The teacher signal is `topk` (cached log-probs and ids) if given, else the live
    `teacher` (its top-k if settings.top_k, else full-vocabulary KD); with neither, CE only.
    With `intermediate` (live teacher only), hidden states of mapped layer pairs add a loss.
    """
    if intermediate is not None:
        out = student(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        with torch.no_grad():
            t_out = teacher(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        kd = kd_loss(out.logits, t_out.logits, settings.temperature)
        total = kd + intermediate(out.hidden_states, t_out.hidden_states)  # alpha * L_is
        if settings.clm_weight:
            total = total + settings.clm_weight * clm_loss(out.logits, input_ids)
        return total, kd.detach()
    logits = student(input_ids=input_ids, use_cache=False).logits
    if topk is not None:
        kd = kd_loss_topk(logits, topk[0], topk[1], settings.temperature)
    elif teacher is not None:
        if settings.top_k is not None:
            values, ids = teacher_topk(teacher, input_ids, settings.top_k, settings.temperature)
            kd = kd_loss_topk(logits, values, ids, settings.temperature)
        else:
            with torch.no_grad():
                t_logits = teacher(input_ids=input_ids, use_cache=False).logits
            kd = kd_loss(logits, t_logits, settings.temperature)
    else:
        kd = logits.new_zeros((), dtype=torch.float32)
    total = kd if settings.clm_weight == 0 else kd + settings.clm_weight * clm_loss(logits, input_ids)
    return total, kd.detach()


def _row_stream(n: int, seed: int):
    """Block rows in a fixed order: one seeded permutation per epoch, epochs concatenated."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


@torch.no_grad()
def _evaluate(model, blocks, heldout_topk, teacher, settings, accelerator, dtype=torch.float32) -> tuple[float | None, float]:
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
                kd = None
                if heldout_topk is not None:
                    lp, ix = heldout_topk[chunk]
                    kd = kd_loss_topk(logits, *to_model_device((lp, ix), model), settings.temperature)
                elif teacher is not None:  # full-vocabulary KD, live
                    kd = kd_loss(logits, teacher(input_ids=ids, use_cache=False).logits, settings.temperature)
            if kd is not None:
                totals[0] += kd.item() * ids.numel()
            totals[1] += clm_loss(logits, ids).item() * ids[:, 1:].numel()
            totals[2] += ids.numel()
            totals[3] += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    per_process = accelerator.gather_for_metrics(torch.tensor([totals], dtype=torch.float64, device=device))  # [P, 4]
    totals = per_process.reshape(-1, 4).sum(0).tolist()
    has_kd = heldout_topk is not None or teacher is not None
    return (totals[0] / totals[2] if has_kd else None), totals[1] / totals[3]


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
    report: Callable[[int, float], None] | None = None,
    heldout_cache: TeacherLogitCache | None = None,
    accelerator=None,
    progress: bool = True,
    intermediate: IntermediateStates | None = None,
    checkpoint: Checkpoint | None = None,
) -> RetrainResult:
    """Distill into `student` (trained in place; left in eval mode) for `settings.steps` steps.

    Teacher signal: `cache` (top-k of the teacher over exactly `train_blocks`) if given,
    else the live `teacher` each step. `report(step, value)` receives the held-out metric
    after every `eval_every` steps and after the last (not at step 0, which is only
    recorded); it runs on every process with the same value, and whatever it raises
    propagates. A non-finite loss or gradient raises MinitronError; the student is then
    partly trained and should be discarded.
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
    if heldout_blocks is not None and heldout_cache is None and teacher is not None and settings.top_k is not None:
        heldout_cache = TeacherLogitCache.compute(
            teacher, heldout_blocks, settings.top_k, settings.temperature, settings.batch_size, meta={"teacher_fingerprint": "live"}
        )
    if heldout_cache is not None:
        if heldout_blocks is None or not heldout_cache.matches(heldout_blocks):
            raise MinitronError("heldout_cache was not made for heldout_blocks: build it from exactly those blocks")
        _check_cache_settings(heldout_cache, settings, vocab, "held-out")
    metric = None if heldout_blocks is None else ("kd" if (heldout_cache is not None or teacher is not None) else "lm")

    dtype = model_dtype(student)  # half students train with float32 master weights under autocast
    # before the optimizer: fused AdamW needs its parameters' device
    student.to(device, torch.float32 if dtype in HALF else dtype)
    optimizer = make_optimizer(student, settings)
    if intermediate is not None:
        if teacher is None:
            raise MinitronError("intermediate-state distillation needs the live teacher: pass teacher=")
        intermediate.to(device)
        if intermediate.project is not None:
            optimizer.add_param_group({"params": list(intermediate.project.parameters())})

    # Not prepared: accelerate would step a prepared scheduler once per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)
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
    bar = tqdm(total=settings.steps, desc="retrain", unit="step", disable=not (progress and accelerator.is_main_process))
    start = time.perf_counter()
    first = 1
    if checkpoint is not None and checkpoint.exists():
        first = checkpoint.restore(accelerator.unwrap_model(model), intermediate, optimizer, scheduler, result) + 1
        for _ in range(per_step * processes * settings.grad_accum * (first - 1)):
            next(stream)  # the data position follows from the step
        bar.update(first - 1)

    def evaluate(step: int, call_report: bool) -> None:
        kd, lm = _evaluate(model, heldout_blocks, heldout_cache, teacher if settings.top_k is None else None, settings, accelerator, dtype)
        value = kd if metric == "kd" else lm
        result.eval_curve.append((step, value))
        result.eval_lm_curve.append((step, lm))
        if call_report and report is not None:
            report(step, value)

    try:
        if heldout_blocks is not None and first == 1:
            evaluate(0, call_report=False)
        model.train()
        for step in range(first, settings.steps + 1):
            step_loss = torch.zeros((), dtype=torch.float32, device=device)
            for micro in range(settings.grad_accum):
                global_rows = [next(stream) for _ in range(per_step * processes)]
                rows = torch.tensor(global_rows[rank * per_step : (rank + 1) * per_step])
                ids = to_model_device(train_blocks[rows], model)  # [B, S]
                topk = None
                if cache is not None:
                    topk = to_model_device(cache[rows], model)  # ([B, S, k] log-probs, [B, S, k] ids)
                with contextlib.ExitStack() as sync:
                    if micro < settings.grad_accum - 1:  # gradients are averaged on the last micro-batch only
                        sync.enter_context(accelerator.no_sync(model))
                        if projection is not intermediate:
                            sync.enter_context(accelerator.no_sync(projection))
                    with _autocast(accelerator, dtype):
                        loss, _ = batch_loss(model, ids, settings, topk, teacher if cache is None else None, projection)
                    if not _all_finite(loss, accelerator):
                        raise MinitronError(_nan_message(step, settings))
                    accelerator.backward(loss / settings.grad_accum)
                step_loss += loss.detach().float() / settings.grad_accum
            if settings.max_grad_norm is not None:
                norm = accelerator.clip_grad_norm_(clipped, settings.max_grad_norm)  # student and projection
                if not _all_finite(torch.as_tensor(norm), accelerator):
                    raise MinitronError(_nan_message(step, settings))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if processes > 1:
                step_loss = accelerator.reduce(step_loss, "mean")
            result.curve.append((step, float(step_loss)))
            result.tokens_seen += per_step * processes * settings.grad_accum * seq_len
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix(loss=f"{float(step_loss):.4f}", tok_s=f"{result.tokens_seen / max(elapsed, 1e-9):.0f}")
            if heldout_blocks is not None and (
                step == settings.steps or (settings.eval_every and step % settings.eval_every == 0)
            ):
                evaluate(step, call_report=True)
            if checkpoint is not None and accelerator.is_main_process and (
                step == settings.steps or step % settings.checkpoint_every == 0
            ):
                checkpoint.save(step, accelerator.unwrap_model(model), intermediate, optimizer, scheduler, result)
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


def _nan_message(step: int, settings: RetrainSettings) -> str:
    return (
        f"loss became NaN/inf at step {step}: lower the learning rate (lr={settings.lr:g}) "
        "or raise warmup_steps, and check that the student produces finite logits"
    )


def _check_cache_settings(cache: TeacherLogitCache, settings: RetrainSettings, vocab: int, which: str) -> None:
    if settings.top_k is None:
        raise MinitronError(f"a {which} teacher cache holds top-{cache.top_k} logits but settings ask for full-vocabulary KD (top_k=None): set top_k={cache.top_k} or drop the cache")
    if cache.top_k != settings.top_k:
        raise MinitronError(f"the {which} teacher cache holds top-{cache.top_k}, settings ask for top_k={settings.top_k}: rebuild it or change top_k")
    if not math.isclose(cache.temperature, settings.temperature):
        raise MinitronError(
            f"the {which} teacher cache was made at temperature {cache.temperature}, settings ask for {settings.temperature}: "
            "rebuild it at that temperature"
        )
    if cache.meta.get("vocab_size") not in (None, vocab):
        raise MinitronError(f"the {which} teacher cache is for a vocabulary of {cache.meta['vocab_size']}, the student has {vocab}: use the student's teacher")


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
        _check_cache_settings(cache, settings, vocab, "training")
    elif teacher is not None and settings.top_k is not None and settings.top_k > vocab:
        raise MinitronError(f"top_k {settings.top_k} exceeds the vocabulary ({vocab}): choose a smaller k or None")
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise MinitronError(f"teacher vocabulary {teacher.config.vocab_size} differs from the student's {vocab}: distill within one tokenizer")


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
    checkpoint = Checkpoint(folder, settings, student, teacher, train_blocks)
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
        tmp = folder / ".curve.json.partial"
        tmp.write_text(json.dumps(curve))
        tmp.replace(folder / "curve.json")
    return result
