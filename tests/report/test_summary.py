"""The run report: Pareto fronts, report.md, the CLI, the search hook, and dashboard.html in a real browser.

Studies are synthetic (optuna.trial.create_trial with the user attributes run_search
records), so the expected front, counts and tables are known. The browser tests load the
page in headless Chromium from file:// with the network emulated offline.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from helpers import TINY_CONFIGS
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.errors import MinitronError
from minitron_nas.model.teachers import load_config
from minitron_nas.prune.ranking import Rankings
from minitron_nas.report import dashboard
from minitron_nas.report.dashboard import FIGURE_IDS, build_dashboard
from minitron_nas.report.run_data import finished, open_run_study, pareto_front
from minitron_nas.report.summary import write_report
from minitron_nas.search.candidates import enumerate_candidates, load_space
from minitron_nas.search.halving import TIE_RULE
from minitron_nas.search.study import STUDY_NAME

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# (hidden, ffn, heads, kv groups, layers), params_total, before retraining, rung-0 value (KLD: lower is better)
DISTINCT = [
    ((32, 48, 2, 2, 3), 30_000, 6.0, 5.0),
    ((32, 96, 2, 2, 3), 35_000, 5.8, 4.6),
    ((48, 48, 2, 2, 3), 36_000, 5.9, 4.8),
    ((48, 48, 6, 2, 4), 42_000, 5.5, 4.3),  # rung 1
    ((32, 48, 6, 2, 4), 45_000, 5.6, 4.4),  # rung 1
    ((48, 96, 6, 2, 4), 50_000, 5.2, 4.1),  # rung 1
]
LAST = {3: (4.0, 3.15), 4: (4.2, 3.4), 5: (3.9, 3.1)}  # rung-1 value and score; 3 ties 5 (0.05 apart, SE 0.07)
FRONT = [3, 5]  # of the last rung by (parameters, score): 4 is dominated by 3
KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
SE = 0.05


# --------------------------------------------------------------------------- synthetic runs


def _arch(shape) -> dict:
    return {**dict(zip(KEYS, shape)), "layers": None}


def _key(shape) -> str:
    return f"{shape[0]}/{shape[1]}/{shape[2]}:{shape[3]}/{shape[4]}"


def _trial(shape, params, rung, value, n: int, before=None, score=None, state=optuna.trial.TrialState.COMPLETE, **extra):
    attrs = {
        "architecture": _arch(shape),
        "key": _key(shape),
        "params_total": params,
        "params_non_embedding": params - 12_000,
        "rung": rung,
        "steps": 2 + 2 * rung,
        "tokens": 256 * (1 + rung),
        "value": value,
        "stderr": SE if value is not None else None,
        "tokens_trained": 256 * (1 + rung),
        "retrain_curve": [[s, (value or 9.0) + 2.0 / s] for s in range(1, 7)],
        "timings": {"prune": 0.1, "retrain": 10.0 + n},
    }
    if before is not None:
        attrs.update(before=before, before_stderr=SE)
    if score is not None:
        attrs.update(score=score, score_stderr=SE)
    attrs.update(extra)
    return optuna.trial.create_trial(state=state, value=value if state == optuna.trial.TrialState.COMPLETE else None, user_attrs=attrs)


def make_study(
    path: Path, maximize: bool = False, metric: str = "heldout_loss", space: str | None = None, distinct=DISTINCT, last=LAST, extras: bool = True
) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name=STUDY_NAME, direction="minimize")
    study.set_user_attr("metric", metric)
    study.set_user_attr("rung_metric", "kld")
    study.set_user_attr("score_maximize", maximize)
    study.set_user_attr("rungs", 2)
    study.set_user_attr("schedule", [{"index": 0, "candidates": 6, "steps": 2, "tokens": 256}, {"index": 1, "candidates": 3, "steps": 4, "tokens": 512}])
    study.set_user_attr("space", space or "missing-space.yaml")
    for n, (shape, params, before, value) in enumerate(distinct):
        study.add_trial(_trial(shape, params, 0, value, n, before=before, pruned=value))
    for n, (value, score) in last.items():
        shape, params, _, pruned = distinct[n]
        study.add_trial(_trial(shape, params, 1, value, n, score=score, pruned=pruned))  # a tie goes to the lower pruned score
    if extras:
        shape, params, _, _ = distinct[5]
        study.add_trial(_trial(shape, params, 1, None, 9, duplicate_of=len(distinct) + 2, state=optuna.trial.TrialState.PRUNED))
        study.add_trial(
            _trial(
                (48, 48, 6, 2, 4),
                47_000,
                0,
                None,
                10,
                state=optuna.trial.TrialState.FAIL,
                error="MinitronError: candidate 48/48/6:2/4 scored nan: the retrained model diverged",
            )
        )
    return study


def write_space(folder: Path) -> Path:
    """A search space over the tiny Llama config (counts need no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    TINY_CONFIGS["llama"](vocab_size=257).to_json_file(folder / "teacher.json")
    path = folder / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": "teacher.json",
                "axes": {
                    "hidden_size": [32, 48],
                    "intermediate_size": [48, 96],
                    "heads_per_group": [1, 3],
                    "num_key_value_heads": [2],
                    "num_hidden_layers": [3, 4],
                },
                "budget": {"parameters": 40_000, "tolerance": 0.25},
                "sampler": "grid",
            }
        )
    )
    return path


