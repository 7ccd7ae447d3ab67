"""The README's main job on the real teacher: the demo space end to end, in CI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron_nas.recipes.run import STAGES, finished_stages, run
from minitron_nas.report.dashboard import FIGURE_IDS
from minitron_nas.search.candidates import load_space

pytestmark = pytest.mark.teacher

LOGITS = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
    "torch.save(m(input_ids=torch.arange(64).view(2, 32)).logits, sys.argv[2])\n"
)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo as on a fresh clone: its data folder is not there, so it scores on held-out KL."""
    root = tmp_path_factory.mktemp("demo")
    text = Path("search_spaces/smollm2-135m-demo.yaml").read_text().replace("data_dir: ../shared/data", f"data_dir: {root / 'no-data'}")
    (root / "demo.yaml").write_text(text)
    space = load_space(root / "demo.yaml")
    assert space.scoring.metric == "kld"  # tasks_optional: lm-eval tasks dropped without their data
    out = root / "run"
    return space, out, run(space, out)


def test_the_demo_search_runs_its_rungs_within_budget_and_keeps_the_best(demo_run):
    from minitron_nas.model.teachers import load_config
    from minitron_nas.search.candidates import require_feasible
    from minitron_nas.search.runner import schedule_for

    space, out, _ = demo_run
    assert list(finished_stages(out)) == list(STAGES)
    feasible = require_feasible(space, load_config(space.teacher))
    schedule = schedule_for(space, len(feasible))
    table = pd.read_csv(out / "trials.csv")
    done = table[(table.state == "COMPLETE") & (table.order == 0)]
    assert (done.rung == 0).sum() == len(feasible) and (done[done.rung == 0].tokens_trained.isna()).all()  # every candidate, pruned
    assert done.params_total.between(67e6 * 0.96, 67e6 * 1.04).all()
    assert (done.stderr > 0).all() and (done.value > 0).all()
    for a, b in zip(schedule.rungs, schedule.rungs[1:]):  # the best of each rung went on (and maybe some within noise)
        kept = set(done[done.rung == b.index].key)
        assert set(done[done.rung == a.index].sort_values("value").key[: b.candidates]) <= kept
        assert len(kept) <= b.candidates + b.extra
    best = json.loads((out / "best_arch.json").read_text())
    last = done[done.rung == schedule.rungs[-1].index]
    assert best["metric"] == "kld"
    assert best["score"] == last.score.min() or (best["tie_broken_by"] and last.loc[last.score.idxmin(), "key"] in best["tied_with"])
    assert 0 < best["search_tokens"] <= schedule.total_tokens
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["continued_from_search_steps"] == schedule.rungs[-1].stable  # the final distillation continued the winner's run


def test_distillation_lowers_heldout_loss_and_kld_to_the_teacher(demo_run):
    _, out, _ = demo_run
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["after"]["heldout_loss"] < summary["before"]["heldout_loss"]
    assert summary["after"]["kld"] < summary["before"]["kld"]


def test_export_loads_in_a_fresh_process_with_the_distilled_logits(demo_run, tmp_path):
    _, out, exported = demo_run
    subprocess.run([sys.executable, "-c", LOGITS, str(exported), str(tmp_path / "logits.pt")], check=True)
    model = AutoModelForCausalLM.from_pretrained(str(out / "distill" / "model")).eval()
    with torch.no_grad():
        expected = model(input_ids=torch.arange(64).view(2, 32)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    card = (exported / "README.md").read_text()
    assert "kld_to_teacher" in card
    page = (out / "dashboard.html").read_text()
    assert all(f'id="{div_id}"' in page for div_id in FIGURE_IDS) and "<script src=" not in page
    assert "## Candidates" in (out / "report.md").read_text()
