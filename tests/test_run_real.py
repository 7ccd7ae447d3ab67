"""The README's main job on the real teacher: the demo space end to end, in CI."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron_nas.pipeline import STAGES, finished_stages, run
from minitron_nas.space import load_space

pytestmark = pytest.mark.teacher

LOGITS = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
    "torch.save(m(input_ids=torch.arange(64).view(2, 32)).logits, sys.argv[2])\n"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, shared_data):
    space = load_space("search_spaces/smollm2-135m-demo.yaml")
    assert space.scoring.data_dir == "../shared/data" and shared_data.is_dir()
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run(space, out)


def test_search_scores_every_candidate_with_lm_eval_before_and_after_retraining(demo_run):
    out, _ = demo_run
    assert list(finished_stages(out)) == list(STAGES)
    table = pd.read_csv(out / "trials.csv")
    finished = table[table.state.isin(["COMPLETE", "PRUNED"])]
    assert len(finished) == 8 and finished.params_total.between(67e6 * 0.96, 67e6 * 1.04).all()
    complete = table[table.state == "COMPLETE"]
    assert len(complete) >= 2
    assert complete.score_before.between(0, 1).all() and complete.score_after.between(0, 1).all()
    assert "kendall_tau_before_after" in table.columns
    best = json.loads((out / "best_arch.json").read_text())
    assert best["metric"] == "lm_eval" and best["score_after"] == complete.score_after.max()


def test_distillation_lowers_heldout_loss_and_kld_to_the_teacher(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["after"]["heldout_loss"] < summary["before"]["heldout_loss"]
    assert summary["after"]["kld"] < summary["before"]["kld"]


def test_export_loads_in_a_fresh_process_with_the_distilled_logits(demo_run, tmp_path):
    out, exported = demo_run
    subprocess.run([sys.executable, "-c", LOGITS, str(exported), str(tmp_path / "logits.pt")], check=True)
    model = AutoModelForCausalLM.from_pretrained(str(out / "distill" / "model")).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.arange(64).view(2, 32)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    card = (exported / "README.md").read_text()
    assert "arc_easy" in card and "piqa" in card
    assert (out / "dashboard.html").stat().st_size > 1_000_000 and (out / "report.md").is_file()
