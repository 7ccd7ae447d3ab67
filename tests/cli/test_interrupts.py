"""Ctrl-C and SIGTERM outside the search's trials: one line saying what was kept, exit 130, then a rerun resumes.

The in-process cases send the real signal to this process at a chosen point of the work (a
wrapped library call sends it, then carries on), so the handler runs where it would for a
user; one case interrupts a separate `minitron-nas rank` process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna  # noqa: F401  imported here so Optuna's log handler binds to the real stderr, not a runner's
import pytest
from helpers import byte_tokenizer, tiny_model, write_space
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.distill import checkpoint as checkpoint_module
from minitron_nas.model import saving as export_module
from minitron_nas.model.saving import save_model
from minitron_nas.prune import ranking
from minitron_nas.recipes import distill as distill_recipe
from minitron_nas.recipes import run as pipeline

runner = CliRunner()
TINY_RANK = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]
DISTILL_STEPS, EVERY = 8, 4  # helpers.write_space: 8 distillation steps, a checkpoint every 4


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def interrupted_line(output: str, code: int) -> str:
    """Exit 130, no traceback, and exactly one `interrupted: ` line, the last."""
    assert code == 130, f"exit {code}: {output[-3000:]}"
    assert "Traceback" not in output and "Aborted" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    found = [line for line in lines if line.startswith("interrupted: ")]
    assert len(found) == 1 and lines[-1] == found[0], output[-3000:]
    return found[0]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial" in p.name or ".old-" in p.name]


def signal_after(monkeypatch, owner, name: str, sig: int, when=lambda *a, **k: True):
    """Wrap owner.name: after the real call (when `when` says so), send `sig` to this process."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        value = real(*args, **kwargs)
        if when(*args, **kwargs):
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises here; reaching the end would mean it did not
            pytest.fail(f"{signal.Signals(sig).name} did not interrupt")
        return value

    monkeypatch.setattr(owner, name, wrapped)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("interrupts")


@pytest.fixture(scope="module")
def space(root, corpus) -> Path:
    save_model(tiny_model("llama", vocab_size=257), root / "teacher", byte_tokenizer())
    return write_space(root / "space.yaml", root / "teacher", corpus)


@pytest.fixture(scope="module")
def searched(root, space) -> Path:
    """A run folder after a whole search: best_arch.json and rankings/."""
    out = root / "searched"
    result = invoke("search", space, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def copy_of(folder: Path, name: str) -> Path:
    target = folder.parent / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_rank_interrupted_writes_nothing(monkeypatch, space, corpus, root, sig):
    out = root / f"rankings-{sig.name}"
    signal_after(monkeypatch, ranking, "compute_rankings", sig)
    result = invoke("rank", "--model", root / "teacher", "--data", corpus, "--out", out, *TINY_RANK)
    assert interrupted_line(result.output, result.exit_code) == "interrupted: rankings not written; rerun the same command"
    assert not out.exists() and not leftovers(root)
    monkeypatch.undo()
    assert invoke("rank", "--model", root / "teacher", "--data", corpus, "--out", out, *TINY_RANK).exit_code == 0


def curve(folder: Path) -> list[dict]:
    return json.loads((folder / "distill" / "curve.json").read_text())


@pytest.fixture(scope="module")
def reference(searched, space) -> Path:
    out = copy_of(searched, "reference")
    result = invoke("distill", space, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_distill_interrupted_keeps_its_checkpoint_and_resumes_on_the_same_trajectory(monkeypatch, searched, space, reference):
    out = copy_of(searched, "interrupted-distill")
    signal_after(monkeypatch, checkpoint_module.Checkpoint, "save", signal.SIGINT, when=lambda self, step, *a: step == EVERY)
    result = invoke("distill", space, "--out", out)
    line = interrupted_line(result.output, result.exit_code)
    assert line == f"interrupted: checkpoint at step {EVERY} of {DISTILL_STEPS} kept in '{out / 'distill'}'; rerun the same command to resume from it"
    assert checkpoint_module.Checkpoint.saved_step(out / "distill") == EVERY
    assert not (out / "distill" / "model").exists() and not leftovers(out)
    monkeypatch.undo()

    result = invoke("distill", space, "--out", out)
    assert result.exit_code == 0, result.output
    resumed, straight = curve(out), curve(reference)
    assert [p["step"] for p in resumed] == list(range(1, DISTILL_STEPS + 1))
    for a, b in zip(resumed, straight):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)


def test_distill_interrupted_before_its_first_checkpoint_says_so(monkeypatch, searched, space):
    out = copy_of(searched, "early-distill")
    signal_after(monkeypatch, distill_recipe, "heldout_metrics", signal.SIGTERM)
    result = invoke("distill", space, "--out", out)
    assert interrupted_line(result.output, result.exit_code) == (
        f"interrupted: no checkpoint yet (the first comes at step {EVERY} of {DISTILL_STEPS}); rerun the same command to start the distillation again"
    )


def test_export_interrupted_keeps_the_distilled_model(monkeypatch, reference, space):
    out = copy_of(reference, "interrupted-export")
    model = {p.name: p.read_bytes() for p in (out / "distill" / "model").iterdir()}
    signal_after(monkeypatch, export_module, "model_card", signal.SIGTERM)
    result = invoke("export", space, "--out", out)
    assert interrupted_line(result.output, result.exit_code) == ("interrupted: export not written (the distilled model is kept); rerun the same command")
    assert not (out / "export").exists() and not leftovers(out)
    assert {p.name: p.read_bytes() for p in (out / "distill" / "model").iterdir()} == model


def test_run_interrupted_in_distillation_names_the_kept_stages_and_checkpoint(monkeypatch, root, space):
    out = root / "interrupted-run"
    signal_after(monkeypatch, checkpoint_module.Checkpoint, "save", signal.SIGTERM, when=lambda self, step, *a: step == EVERY)
    result = invoke("run", space, "--out", out)
    assert interrupted_line(result.output, result.exit_code) == (
        f"interrupted: distill stage stopped; rank, search finished and kept in '{out}'; "
        f"checkpoint at step {EVERY} of {DISTILL_STEPS} kept in '{out / 'distill'}'; rerun the same command to resume from it"
    )
    monkeypatch.undo()
    result = invoke("run", space, "--out", out)
    assert result.exit_code == 0, result.output
    assert list(json.loads((out / "stages.json").read_text())) == list(pipeline.STAGES)
    assert [p["step"] for p in curve(out)] == list(range(1, DISTILL_STEPS + 1))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_a_separate_process_ends_it_in_one_line(root, corpus, tmp_path, sig):
    """A real `minitron-nas rank` process, signalled while it ranks (long enough to be caught)."""
    out, log = tmp_path / "rankings", tmp_path / "log"
    command = [
        sys.executable,
        "-m",
        "minitron_nas.cli",
        "rank",
        "--model",
        str(root / "teacher"),
        "--data",
        corpus,
        "--out",
        str(out),
        "--samples",
        "20000",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
    ]
    with log.open("w") as handle:
        worker = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while "ranking:" not in log.read_text(errors="replace") and worker.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert worker.poll() is None, f"rank ended before it could be interrupted:\n{log.read_text()[-2000:]}"
        worker.send_signal(sig)
        worker.wait(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
    line = interrupted_line(log.read_text(errors="replace"), worker.returncode)
    assert line == "interrupted: rankings not written; rerun the same command"
    assert not out.exists() and not leftovers(tmp_path)
