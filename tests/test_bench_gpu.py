"""bench/bench_gpu.py: refuses a missing GPU in one line; its whole path runs on a tiny config (on a GPU where there is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_gpu.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: nothing to refuse")
def test_cuda_without_a_gpu_is_refused_in_one_line():
    done = bench("--device", "cuda")
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --device cuda"), done.stderr


def run_tiny(tmp_path: Path, device: str, base: str, **sizes) -> tuple[subprocess.CompletedProcess, str]:
    """Every part of the benchmark on `base`'s public config shrunk to `sizes` (SmolLM2's tokenizer ids fit)."""
    config = json.loads((REPO / "search_spaces" / "configs" / f"{base}.json").read_text())
    config.update(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=256, **sizes)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    options = {
        "--device": device,
        "--config": tmp_path / "tiny.json",
        "--samples": 2,
        "--seq-len": 32,
        "--batch-size": 2,
        "--distill-batch": 2,
        "--repeats": 1,
        "--candidates": 2,
        "--pipeline-seq-len": 32,
        "--retrain-tokens": 256,  # 4 steps: the fewest a retraining rung takes
        "--distill-tokens": 128,
        "--latency-context": 16,
        "--latency-new-tokens": 2,
        "--out": tmp_path / "gpu.md",
        "--work": tmp_path / "work",
    }
    done = bench(*(str(x) for item in options.items() for x in item))
    return done, (tmp_path / "gpu.md").read_text() if done.returncode == 0 else ""


ROWS = (
    "Importance pass",
    "Prune to ~half size",
    "(iv) Stage: rank",
    "(iv) Stage: search",
    "(iv) Stage: distill",
    "(iv) Stage: export",
    "(v) Latency, teacher",
    "(v) Latency, exported student",
)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_every_part_runs_on_a_tiny_config(tmp_path, device):
    done, report = run_tiny(tmp_path, device, "llama-3.1-8b", hidden_size=64, intermediate_size=128)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ROWS:
        assert f"| {row}" in report, row
    assert "6 trials in rungs" in report  # 2 scored pruned, both retrained, 2 data-order pilot runs
    exported = json.loads((tmp_path / "work" / "run" / "export" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16" and exported["intermediate_size"] in (64, 80)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_mixture_of_experts_teacher_runs_every_part(tmp_path, device):
    done, report = run_tiny(tmp_path, device, "mixtral-8x7b", hidden_size=64, intermediate_size=128, num_local_experts=4)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ROWS:
        assert f"| {row}" in report, row
    exported = json.loads((tmp_path / "work" / "run" / "export" / "config.json").read_text())
    assert exported["model_type"] == "mixtral" and exported["num_local_experts"] == 4 and exported["intermediate_size"] in (64, 80)
