"""`export --front` on a tiny teacher through the real pipeline: one loadable folder with its card
per member of the Pareto front, an index, links in the views; a rerun skips finished members and
resumes a stopped distillation. Its bad options are in tests/cli/test_bad_inputs.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna  # noqa: F401  imported here so Optuna's log handler binds to the real stderr, not a runner's
import pandas as pd
import pytest
from helpers import byte_tokenizer, tiny_model, write_space
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.files import RunFolder
from minitron_nas.model.saving import save_model

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time: a file rewritten, even identically, shows."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def space(tmp_path_factory, shared_data) -> Path:
    root = tmp_path_factory.mktemp("family")
    teacher = root / "tiny-llama"
    save_model(tiny_model("llama", vocab_size=257), teacher, byte_tokenizer())
    return write_space(root / "space.yaml", teacher, str(shared_data / "tinyshakespeare" / "input.txt"))


@pytest.fixture(scope="module")
def searched(space) -> Path:
    """A finished search, not distilled yet."""
    out = space.parent / "searched"
    result = invoke("search", space, "--out", out)
    assert result.exit_code == 0, result.output
    best = json.loads(RunFolder(out).best_arch.read_text())
    assert best["front"] and best["front_by_latency"] is None  # latency is not measured in this space
    for member in best["front"]:
        assert member["state"] is None or Path(member["state"]).is_file()  # its search run is kept to continue from
    return out


def test_family_export_writes_one_loadable_folder_per_member_and_a_rerun_skips_them(space, searched, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(searched, out)
    best = json.loads(RunFolder(out).best_arch.read_text())
    result = invoke("export", space, "--out", out, "--front")
    assert result.exit_code == 0, result.output
    assert "family exported, one folder per member" in result.output

    keys = [m["key"] for m in best["front"]]
    family = keys if best["key"] in keys else [*keys, best["key"]]  # the winner is always one of the family
    assert len(family) >= 2  # this seed's front has two members: the export is shown to handle several
    index = pd.read_csv(RunFolder(out).family_index_csv)
    assert list(index.key) == family and index.winner.sum() == 1 and index[index.winner].key.item() == best["key"]
    assert sorted(p.name for p in RunFolder(out).family.iterdir() if p.is_dir()) == sorted(RunFolder(out).family_member(k).root.name for k in family)
    for row in index.itertuples():
        folder = out / row.folder
        assert folder == RunFolder(out).family_member(row.key).export
        model = AutoModelForCausalLM.from_pretrained(str(folder))  # plain transformers, no project code
        assert model.config.hidden_size == json.loads((folder / "best_arch.json").read_text())["architecture"]["hidden_size"]
        card = (folder / "README.md").read_text()
        assert "## Evaluation" in card and ("the winner (trial" in card) == row.winner
        assert row.heldout_loss > 0 and row.score == pytest.approx(next(m["score"] for m in [*best["front"], best] if m["key"] == row.key))
    assert RunFolder(out).distill_summary.is_file()  # the winner is distilled where `minitron-nas distill` would
    for key in set(family) - {best["key"]}:
        summary = json.loads(RunFolder(out).family_member(key).distill_summary.read_text())
        assert summary["continued_from_search_steps"] > 0  # from its own last rung state, as the winner is
    assert "family/index.md" in RunFolder(out).dashboard.read_text() and all(f'href="{f}/"' in RunFolder(out).dashboard.read_text() for f in index.folder)
    assert all(f"]({f})" in RunFolder(out).report.read_text() for f in index.folder)

    before = files(RunFolder(out).family)
    again = invoke("export", space, "--out", out, "--front")
    assert again.exit_code == 0, again.output
    assert again.output.count("exported already, skipped") == len(family)
    after = files(RunFolder(out).family)
    assert {k: v for k, v in after.items() if not k.startswith("index.")} == {k: v for k, v in before.items() if not k.startswith("index.")}
    assert after["index.csv"][0] == before["index.csv"][0]


def test_a_member_stopped_mid_distillation_resumes_from_its_checkpoint(space, searched, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(searched, out)
    from minitron_nas.distill import checkpoint

    saved = checkpoint.Checkpoint.save

    def stop_after_first(self, step, accelerator, result):
        saved(self, step, accelerator, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpoint, "save", stop_after_first)
    stopped = invoke("export", space, "--out", out, "--front")
    assert stopped.exit_code == 130 and "checkpoint at step 4 of 8 kept in" in stopped.output, stopped.output
    monkeypatch.undo()
    restore, restored = checkpoint.Checkpoint.restore, []
    monkeypatch.setattr(checkpoint.Checkpoint, "restore", lambda self, accelerator: restored.append(restore(self, accelerator)) or restored[-1])
    resumed = invoke("export", space, "--out", out, "--front")
    assert resumed.exit_code == 0, resumed.output
    assert restored[0] == 4  # went on from the checkpoint, not from the start
    index = pd.read_csv(RunFolder(out).family_index_csv)
    first = RunFolder(out) if index.winner[0] else RunFolder(out).family_member(index.key[0])
    assert json.loads(first.distill_summary.read_text())["tokens"] == 8 * 4 * 32
