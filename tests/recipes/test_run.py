"""The whole run on a tiny teacher: stages resume, the export loads anywhere, family mode chains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import byte_tokenizer, tiny_model, write_space
from transformers import AutoModelForCausalLM

from minitron_nas.errors import MinitronError
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import load_teacher
from minitron_nas.recipes.run import STAGES, finished_stages, run
from minitron_nas.search.candidates import load_space


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    save_model(tiny_model("llama", vocab_size=257), folder, byte_tokenizer())
    return folder


LOGITS = (
    "import sys, torch\n"
    "from transformers import AutoModelForCausalLM\n"
    "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
    "torch.save(m(input_ids=torch.arange(40).view(2, 20)).logits, sys.argv[2])\n"
)


def test_run_exports_a_loadable_model_and_resumes_finished_stages(teacher_folder, shared_data, tmp_path):
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = load_space(write_space(tmp_path / "space.yaml", teacher_folder, corpus))
    out = tmp_path / "run"
    exported = run(space, out)
    assert list(finished_stages(out)) == list(STAGES)
    for name in ("study.db", "trials.csv", "best_arch.json", "dashboard.html", "report.md", "distill/curve.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["after"]["kld"] < summary["before"]["kld"]

    # The export loads with plain transformers in a fresh process and gives the distilled logits.
    subprocess.run([sys.executable, "-c", LOGITS, str(exported), str(tmp_path / "logits.pt")], check=True)
    in_memory = AutoModelForCausalLM.from_pretrained(str(out / "distill" / "model")).eval()
    with torch.no_grad():
        expected = in_memory(input_ids=torch.arange(40).view(2, 20)).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    card = (exported / "README.md").read_text()
    provenance = json.loads((exported / "best_arch.json").read_text())
    assert "## Evaluation" in card and "teacher" in card and provenance["rankings"]["sha256"]
    assert provenance["architecture"] == json.loads((out / "best_arch.json").read_text())["architecture"]

    # A rerun finds every stage finished and changes nothing.
    before = (out / "stages.json").read_text()
    assert run(space, out) == exported
    assert (out / "stages.json").read_text() == before


def test_a_run_stopped_by_n_trials_exports_nothing_and_the_same_command_goes_on(teacher_folder, shared_data, tmp_path):
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = load_space(write_space(tmp_path / "space.yaml", teacher_folder, corpus))
    out = tmp_path / "run"
    with pytest.raises(MinitronError, match="has not finished its last rung yet: rerun the same command"):
        run(space, out, n_trials=1)
    assert "search" not in finished_stages(out) and not (out / "best_arch.json").exists() and not (out / "export").exists()
    exported = run(space, out)  # resumes the study: rung 0's stored candidate is not scored again
    assert list(finished_stages(out)) == list(STAGES) and (exported / "config.json").is_file()
    trials = pd.read_csv(out / "trials.csv")
    assert not trials[trials.rung == 0].key.duplicated().any()
    summary = json.loads((out / "distill" / "summary.json").read_text())
    best = json.loads((out / "best_arch.json").read_text())
    assert summary["continued_from_search_steps"] == best["schedule"][-1]["stable"] > 0  # the winner's run went on


def test_family_mode_prunes_each_member_from_the_previous(teacher_folder, shared_data, tmp_path):
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = load_space(write_space(tmp_path / "space.yaml", teacher_folder, corpus, family=[28000, 40000]))
    last = run(space, tmp_path / "run")
    big, small = tmp_path / "run" / "budget-40000" / "export", tmp_path / "run" / "budget-28000" / "export"
    assert last == small
    big_card, small_card = (json.loads((f / "best_arch.json").read_text()) for f in (big, small))
    assert big_card["teacher"] == str(teacher_folder)
    assert small_card["teacher"] == str(big)  # pruned from the larger member, not from the original
    assert small_card["parameters"]["total"] < big_card["parameters"]["total"]
    for folder in (big, small):
        AutoModelForCausalLM.from_pretrained(str(folder))


def test_run_in_bfloat16_on_the_cpu_exports_a_bfloat16_model(teacher_folder, shared_data, tmp_path):
    """rank, the search, distill and export with every model held in bf16."""
    from safetensors import safe_open

    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = load_space(write_space(tmp_path / "space.yaml", teacher_folder, corpus, device={"device": "cpu", "dtype": "bfloat16"}))
    out = tmp_path / "run"
    exported = run(space, out)
    trials = [t for t in __import__("csv").DictReader((out / "trials.csv").open()) if t["state"] == "COMPLETE"]
    assert len(trials) >= 2
    with safe_open(str(exported / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}
    model = AutoModelForCausalLM.from_pretrained(str(exported))
    assert model.config.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    summary = json.loads((out / "distill" / "summary.json").read_text())
    assert summary["after"]["kld"] < summary["before"]["kld"]  # bf16 students still learn
    rankings = json.loads((out / "rankings" / "rankings.json").read_text())
    assert rankings["teacher_fingerprint"] == load_teacher(str(teacher_folder), "cpu", "bfloat16").fingerprint


def test_a_run_whose_every_candidate_fails_ends_in_one_line_and_still_reports(teacher_folder, shared_data, tmp_path, monkeypatch):
    from minitron_nas.errors import MinitronError
    from minitron_nas.search import runner as search

    def diverge(*args, **kwargs):
        raise MinitronError("loss became NaN/inf at step 1: lower the learning rate")

    monkeypatch.setattr(search, "retrain", diverge)
    space = load_space(write_space(tmp_path / "space.yaml", teacher_folder, str(shared_data / "tinyshakespeare" / "input.txt")))
    out = tmp_path / "run"
    with pytest.raises(MinitronError, match="no candidate finished the search") as err:
        run(space, out)
    assert "\n" not in str(err.value)
    assert list(finished_stages(out)) == ["rank"]
    report = (out / "report.md").read_text()
    assert "## Failed trials" in report and "NaN/inf" in report
    assert (out / "dashboard.html").is_file()
