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
from typer.testing import CliRunner

from minitron_nas import report
from minitron_nas.cli import app
from minitron_nas.errors import MinitronError
from minitron_nas.ranking import Rankings
from minitron_nas.report import FIGURE_IDS, build_dashboard, finished, open_run_study, pareto_front, write_report
from minitron_nas.search import STUDY_NAME, kendall_tau, trials_table
from minitron_nas.space import enumerate_candidates, load_space
from minitron_nas.teachers import load_config

from conftest import TINY_CONFIGS

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# (hidden, ffn, heads, kv groups, layers), params_total, score_before, score_after (held-out loss: lower is better)
DISTINCT = [
    ((32, 48, 2, 2, 3), 30_000, 6.0, 5.0),  # front
    ((32, 96, 2, 2, 3), 35_000, 5.8, 4.6),  # front
    ((48, 48, 2, 2, 3), 36_000, 5.9, 4.8),  # dominated by the one above
    ((48, 96, 6, 2, 3), 42_000, 5.5, 4.3),  # front
    ((32, 48, 6, 2, 4), 45_000, 5.6, 4.4),  # dominated by the one above
    ((48, 96, 6, 2, 4), 50_000, 5.2, 4.1),  # front, the best
]
FRONT = [0, 1, 3, 5]
KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


# --------------------------------------------------------------------------- synthetic runs


def _arch(shape) -> dict:
    return {**dict(zip(KEYS, shape)), "layers": None}


def _trial(shape, params, before, after, n: int):
    return optuna.trial.create_trial(
        value=after,
        user_attrs={
            "architecture": _arch(shape),
            "params_total": params,
            "params_non_embedding": params - 12_000,
            "score_before": before,
            "score_after": after,
            "details_before": {"heldout_loss": before},
            "details_after": {"heldout_loss": after},
            "retrain_curve": [[s, after + 2.0 / s] for s in range(1, 7)],
            "retrain_eval_curve": [[0, before], [3, (before + after) / 2], [6, after]],
            "timings": {"prune": 0.1, "retrain": 10.0 + n},
        },
    )


