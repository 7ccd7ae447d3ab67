"""kill -9 at random points of `minitron-nas run`, then rerun: the outputs equal an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import byte_tokenizer, tiny_model, write_space

from minitron_nas.model.saving import save_model

ENV = {**os.environ, "MINITRON_NAS_HEARTBEAT_SECONDS": "1", "MINITRON_NAS_GRACE_SECONDS": "3", "OMP_NUM_THREADS": "1"}


def command(space: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "minitron_nas.cli", "run", str(space), "--out", str(out)]


def stages(out: Path) -> list[str]:
    path = out / "stages.json"
    return list(json.loads(path.read_text())) if path.is_file() else []  # written by atomic rename


def test_run_killed_at_random_points_resumes_to_the_same_result(shared_data, tmp_path):
    teacher = tmp_path / "teacher"
    save_model(tiny_model("llama", vocab_size=257), teacher, byte_tokenizer())
    space = write_space(tmp_path / "space.yaml", teacher, str(shared_data / "tinyshakespeare" / "input.txt"))

    reference = tmp_path / "reference"
    subprocess.run(command(space, reference), check=True, capture_output=True, env=ENV)

    # One kill aimed at each stage: wait for the stage's first sign of life, then a random moment.
    out, kills, rng = tmp_path / "crashed", [], random.Random(0)
    signs = [
        lambda: True,  # teacher load / ranking
        lambda: (out / "trials.csv").is_file(),  # a search trial finished
        lambda: (out / "distill" / "checkpoint").is_dir(),  # distillation under way
        lambda: "distill" in stages(out),  # export
    ]
    for sign in signs:
        worker = subprocess.Popen(command(space, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)
        while worker.poll() is None and not sign():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.5))
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            kills.append(stages(out))
    subprocess.run(command(space, out), check=True, capture_output=True, env=ENV)
    assert len(kills) >= 3, kills
    assert len({len(k) for k in kills}) >= 2, f"kills all landed in one stage: {kills}"  # several stages hit

    assert stages(out) == stages(reference) == ["rank", "search", "distill", "export", "report"]
    best, best_ref = (json.loads((o / "best_arch.json").read_text()) for o in (out, reference))
    assert best["architecture"] == best_ref["architecture"]
    loss, loss_ref = (json.loads((o / "distill" / "summary.json").read_text())["after"]["heldout_loss"] for o in (out, reference))
    assert loss == pytest.approx(loss_ref, rel=0.01)
