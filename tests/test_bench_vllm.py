"""bench/bench_vllm.py: its comparisons against hand computation, its transformers side against
transformers' own loss and `generate`, and a clean one-line skip where vLLM cannot run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import byte_tokenizer, random_blocks, tiny_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_vllm.py"
sys.path.insert(0, str(SCRIPT.parent))  # the script imports its neighbour `common`
bench_vllm = pytest.importorskip("bench_vllm")


def test_log_likelihood_differences_by_hand():
    a = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], dtype=torch.float64)
    b = torch.tensor([[-1.1, -2.0], [-0.5, -2.6]], dtype=torch.float64)
    got = bench_vllm.compare_logprobs(a, b)
    assert got.mean_abs == pytest.approx((0.1 + 0 + 0 + 0.4) / 4)
    assert got.max_abs == pytest.approx(0.4)
    assert (got.nll_a, got.nll_b, got.tokens) == (pytest.approx(1.625), pytest.approx(1.55), 4)
    with pytest.raises(ValueError, match="shapes differ"):
        bench_vllm.compare_logprobs(a, b[:, :1])


def test_greedy_divergence_margin_is_read_where_the_paths_part():
    a = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    b = torch.tensor([[1, 2, 3], [4, 0, 6], [0, 8, 9]])
    rows = [[torch.full((10,), -5.0) for _ in range(3)] for _ in range(3)]
    rows[1][1][5], rows[1][1][0] = -0.70, -0.72  # prompt 1 parts at step 1: a near tie
    rows[2][0][7], rows[2][0][0] = -0.1, -3.0  # prompt 2 parts at step 0: a clear difference
    got = bench_vllm.compare_greedy(a, b, rows)
    assert (got.identical, got.prompts) == (1, 3)
    assert got.mean_prefix == pytest.approx((3 + 1 + 0) / 3)
    assert got.margins == pytest.approx((0.02, 2.9), abs=1e-6)
    assert bench_vllm.verdict(bench_vllm.compare_logprobs(torch.zeros(1, 2), torch.zeros(1, 2)), got, 0.05).startswith("differ: 1 greedy")
    near = bench_vllm.GreedyAgreement(2, 3, 2.5, (0.02,))
    assert bench_vllm.verdict(bench_vllm.compare_logprobs(torch.zeros(1, 2), torch.zeros(1, 2)), near, 0.05).startswith("agree")


def test_transformers_side_matches_its_own_loss_and_generate():
    model = tiny_model("llama")
    blocks = random_blocks(3, 16)
    logprobs = bench_vllm.hf_token_logprobs(model, blocks)  # [3, 15]
    assert logprobs.shape == (3, 15)
    for block, row in zip(blocks, logprobs, strict=True):
        with torch.no_grad():
            loss = model(input_ids=block[None], labels=block[None]).loss  # transformers' own mean NLL
        assert float(-row.mean()) == pytest.approx(loss.item(), abs=1e-5)
    prompts = blocks[:, :5]
    tokens, rows = bench_vllm.hf_greedy(model, prompts, 6)
    expected = model.generate(prompts, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 5:]
    assert torch.equal(tokens, expected)
    assert all(int(rows[i][s].argmax()) == int(tokens[i, s]) for i in range(3) for s in range(6))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None and torch.cuda.is_available(), reason="vLLM can run here: nothing to skip")
def test_without_vllm_it_says_why_in_one_line_and_writes_no_report(tmp_path):
    folder = tmp_path / "export"
    tiny_model("llama", vocab_size=257).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    text = tmp_path / "text.txt"
    text.write_text("some held-out text " * 50)
    report = tmp_path / "vllm.md"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(folder), "--data", str(text), "--out", str(report)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and len(lines) == 1 and lines[0].startswith("vLLM check skipped: "), done.stdout + done.stderr
    assert not report.exists()


def test_a_folder_without_config_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert done.returncode == 2 and "is not an exported folder" in done.stderr