_STUDIES: dict[bool, Path] = {}  # one study file per kind, copied: sqlite writes are slow


def make_run(root: Path, rankings: bool = True, layer_loss: bool = True, distill: bool = True, trials: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    space = write_space(root / "space")
    if trials not in _STUDIES or not _STUDIES[trials].is_file():
        folder = tempfile.mkdtemp(prefix="minitron-study-")
        atexit.register(shutil.rmtree, folder, True)
        _STUDIES[trials] = Path(folder) / "study.db"
        make_study(_STUDIES[trials], distinct=DISTINCT if trials else [], last=LAST if trials else {}, extras=trials)
    shutil.copy(_STUDIES[trials], run / "study.db")
    optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}").set_user_attr("space", str(space))
    if rankings:
        g = torch.Generator().manual_seed(0)
        Rankings(
            heads=torch.rand(4, 6, generator=g),
            neurons=torch.rand(4, 96, generator=g) ** 3,
            channels=torch.rand(48, generator=g),
            block_importance=torch.rand(4, generator=g),
            layer_loss=torch.rand(4, generator=g) + 5 if layer_loss else None,
            meta={"teacher": "tiny"},
        ).save(run / "rankings")
    if distill:
        (run / "distill").mkdir()
        curve = [{"step": s, "train_loss": 4.0 / (1 + s / 10), "eval_loss": 4.2 / (1 + s / 10) if s % 20 == 0 else None} for s in range(0, 101, 5)]
        (run / "distill" / "curve.json").write_text(json.dumps(curve))
        (run / "distill" / "summary.json").write_text(
            json.dumps(
                {
                    "architecture": _arch(DISTINCT[5][0]),
                    "teacher": {"heldout_loss": 3.0123, "kld": 0.0},
                    "before": {"heldout_loss": 5.2345, "kld": 2.5},
                    "after": {"heldout_loss": 3.4567, "kld": 0.4321},
                    "tokens": 1_048_576,
                    "seconds": 12.5,
                }
            )
        )
    return run


@pytest.fixture
def run(tmp_path) -> Path:
    return make_run(tmp_path)


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_when_lower_is_better():
    params = [30, 35, 36, 42, 45, 50]
    scores = [5.0, 4.6, 4.8, 4.3, 4.4, 4.1]
    assert pareto_front(params, scores, maximize=False) == [0, 1, 3, 5]
    assert pareto_front(params[::-1], scores[::-1], maximize=False) == [5, 4, 2, 0]  # by parameters, whatever the order


def test_pareto_front_when_higher_is_better():
    params = [30, 35, 36, 42, 45, 50]
    accuracy = [0.30, 0.40, 0.35, 0.50, 0.45, 0.55]
    assert pareto_front(params, accuracy, maximize=True) == [0, 1, 3, 5]
    assert pareto_front(params, accuracy, maximize=False) == [0]  # the same points, the other way round


def test_pareto_front_ties_missing_scores_and_equal_parameters():
    # identical points both stay; same score with more parameters is dominated; same parameters, worse score is dominated
    assert pareto_front([10, 10, 20, 20, 30], [1.0, 1.0, 1.0, 0.5, 0.5], maximize=False) == [0, 1, 3]
    assert pareto_front([10, 20, 30], [float("nan"), None, 2.0], maximize=False) == [2]
    assert pareto_front([], [], maximize=True) == []


