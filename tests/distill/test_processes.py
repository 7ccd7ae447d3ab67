"""Distillation under several processes (2 CPU processes on gloo, as `accelerate launch` starts them)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_blocks, tiny_model

from minitron_nas.config.settings import DistillSettings
from minitron_nas.distill.losses import IntermediateStates
from minitron_nas.distill.trainer import make_accelerator, retrain
from minitron_nas.model.architecture import Architecture
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import compute_rankings

WORKER = Path(__file__).resolve().parents[1] / "ddp_worker.py"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, processes: int) -> list[dict]:
    port = str(_free_port())
    workers = []
    for rank in range(processes):
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(processes),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        workers.append(subprocess.Popen([sys.executable, str(WORKER), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for worker in workers:
        output, _ = worker.communicate(timeout=600)
        assert worker.returncode == 0, output[-3000:]
    return [torch.load(out / f"rank{rank}.pt") for rank in range(processes)]


def test_projection_is_averaged_across_processes_and_evaluation_is_gathered(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    first, second = _launch(tmp_path / "two", 2)
    (alone,) = _launch(tmp_path / "one", 1)
    assert first["processes"] == second["processes"] == 2
    # Each process saw other rows; only averaged gradients keep the replicas identical.
    assert not torch.equal(first["projection"], first["initial_projection"])
    assert torch.equal(first["projection"], second["projection"])
    assert all(torch.equal(first["student"][k], second["student"][k]) for k in first["student"])
    # Held-out values cover all blocks on every process: the same as one process scoring them all.
    assert first["eval_curve"] == second["eval_curve"]
    assert first["eval_curve"][0][1] == pytest.approx(alone["eval_curve"][0][1], rel=1e-5)


def test_gradient_clipping_includes_the_projection(monkeypatch):
    teacher = tiny_model("llama")
    blocks = random_blocks(4, 16)
    rankings = compute_rankings(teacher, blocks, progress=False)
    arch = Architecture(24, 48, 6, 2, 2)
    chosen = select(rankings, arch, Architecture.from_config(teacher.config))
    student = prune(teacher, rankings, arch)
    intermediate = IntermediateStates(chosen.layers, 24, 48, chosen.channels)
    accelerator = make_accelerator("cpu")
    clipped = []
    original = accelerator.clip_grad_norm_

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append({id(p) for p in parameters})
        return original(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(accelerator, "clip_grad_norm_", clip)
    settings = DistillSettings(steps=1, batch_size=2, warmup_steps=0, top_k=None, intermediate="on")
    retrain(student, blocks, None, settings, teacher=teacher, accelerator=accelerator, progress=False, intermediate=intermediate)
    assert clipped and id(intermediate.project.weight) in clipped[0]
    assert {id(p) for p in student.parameters()} <= clipped[0]
