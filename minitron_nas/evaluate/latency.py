"""Inference speed of a model where it sits: prefill and decode throughput, medians of repeats.

A budget in parameters is a proxy; what users feel is how fast a prompt is read (prefill,
compute-bound) and how fast tokens come out (decode, one token per sequence per step
through the KV cache, memory-bound). `measure_latency` times both on random token ids
with the model's own cache, so two candidates can be compared on the hardware they will
serve on. Timings are bracketed by `torch.cuda.synchronize` on a GPU.
"""

from __future__ import annotations

import statistics
import time

import torch

from minitron_nas.errors import MinitronError
from minitron_nas.model.devices import model_device, model_dtype, synchronize, to_model_device


def _check(batch_size: int, context: int, new_tokens: int, repeats: int, warmup: int, limit: int | None) -> None:
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("context", context, 1),
        ("new_tokens", new_tokens, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise MinitronError(f"latency {name}={value!r} is invalid: use a whole number >= {least}")
    if limit is not None and context + new_tokens > limit:
        raise MinitronError(f"context {context} + new_tokens {new_tokens} exceeds the model's {limit} positions: measure a shorter context")


@torch.inference_mode()
def _generate(model, prompt: torch.Tensor, new_tokens: int, device: torch.device) -> tuple[float, float]:
    """(prefill seconds, decode seconds): one forward over [B, context], then `new_tokens` one-token steps."""
    synchronize(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)  # [B, 1], greedy
    synchronize(device)
    prefill = time.perf_counter() - start
    cache = out.cache  # the KV cache the prefill filled
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache = out.cache
        token = out.logits[:, -1:].argmax(-1)  # [B, 1]
    synchronize(device)
    return prefill, time.perf_counter() - start


def measure_latency(
    model,
    batch_size: int = 1,
    context: int = 512,
    new_tokens: int = 64,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> dict:
    """Prefill and decode speed of `model` on its device and in its dtype.

    Each repeat reads a [batch_size, context] prompt of random ids (prefill) and then
    generates `new_tokens` tokens per sequence greedily through the KV cache (decode);
    `warmup` untimed repeats come first (kernels, allocator). Returns medians over the
    repeats: prefill_tokens_per_s (batch * context / prefill time), decode_tokens_per_s
    (batch * new_tokens / decode time), prefill_ms, decode_ms_per_token (one step of the
    whole batch), the raw per-repeat seconds, the settings, device, dtype, and on CUDA the
    peak memory allocated (GiB). The model's train/eval mode is restored.
    """
    config = model.config
    _check(batch_size, context, new_tokens, repeats, warmup, getattr(config, "max_position_embeddings", None))
    device = model_device(model)
    generator = torch.Generator().manual_seed(seed)
    prompt = to_model_device(torch.randint(config.vocab_size, (batch_size, context), generator=generator), model)  # [B, context]
    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s, decode_s = [], []
    try:
        for _ in range(warmup):
            _generate(model, prompt, new_tokens, device)
        for _ in range(repeats):
            prefill, decode = _generate(model, prompt, new_tokens, device)
            prefill_s.append(prefill)
            decode_s.append(decode)
    finally:
        model.train(was_training)
    prefill, decode = statistics.median(prefill_s), statistics.median(decode_s)
    return {
        "prefill_tokens_per_s": batch_size * context / prefill,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "prefill_ms": prefill * 1e3,
        "decode_ms_per_token": decode / new_tokens * 1e3,
        "prefill_seconds": prefill_s,
        "decode_seconds": decode_s,
        "batch_size": batch_size,
        "context": context,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "warmup": warmup,
        "device": str(device),
        "dtype": str(model_dtype(model)).removeprefix("torch."),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