def test_finished_lists_every_candidate_at_its_last_rung_and_the_front_of_the_last_rung(tmp_path):
    done = finished(make_study(tmp_path / "min.db"))
    assert sorted(done.key) == sorted(_key(d[0]) for d in DISTINCT)  # failures and duplicates left out
    last = {_key(DISTINCT[n][0]) for n in LAST}
    assert set(done.key[done.last_rung == 1]) == last and set(done.key[done.last_rung == 0]).isdisjoint(last)
    assert sorted(done.key[done.pareto]) == sorted(_key(DISTINCT[n][0]) for n in FRONT)
    best = done[done.best].iloc[0]
    assert best.key == _key(DISTINCT[5][0]) and best.score == 3.1
    assert set(done.key[done.tied_with_best]) == {_key(DISTINCT[5][0]), _key(DISTINCT[3][0])}  # 0.05 apart, SE 0.07

    # the same scores read as accuracies: higher is better, so 4 (3.4) is best and alone on the front with 3 beaten
    done = finished(make_study(tmp_path / "max.db", maximize=True, metric="lm_eval"))
    assert done[done.best].iloc[0].key == _key(DISTINCT[4][0])
    assert sorted(done.key[done.pareto]) == sorted(_key(DISTINCT[n][0]) for n in (3, 4))


# --------------------------------------------------------------------------- dashboard.html (no browser)


def test_dashboard_is_one_self_contained_page_with_every_figure(run):
    page = build_dashboard(run)
    assert page == run / "dashboard.html"
    text = page.read_text()
    assert text.count("window.PlotlyConfig") == 1  # plotly.js embedded once
    assert len(text) > 3_000_000  # ... really embedded, not linked
    assert '<script src="http' not in text and "<script src='http" not in text
    for div_id in FIGURE_IDS:
        assert text.count(f'id="{div_id}"') == 1, div_id
    assert not list(run.glob(".*partial*"))


def test_a_failed_rebuild_leaves_the_previous_dashboard_whole(run, monkeypatch):
    first = build_dashboard(run).read_text()
    write_text = Path.write_text

    def dies_halfway(self, text, *args, **kwargs):  # a full disk or a kill in the middle of writing
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    with pytest.raises(MinitronError, match="no space left on the device while writing .*dashboard.html.*nothing was replaced"):
        build_dashboard(run)
    with pytest.raises(MinitronError, match="no space left on the device while writing .*report.md"):
        write_report(run)
    monkeypatch.undo()
    assert (run / "dashboard.html").read_text() == first
    assert not (run / "report.md").exists()
    assert not list(run.glob(".*partial*"))


def test_missing_study_is_a_one_line_error(tmp_path):
    with pytest.raises(MinitronError, match="no study in run folder"):
        open_run_study(tmp_path / "nothing-here")
    assert not (tmp_path / "nothing-here" / "study.db").exists()  # looking did not create an empty store
    other = tmp_path / "other.db"
    optuna.create_study(storage=f"sqlite:///{other}", study_name="someone-else")
    with pytest.raises(MinitronError, match="no study named 'minitron'"):
        open_run_study(tmp_path, f"sqlite:///{other}")


# --------------------------------------------------------------------------- report.md