def write_space(folder: Path) -> Path:
    """A search space over the tiny Llama config (counts need no weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    TINY_CONFIGS["llama"](vocab_size=257).to_json_file(folder / "teacher.json")
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump({
        "teacher": "teacher.json",
        "axes": {"hidden_size": [32, 48], "intermediate_size": [48, 96], "heads_per_group": [1, 3],
                 "num_key_value_heads": [2], "num_hidden_layers": [3, 4]},
        "budget": {"parameters": 40_000, "tolerance": 0.25},
        "sampler": "grid",
    }))
    return path


def make_study(path: Path, direction: str = "minimize", metric: str = "heldout_loss", space: str | None = None,
               distinct=DISTINCT, extras: bool = True) -> optuna.Study:
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name=STUDY_NAME, direction=direction)
    study.set_user_attr("metric", metric)
    study.set_user_attr("space", space or "missing-space.yaml")
    for n, (shape, params, before, after) in enumerate(distinct):
        study.add_trial(_trial(shape, params, before, after, n))
    if extras:
        dup = _trial(*distinct[-1], n=len(distinct))
        dup.user_attrs.update({"duplicate_of": len(distinct) - 1})
        for key in ("retrain_curve", "retrain_eval_curve", "details_before", "details_after", "timings"):
            dup.user_attrs.pop(key)
        study.add_trial(dup)
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            user_attrs={"architecture": _arch((48, 48, 6, 2, 4)), "params_total": 47_000, "params_non_embedding": 35_000,
                        "error": "MinitronError: candidate scored nan: the retrained model diverged"},
        ))
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.PRUNED, intermediate_values={3: 9.0},
            user_attrs={"architecture": _arch((32, 96, 6, 2, 4)), "params_total": 48_000, "params_non_embedding": 36_000,
                        "score_before": 7.0},
        ))
    return study


_STUDIES: dict[bool, Path] = {}  # one study file per kind, copied: sqlite writes are slow


def make_run(root: Path, rankings: bool = True, layer_loss: bool = True, distill: bool = True, trials: bool = True) -> Path:
    run = root / "run"
    run.mkdir(parents=True)
    space = write_space(root / "space")
    if trials not in _STUDIES or not _STUDIES[trials].is_file():
        folder = tempfile.mkdtemp(prefix="minitron-study-")
        atexit.register(shutil.rmtree, folder, True)
        _STUDIES[trials] = Path(folder) / "study.db"
        make_study(_STUDIES[trials], distinct=DISTINCT if trials else [], extras=trials)
    shutil.copy(_STUDIES[trials], run / "study.db")
    optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}").set_user_attr("space", str(space))
    if rankings:
        g = torch.Generator().manual_seed(0)
        Rankings(
            heads=torch.rand(4, 6, generator=g), neurons=torch.rand(4, 96, generator=g) ** 3, channels=torch.rand(48, generator=g),
            block_importance=torch.rand(4, generator=g), layer_loss=torch.rand(4, generator=g) + 5 if layer_loss else None,
            meta={"teacher": "tiny"},
        ).save(run / "rankings")
    if distill:
        (run / "distill").mkdir()
        curve = [{"step": s, "train_loss": 4.0 / (1 + s / 10), "eval_loss": 4.2 / (1 + s / 10) if s % 20 == 0 else None}
                 for s in range(0, 101, 5)]
        (run / "distill" / "curve.json").write_text(json.dumps(curve))
        (run / "distill" / "summary.json").write_text(json.dumps({
            "architecture": _arch(DISTINCT[5][0]),
            "teacher": {"heldout_loss": 3.0123, "kld": 0.0},
            "before": {"heldout_loss": 5.2345, "kld": 2.5},
            "after": {"heldout_loss": 3.4567, "kld": 0.4321},
            "tokens": 1_048_576, "seconds": 12.5,
        }))
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


def test_finished_trials_exclude_duplicates_failures_and_pruned_and_follow_the_study_direction(tmp_path):
    done = finished(make_study(tmp_path / "min.db"))
    assert list(done.trial) == list(range(len(DISTINCT)))
    assert list(done.trial[done.pareto]) == FRONT

    # the same scores read as accuracies: the cheapest candidate also scores highest, so it alone is non-dominated
    done = finished(make_study(tmp_path / "max.db", direction="maximize", metric="lm_eval"))
    assert list(done.trial[done.pareto]) == [0]
    flipped = [(shape, params, -before, -after) for shape, params, before, after in DISTINCT]
    done = finished(make_study(tmp_path / "flipped.db", direction="maximize", metric="lm_eval", distinct=flipped))
    assert list(done.trial[done.pareto]) == FRONT


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
    with pytest.raises(OSError):
        build_dashboard(run)
    with pytest.raises(OSError):
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


def test_report_lists_budget_feasible_count_top_candidates_front_failures_and_distillation(run, tmp_path):
    text = write_report(run).read_text()
    space = load_space(tmp_path / "space" / "space.yaml")
    feasible, valid = enumerate_candidates(space, load_config(space.teacher))
    assert 0 < len(feasible) < len(valid)
    assert "- budget: 40,000 total parameters +/- 25%" in text
    assert f"- feasible architectures: {len(feasible):,} of {len(valid):,} valid ones" in text
    assert "lower is better" in text
    assert "6 distinct finished candidates, 1 duplicates" in text
    tau = kendall_tau(trials_table(open_run_study(run)))
    assert f"Kendall tau of scores before vs after retraining: {tau:.3f}" in text

    top = text.split("## Top candidates")[1].split("## Pareto front")[0]
    rows = [line for line in top.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert [int(r.split("|")[1]) for r in rows] == [5, 3, 4, 1, 2, 0]  # lowest loss first
    assert "50,000" in rows[0] and "4.1000" in rows[0] and "yes" in rows[0]

    front = text.split("## Pareto front")[1].split("## Failed trials")[0]
    rows = [line for line in front.splitlines() if line.startswith("|") and "---" not in line][1:]
    assert [int(r.split("|")[1]) for r in rows] == FRONT

    assert "candidate scored nan" in text.split("## Failed trials")[1]
    distill = text.split("## Winner before and after full distillation")[1]
    assert "trial 5, 50,000 parameters" in distill and "5.2000 after pruning and 4.1000" in distill
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


def test_report_of_a_study_without_trials(tmp_path):
    run = make_run(tmp_path, trials=False, rankings=False, distill=False)
    text = write_report(run).read_text()
    assert "No finished trial yet." in text and "trials: none yet" in text


# --------------------------------------------------------------------------- CLI


runner = CliRunner()


def test_cli_dashboard_rebuilds_both_files(run):
    result = runner.invoke(app, ["dashboard", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "dashboard.html").stat().st_size > 3_000_000
    assert "## Top candidates" in (run / "report.md").read_text()


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


def test_search_rebuilds_the_dashboard_after_every_trial_and_survives_its_failure(shared_data, tmp_path, monkeypatch, caplog):
    from minitron_nas.export import save_model
    from minitron_nas.search import run_search
    from minitron_nas.space import Budget, RankingSpec, RetrainSpec, ScoringSpec, SearchSpace
    from minitron_nas.teachers import load_teacher

    from conftest import byte_tokenizer, tiny_model

    save_model(tiny_model("llama", vocab_size=257), tmp_path / "teacher", byte_tokenizer())
    teacher = load_teacher(str(tmp_path / "teacher"))
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    space = SearchSpace(
        teacher=str(teacher.path),
        axes={"hidden_size": (32, 48), "intermediate_size": (48, 96), "heads_per_group": (1, 3), "num_key_value_heads": (2,), "num_hidden_layers": (3, 4)},
        budget=Budget(parameters=40_000, tolerance=0.25),
        ranking=RankingSpec(data=corpus, samples=4, seq_len=32),
        retrain=RetrainSpec(tokens=2 * 2 * 32, batch_size=2, seq_len=32, lr=3e-3, top_k=16, data=corpus, eval_every=1),
        scoring=ScoringSpec(metric="heldout_loss", heldout_samples=2, seq_len=32),
        sampler="grid",
    )
    real, calls = report.build_dashboard, []

    def first_one_fails(out, storage=None, *, study=None):
        calls.append(sum(t.state.name == "COMPLETE" for t in study.trials))
        if len(calls) == 1:
            raise RuntimeError("dashboard bug")
        return real(out, storage, study=study)

    monkeypatch.setattr(report, "build_dashboard", first_one_fails)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="minitron_nas.search"):
        study = run_search(space, run, n_trials=2, teacher=teacher)
    assert calls == [1, 2]  # after every trial, with the finished trial already in the study
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 2  # the failure did not stop the search
    assert any("dashboard.html not rebuilt: RuntimeError: dashboard bug" in r.getMessage() for r in caplog.records)
    text = (run / "dashboard.html").read_text()
    assert '"Pareto front (' in text and 'id="retrain-curves"' in text


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
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-unsafe-swiftshader",
                 "--window-size=1400,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(120)
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions",
                           {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
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
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && !!window.Plotly && "
        "Array.from(arguments[0]).every(id => { const g = document.getElementById(id); return g && g._fullLayout; })",
        list(FIGURE_IDS)))
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
    assert [t["n"] for t in pareto["traces"]] == [len(DISTINCT), len(FRONT)]
    assert pareto["drawnPoints"] == [len(DISTINCT), len(FRONT)]  # drawn in the SVG, not only in the data
    assert "lower is better" in browser.execute_script("return document.getElementById('pareto').layout.yaxis.title.text")
    front_x = browser.execute_script("return Array.from(document.getElementById('pareto').data[1].x)")
    assert front_x == [DISTINCT[i][1] for i in FRONT]

    parallel = states["parallel"]["traces"][0]
    assert parallel["type"] == "parcoords" and parallel["dims"] == 7 and parallel["n"] == len(DISTINCT)
    tau = kendall_tau(trials_table(open_run_study(run)))
    assert f"Kendall τ = {tau:.3f}" in states["rank-stability"]["title"]
    assert len(states["retrain-curves"]["traces"]) == 2 * len(DISTINCT)  # training and held-out line per trial
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
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    browser.set_window_size(1400, 1000)

    colours = browser.execute_script("""
        const gd = document.getElementById('parallel');
        const button = gd.layout.updatemenus[0].buttons.find(b => b.label === 'colour by layers');
        return Plotly.restyle(gd, ...button.args).then(() => Array.from(gd._fullData[0].line.color));""")
    assert colours == [float(shape[4]) for shape, *_ in DISTINCT]  # the menu recolours by the chosen axis
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
    ranked = Rankings(heads=torch.rand(4, 6, generator=g), neurons=torch.rand(4, 96, generator=g),
                      channels=torch.rand(48, generator=g), block_importance=torch.rand(4, generator=g))
    fig = report.layer_figure(ranked, None)
    assert [t.name for t in fig.data] == ["Block Importance"]
    assert any("--layer-loss" in a.text for a in fig.layout.annotations)
    fig = report.layer_figure(Rankings(**{**ranked.__dict__, "layer_loss": torch.rand(4, generator=g)}), None)
    assert [t.name for t in fig.data] == ["Block Importance", "layer-drop loss"]
