"""measure_latency: what it times and what it reports (how fast is measured by the benchmarks)."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_model

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.latency import measure_latency


def test_times_one_prefill_and_one_step_per_new_token():
    model = tiny_model("llama").train()
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        result = measure_latency(model, batch_size=2, context=16, new_tokens=5, repeats=3, warmup=1)
    finally:
        handle.remove()
    assert calls == ([(2, 16)] + [(2, 1)] * 5) * 4  # (warmup + repeats) x (prefill + 5 decode steps)
    assert model.training  # mode restored
    assert len(result["prefill_seconds"]) == len(result["decode_seconds"]) == 3
    median_decode = sorted(result["decode_seconds"])[1]
    assert result["decode_tokens_per_s"] == pytest.approx(2 * 5 / median_decode)
    assert result["decode_ms_per_token"] == pytest.approx(median_decode / 5 * 1e3)
    assert result["prefill_tokens_per_s"] == pytest.approx(2 * 16 / sorted(result["prefill_seconds"])[1])
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["peak_memory_gib"] is None


def test_every_part_is_reported_once_per_repeat_and_positive():
    """What a benchmark compares is there and sane; how fast it is belongs to the benchmarks, not to tests."""
    settings = dict(batch_size=3, context=8, new_tokens=4, repeats=4, warmup=0)
    result = measure_latency(tiny_model("llama"), **settings)
    assert {key: result[key] for key in settings} == settings
    assert len(result["prefill_seconds"]) == len(result["decode_seconds"]) == 4
    assert all(seconds > 0 for seconds in result["prefill_seconds"] + result["decode_seconds"])
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_ms", "decode_ms_per_token"):
        assert result[key] > 0, key


def test_bf16_model_is_measured_in_bf16():
    assert measure_latency(tiny_model("llama").to(torch.bfloat16), context=8, new_tokens=2, repeats=1)["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"repeats": 0}, "repeats=0"),
        ({"context": -1}, "context=-1"),
        ({"new_tokens": 1.5}, "new_tokens=1.5"),
        ({"context": 120, "new_tokens": 16}, "exceeds the model's 128 positions"),
    ],
)
def test_bad_settings_are_refused(kwargs, fragment):
    with pytest.raises(MinitronError, match=fragment):
        measure_latency(tiny_model("llama"), **kwargs)