def test_report_lists_budget_rungs_candidates_with_errors_ties_failures_and_distillation(run, tmp_path):
    text = write_report(run).read_text()
    space = load_space(tmp_path / "space" / "space.yaml")
    feasible, valid = enumerate_candidates(space, load_config(space.teacher))
    assert 0 < len(feasible) < len(valid)
    assert "- budget: 40,000 total parameters +/- 25%" in text
    assert f"- feasible architectures: {len(feasible):,} of {len(valid):,} valid ones" in text
    assert "lower is better" in text
    tokens = 256 * len(DISTINCT) + 512 * len(LAST) + 256  # every trial's tokens_trained, the failed one's too
    assert f"- search cost: {tokens:,} training tokens" in text
    assert f"tied within one standard error with 1 other(s): 48/48/6:2/4, the tie broken by {TIE_RULE}" in text  # same depth: the lower pruned score

    rungs = text.split("## Rungs")[1].split("## Candidates")[0]
    rows = [line for line in rungs.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert len(rows) == 2
    assert "| pruned " in rows[0]  # rung 0: scored pruned, no tau before it
    assert rows[1].rstrip(" |").endswith("- (n=3)")  # 3 < 5 pairs: tau withheld, n shown

    table = text.split("## Candidates")[1].split("## Failed trials")[0]
    rows = [line for line in table.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert [int(r.split("|")[1]) for r in rows[:3]] == [8, 6, 7]  # last rung by score: 5 (3.1), 3 (3.15), 4 (3.4)
    assert "3.1000 ± 0.0500" in rows[0] and rows[0].count("yes") == 2  # tied with best (itself) and Pareto
    assert len(rows) == len(DISTINCT)  # every candidate, the stopped ones too

    assert "scored nan" in text.split("## Failed trials")[1]
    distill = text.split("## Winner before and after full distillation")[1]
    assert "50,000 parameters) scored 3.1000 ± 0.0500" in distill
    lines = {line.split("|")[1].strip(): line for line in distill.splitlines() if line.startswith("| ")}
    assert "3.0123" in lines["teacher"]
    assert "5.2345" in lines["winner, pruned, before distillation"]
    assert "3.4567" in lines["winner after full distillation"] and "0.4321" in lines["winner after full distillation"]
    assert "50,000" in lines["winner after full distillation"]
    assert "tokens 1,048,576" in distill


def test_report_without_distillation_or_space_file_says_so(tmp_path):
    run = make_run(tmp_path, distill=False)
    (run / "best_arch.json").write_text(json.dumps({"budget": {"parameters": 40_000, "count": "total", "tolerance": 0.25}}))
    shutil.rmtree(tmp_path / "space")
    text = write_report(run).read_text()
    assert "Distillation has not run yet" in text
    assert "- budget: 40,000 total parameters +/- 25% (from best_arch.json)" in text
    assert "- feasible architectures: unknown (search space unavailable:" in text


def test_report_and_dashboard_link_each_member_of_a_family_export(run):
    assert "Family export" not in write_report(run).read_text() and 'id="family"' not in build_dashboard(run).read_text()
    (run / "family").mkdir()
    index = "key,params_total,score,score_stderr,heldout_loss,heldout_loss_stderr,kld,kld_stderr,folder,winner,on_front\n"
    index += "32/48/2:2/3,30000,5.1,0.02,5.3,0.01,0.1,0.01,family/32_48_2-2_3/export,False,True\n"
    index += "48/96/6:2/4,50000,4.9,0.02,5.0,0.01,0.05,0.01,family/48_96_6-2_4/export,True,True\n"
    (run / "family" / "index.csv").write_text(index)
    report, page = write_report(run).read_text(), build_dashboard(run).read_text()
    winner = next(line for line in report.split("## Family export")[1].splitlines() if "(winner)" in line)
    link = "[family/48_96_6-2_4/export](family/48_96_6-2_4/export)"  # relative to the run folder
    assert [cell.strip() for cell in winner.split("|")[1:-1]] == [
        "48/96/6:2/4 (winner)",
        "50,000",
        "4.9000 ± 0.0200",
        "5.0000 ± 0.0100",
        "0.0500 ± 0.0100",
        link,
    ]
    assert '<a href="family/32_48_2-2_3/export/">32/48/2:2/3</a>: 30,000 parameters' in page and 'href="family/index.md"' in page
    (run / "family" / "index.csv").write_bytes(b"\xff\x00 not a table")  # a damaged index: the section is left out, the views still build
    assert "Family export" not in write_report(run).read_text() and 'id="family"' not in build_dashboard(run).read_text()


def test_report_of_a_study_without_trials(tmp_path):
    run = make_run(tmp_path, trials=False, rankings=False, distill=False)
    text = write_report(run).read_text()
    assert "No finished trial yet." in text and "trials: none yet" in text


# --------------------------------------------------------------------------- CLI


runner = CliRunner()


def test_cli_dashboard_rebuilds_both_files(run):
    result = runner.invoke(app, ["dashboard", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "dashboard.html").read_text()
    assert all(f'id="{div_id}"' in page for div_id in FIGURE_IDS)
    assert "<script src=" not in page and page.count("plotly.js v") >= 1  # plotly.js embedded, nothing fetched
    assert "## Candidates" in (run / "report.md").read_text()


def test_cli_dashboard_reads_another_storage(run, tmp_path):
    out = tmp_path / "elsewhere"
    result = runner.invoke(app, ["dashboard", str(out), "--storage", f"sqlite:///{run / 'study.db'}"])
    assert result.exit_code == 0, result.output
    assert (out / "dashboard.html").is_file() and (out / "report.md").is_file()


def test_cli_dashboard_without_a_study_is_one_line(tmp_path):
    result = runner.invoke(app, ["dashboard", str(tmp_path / "empty")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no study in run folder")


# --------------------------------------------------------------------------- the search hook


def test_search_rebuilds_the_dashboard_after_every_trial_and_survives_its_failure(shared_data, tmp_path, caplog, monkeypatch):
    from helpers import byte_tokenizer, tiny_model

    from minitron_nas.config.settings import RankSettings, RetrainSettings
    from minitron_nas.config.space import Budget, HalvingSettings, ScoringSettings, SearchSpace
    from minitron_nas.model.saving import save_model
    from minitron_nas.model.teachers import load_teacher
    from minitron_nas.search import runner as search
    from minitron_nas.search.runner import run_search

    save_model(tiny_model("llama", vocab_size=257), tmp_path / "teacher", byte_tokenizer())
    teacher = load_teacher(str(tmp_path / "teacher"))
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = SearchSpace(
        teacher=str(teacher.path),
        axes={"hidden_size": (32, 48), "intermediate_size": (48, 96), "heads_per_group": (1, 3), "num_key_value_heads": (2,), "num_hidden_layers": (3, 4)},
        budget=Budget(parameters=40_000, tolerance=0.25),
        ranking=RankSettings(data=corpus, samples=4, seq_len=32),
        retrain=RetrainSettings(tokens=4 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, top_k=16, data=corpus),
        scoring=ScoringSettings(metric="heldout_loss", heldout_samples=2, seq_len=32),
        halving=HalvingSettings(),
        sampler="grid",
    )
    calls = []

    def first_one_fails(study, trial):
        calls.append(sum(t.state.name == "COMPLETE" for t in study.trials))
        if len(calls) == 1:
            raise RuntimeError("dashboard bug")
        build_dashboard(run, study=study)

    run = tmp_path / "run"
    monkeypatch.setattr(search, "OUTPUTS_EVERY", 0.0)  # rung 0's views too after every work unit
    with caplog.at_level(logging.WARNING, logger="minitron_nas.search.runner"):
        study = run_search(space, run, n_trials=2, teacher=teacher, on_trial=first_one_fails)
    assert calls == [1, 2]  # after every trial, with the finished trial already in the study
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2  # the failure did not stop the search
    assert any("dashboard.html not rebuilt: RuntimeError: dashboard bug" in r.getMessage() for r in caplog.records)
    text = (run / "dashboard.html").read_text()
    assert "stopped at rung 0" in text and 'id="retrain-curves"' in text


# --------------------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail("chromium and chromium-driver are missing: run `make browser` (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="minitron-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--enable-unsafe-swiftshader",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


FIGURE_STATE = """
return Array.from(arguments[0]).map(id => {
  const gd = document.getElementById(id);
  if (!gd) return {id: id, present: false};
  return {
    id: id, present: true,
    plotted: !!gd._fullLayout && !!gd.querySelector('.main-svg'),
    traces: (gd.data || []).map(t => ({name: t.name || '', type: t.type || 'scatter',
                                       n: t.z ? t.z.length : (t.x ? t.x.length : (t.dimensions ? t.dimensions[0].values.length : 0)),
                                       dims: t.dimensions ? t.dimensions.length : 0})),
    title: (gd.layout.title && gd.layout.title.text) || '',
    notes: (gd.layout.annotations || []).map(a => a.text),
    drawnPoints: Array.from(gd.querySelectorAll('.scatterlayer .trace')).map(t => t.querySelectorAll('path.point').length),
  };
});
"""


def open_page(driver, page: Path) -> tuple[dict, list[dict]]:
    """Load the page offline; (figure states by id, SEVERE console entries)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # drop entries of earlier pages
    driver.get(page.resolve().as_uri())
    WebDriverWait(driver, 60).until(
        lambda d: d.execute_script(
            "return document.readyState === 'complete' && !!window.Plotly && "
            "Array.from(arguments[0]).every(id => { const g = document.getElementById(id); return g && g._fullLayout; })",
            list(FIGURE_IDS),
        )
    )
    states = {s["id"]: s for s in driver.execute_script(FIGURE_STATE, list(FIGURE_IDS))}
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return states, severe


def test_the_browser_check_sees_javascript_errors(browser, tmp_path):
    """The no-error assertions below would be empty if console errors were not collected."""
    page = tmp_path / "broken.html"
    page.write_text("<html><body><script>throw new Error('deliberate failure');</script></body></html>")
    browser.get_log("browser")
    browser.get(page.as_uri())
    assert any("deliberate failure" in e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE")


def test_dashboard_renders_every_figure_offline_without_errors(browser, run):
    build_dashboard(run)
    states, severe = open_page(browser, run / "dashboard.html")
    assert severe == []
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(r.startswith(("file:", "data:", "blob:")) for r in resources), resources
    for div_id in FIGURE_IDS:
        state = states[div_id]
        assert state["present"] and state["plotted"], div_id
        assert state["traces"] and all(t["n"] > 0 for t in state["traces"]), (div_id, state["traces"])

    pareto = states["pareto"]
    stopped, final = len(DISTINCT) - len(LAST), len(LAST)
    assert [t["n"] for t in pareto["traces"]] == [stopped, final, len(FRONT)]  # every candidate at its last rung, then the front
    assert pareto["drawnPoints"][:2] == [stopped, final]  # drawn in the SVG, not only in the data
    assert "lower is better" in browser.execute_script("return document.getElementById('pareto').layout.yaxis.title.text")
    front_x = browser.execute_script("return Array.from(document.getElementById('pareto').data[2].x)")
    assert front_x == [DISTINCT[i][1] for i in FRONT]

    parallel = states["parallel"]["traces"][0]
    assert parallel["type"] == "parcoords" and parallel["dims"] == 8 and parallel["n"] == len(DISTINCT)
    title = states["rank-stability"]["title"]
    assert "rung 0 → rung 1: τ - (n=3)" in title
    assert len(states["retrain-curves"]["traces"]) == len(DISTINCT)  # one line per candidate, at its last rung
    heads = states["head-importance"]["traces"][0]
    assert heads["type"] == "heatmap" and heads["n"] == 4
    assert [t["type"] for t in states["neuron-channel-importance"]["traces"]] == ["box", "histogram"]
    assert len(states["layer-importance"]["traces"]) == 2  # Block Importance and layer-drop loss
    assert [t["name"] for t in states["distill-curves"]["traces"]] == ["training loss", "held-out loss"]

    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1400, height + 100)
    browser.execute_script("window.dispatchEvent(new Event('resize'))")
    time.sleep(1)  # responsive figures relayout to the new width
    shot = run / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, shot_height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and shot_height >= min(height, 1000), (width, shot_height, height)  # the page, not an empty frame
    browser.set_window_size(1400, 1000)

    colours = browser.execute_script("""
        const gd = document.getElementById('parallel');
        const button = gd.layout.updatemenus[0].buttons.find(b => b.label === 'colour by layers');
        return Plotly.restyle(gd, ...button.args).then(() => Array.from(gd._fullData[0].line.color));""")
    layers = browser.execute_script("return Array.from(document.getElementById('parallel').data[0].dimensions[4].values)")
    assert colours == layers and sorted(colours) == sorted(float(shape[4]) for shape, *_ in DISTINCT)  # recoloured by the axis
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def test_dashboard_of_an_empty_run_explains_what_is_missing(browser, tmp_path):
    run = make_run(tmp_path, trials=False, rankings=False, distill=False)
    build_dashboard(run)
    states, severe = open_page(browser, run / "dashboard.html")
    assert severe == []
    for div_id in FIGURE_IDS:
        assert states[div_id]["present"] and states[div_id]["plotted"], div_id
        assert states[div_id]["traces"] == [] and states[div_id]["notes"], div_id
    assert states["pareto"]["notes"] == ["no finished trial yet"]
    assert states["head-importance"]["notes"][0].startswith("no rankings in")
    assert states["distill-curves"]["notes"] == ["distillation has not run yet"]


def test_layer_view_without_layer_loss_keeps_block_importance_and_says_why():
    g = torch.Generator().manual_seed(0)
    ranked = Rankings(
        heads=torch.rand(4, 6, generator=g),
        neurons=torch.rand(4, 96, generator=g),
        channels=torch.rand(48, generator=g),
        block_importance=torch.rand(4, generator=g),
    )
    fig = dashboard.layer_figure(ranked, None)
    assert [t.name for t in fig.data] == ["Block Importance"]
    assert any("--layer-loss" in a.text for a in fig.layout.annotations)
    fig = dashboard.layer_figure(Rankings(**{**ranked.__dict__, "layer_loss": torch.rand(4, generator=g)}), None)
    assert [t.name for t in fig.data] == ["Block Importance", "layer-drop loss"]
