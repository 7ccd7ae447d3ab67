"""A cache of the teacher's top-k logits over fixed training blocks.

`TeacherLogitCache` runs the teacher once over a fixed tensor of training blocks and keeps,
for every token, the top-k log-probabilities (float16) and their token ids (int32):
`n_blocks * seq_len * k * 6` bytes, e.g. 64 x 256 x 64 -> 6.3 MB for SmolLM2 (whose full
float32 logits would take 64 * 256 * 49152 * 4 = 3.2 GB). It is saved as safetensors plus a
JSON of what it was made from (teacher fingerprint, SHA-256 of the blocks, k, temperature,
vocabulary size), and loading it for anything else is refused. A cached step costs about
0.68x a live-teacher step on the real teacher (reports/benchmarks/distill.md).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minitron_nas.errors import MinitronError
from minitron_nas.files import check_writable
from minitron_nas.model.devices import to_model_device
from minitron_nas.model.saving import load_tensors, save_tensors
from minitron_nas.model.teachers import fingerprint
from minitron_nas.provenance import refuse_if_changed

__all__ = ["TeacherLogitCache", "blocks_sha256", "teacher_topk"]

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
            raise MinitronError(f"teacher cache tensors disagree: {tuple(logprobs.shape)} vs {tuple(indices.shape)}")
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
        save_tensors(folder, {"logprobs": self.logprobs, "indices": self.indices}, self.meta, CACHE_TENSORS, CACHE_META, overwrite)

    @classmethod
    def load(cls, folder: Path, expected_meta: dict | None = None) -> TeacherLogitCache:
        """Load and check against `expected_meta`: any of teacher_fingerprint, blocks_sha256
        (or `blocks`, a tensor that is hashed), top_k, temperature, vocab_size, n_blocks,
        seq_len. A mismatch raises MinitronError."""
        rebuild = "delete the folder to rebuild it from the teacher, then rerun"
        corrupt = f"the teacher logit cache in '{folder}' is corrupt ({{why}}): {rebuild}"
        meta, tensors = load_tensors(folder, CACHE_TENSORS, CACHE_META, f"no teacher logit cache in '{folder}' (a file is missing): {rebuild}", corrupt)
        try:
            cache = cls(tensors["logprobs"], tensors["indices"], meta)
        except Exception as err:  # a missing tensor, tensors that disagree
            raise MinitronError(corrupt.replace("{why}", str(err) if isinstance(err, MinitronError) else type(err).__name__)) from None
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
        """Reuse the cache in `folder` if it was made for exactly this; else `compute` and save it there.

        A cache there made for something else is refused, never silently replaced. `meta`
        should carry `teacher_fingerprint` (from `Teacher.fingerprint`); without it the
        fingerprint is computed here."""
        folder = Path(folder)
        if folder.exists():
            expected = {**(meta or {}), "blocks": blocks, "top_k": top_k, "temperature": temperature}
            if "teacher_fingerprint" not in expected:
                expected["teacher_fingerprint"] = fingerprint(teacher_model)
            return cls.load(folder, {k: v for k, v in expected.items() if k in _CHECKED or k == "blocks"})
        check_writable(folder, overwrite=False)  # fail before the teacher pass
        cache = cls.compute(teacher_model, blocks, top_k, temperature, batch_size, meta, progress)
        cache.save(folder)
        return cache

    def check(self, expected_meta: dict, where: str = "") -> None:
        expected = dict(expected_meta)
        if "blocks" in expected:
            blocks = expected.pop("blocks")
            expected["blocks_sha256"] = blocks_sha256(blocks)
            expected.setdefault("n_blocks", int(blocks.shape[0]))
            expected.setdefault("seq_len", int(blocks.shape[1]))
        refuse_if_changed(
            f"teacher logit cache{' ' + where if where else ''}",
            self.meta,
            expected,
            "rebuild it for this teacher, these blocks and this k/temperature (or use another folder)",
            keys=_CHECKED,
        )

    def matches(self, blocks: torch.Tensor) -> bool:
        return tuple(blocks.shape) == (self.meta.get("n_blocks"), self.meta.get("seq_len")) and blocks_sha256(blocks) == self.blocks_hash
