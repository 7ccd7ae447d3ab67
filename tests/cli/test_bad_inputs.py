"""The bad-input catalogue: every case ends with exit status 2 and one line `error: <problem>: <fix>`.

Each case runs the command line (typer's runner, in process; a subprocess where the
environment must differ) on a tiny random teacher, and checks that what was there before
(a finished search run, a rankings folder, a model folder) is byte-identical afterwards and
that no `.partial-` folder is left behind. Self-contained: helpers are not shared with
cli/test_app.py or search/test_runner.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import optuna  # noqa: F401  imported here so Optuna's log handler binds to the real stderr, not a runner's
import pandas as pd
import pytest
import transformers
import yaml
from helpers import assert_one_line_error, byte_tokenizer, tiny_model
from transformers import GPT2Config
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.config.settings import RetrainSettings
from minitron_nas.config.space import Budget, ScoringSettings
from minitron_nas.model import saving
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import EMBEDDED, embedded_gguf
from minitron_nas.prune import ranking

runner = CliRunner()
TINY_RANK = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]
SMALL_ARCH = json.dumps({"intermediate_size": 48, "num_hidden_layers": 3})
AXES = {"hidden_size": [32, 48], "intermediate_size": [48, 96], "heads_per_group": [1, 3], "num_key_value_heads": [2], "num_hidden_layers": [3, 4]}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fresh_copy(source: Path, out: Path) -> Path:
    """`out` as a copy of `source`, whatever an earlier run of the test left there."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out)
    return out


def kept_whole(folder: Path, what: str):
    """A fixture's body: yield `folder`, then check it byte for byte and that no temporary file is left beside it."""
    before = snapshot(folder)
    yield folder
    assert snapshot(folder) == before, f"{what} was modified"
    assert not leftovers(folder.parent)


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if ".partial" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-inputs")


@pytest.fixture(scope="module")
def teacher(root) -> Path:
    folder = root / "teacher"
    save_model(tiny_model("llama", vocab_size=257), folder, byte_tokenizer())
    return folder


def space_dict(teacher: Path, corpus: str, **changes) -> dict:
    space = {
        "teacher": str(teacher),
        "axes": AXES,
        "budget": {"parameters": 40_000, "tolerance": 0.25},
        "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
        "retrain": {"tokens": 4 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 3e-3, "top_k": 32, "data": corpus, "eval_every": 2},
        "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
        "sampler": "grid",
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            space[key] = {**space.get(key, {}), **value}
        else:
            space[key] = value
    return space


def write_space(folder: Path, name: str, space: dict | str) -> Path:
    path = folder / name
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    return path


@pytest.fixture(scope="module")
def good_space(root, teacher, corpus) -> Path:
    return write_space(root, "good.yaml", space_dict(teacher, corpus))


@pytest.fixture(scope="module")
def previous_run(root, good_space) -> Path:
    """A finished search run: study.db, trials.csv, best_arch.json, rankings/, ..."""
    run = root / "previous-run"
    result = invoke("search", good_space, "--out", run)
    assert result.exit_code == 0, result.output
    assert {"study.db", "trials.csv", "best_arch.json", "rankings/rankings.safetensors"} <= set(snapshot(run))
    return run


@pytest.fixture
def intact_run(previous_run):
    """The previous run, checked byte for byte after the test."""
    yield from kept_whole(previous_run, "the earlier search run")


@pytest.fixture(scope="module")
def rankings_dir(root, teacher, corpus) -> Path:
    out = root / "rankings"
    result = invoke("rank", "--model", teacher, "--data", corpus, "--out", out, *TINY_RANK)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def intact_rankings(rankings_dir):
    yield from kept_whole(rankings_dir, "the earlier rankings")


# --------------------------------------------------------------------------- search spaces


def test_malformed_search_space_yaml(root, teacher, intact_run):
    space = write_space(root, "malformed.yaml", f"teacher: {teacher}\naxes:\n  hidden_size: [32, 48\nbudget: {{parameters: 40000}}\n")
    result = invoke("search", space, "--out", intact_run, "--resume")
    assert_one_line_error(result, str(space), "not valid YAML at line", "fix the syntax")


def test_unknown_key_in_search_space(root, teacher, corpus, intact_run):
    space = write_space(root, "unknown-key.yaml", space_dict(teacher, corpus, retrain={"epochs": 3}))
    result = invoke("search", space, "--out", intact_run, "--resume")
    assert_one_line_error(result, "unknown key 'retrain.epochs'", "allowed are", "lr")


@pytest.mark.parametrize("command", ["enumerate", "search"])
def test_infeasible_budget(root, teacher, corpus, intact_run, command):
    space = write_space(root, "infeasible.yaml", space_dict(teacher, corpus, budget={"parameters": 1_000, "tolerance": 0.05}))
    extra = ["--out", intact_run, "--resume"] if command == "search" else []
    result = invoke(command, space, *extra)
    assert_one_line_error(result, "no architecture within 1,000", "the nearest feasible budget is", "change budget.parameters")


def test_duplicate_key_in_search_space(root, teacher, corpus, intact_run):
    text = yaml.safe_dump(space_dict(teacher, corpus)) + "budget: {parameters: 90000}\n"
    first = 1 + next(n for n, line in enumerate(text.splitlines()) if line.startswith("budget:"))
    space = write_space(root, "duplicate-key.yaml", text)
    result = invoke("search", space, "--out", intact_run, "--resume")
    assert_one_line_error(result, str(space), f"sets 'budget' twice (lines {first} and {len(text.splitlines())})", "keep one of them")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_search_space_that_is_not_a_file(tmp_path, kind):
    """A subprocess with a timeout: reading a FIFO waited for a writer forever."""
    space = tmp_path / "space.yaml"
    space.mkdir() if kind == "folder" else os.mkfifo(space)
    done = subprocess.run([sys.executable, "-m", "minitron_nas.cli", "enumerate", str(space)], capture_output=True, text=True, env=_this_checkout(), timeout=60)
    assert_one_line_error(done, f"search space '{space}' is not a regular file", "give a YAML file")


def _this_checkout() -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's minitron_nas."""
    repo = Path(__file__).resolve().parents[2]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}


def test_search_space_in_latin_1(root, teacher, corpus, intact_run):
    text = yaml.safe_dump(space_dict(teacher, corpus)) + "# café\n"
    space = root / "latin-1.yaml"
    space.write_bytes(text.encode("latin-1"))
    result = invoke("search", space, "--out", intact_run, "--resume")
    assert_one_line_error(result, f"'{space}' is not UTF-8 text (byte 0xe9 at offset {text.index('é')})", "convert it to UTF-8")


def _laughs(depth: int) -> str:
    """A 'billion laughs' list: each level holds ten aliases of the one before, 10**depth values in all."""
    levels = "".join(f", &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, depth + 1))
    return "[&l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]" + levels + "]"


@pytest.mark.parametrize(
    "name, tail, fragments",
    [
        ("laughs", f"seed: {_laughs(9)}\n", ("expands its YAML aliases (*name) to over 100,000 values", "write the values out")),
        ("deep", "seed: " + "[" * 5000 + "]" * 5000 + "\n", ("nests its YAML too deeply", "fewer levels")),
        ("huge", "# padding\n" * 200_000, ("is 2,", "bytes, over the 1,000,000 a space may have", "give the space's YAML file")),
    ],
)
def test_hostile_search_space(root, teacher, corpus, name, tail, fragments):
    """Refused at once: a subprocess with a timeout, since expanding the aliases took minutes."""
    space = write_space(root, f"{name}.yaml", yaml.safe_dump(space_dict(teacher, corpus)) + tail)
    done = subprocess.run([sys.executable, "-m", "minitron_nas.cli", "enumerate", str(space)], capture_output=True, text=True, env=_this_checkout(), timeout=60)
    line = assert_one_line_error(done, f"search space '{space}'", *fragments)
    assert len(line) < 300, line


def test_unknown_lm_eval_task(teacher, shared_data):
    result = invoke("evaluate", "--model", teacher, "--tasks", "arc_easy,nope", "--data-dir", shared_data)
    assert_one_line_error(result, "unknown lm-eval task 'nope'", "lm-eval ls tasks", "--include-path")


# --------------------------------------------------------------------------- data


def test_missing_data(root, teacher, corpus, intact_run):
    missing = root / "no-such-corpus.txt"
    space = write_space(root, "missing-data.yaml", space_dict(teacher, corpus, retrain={"data": str(missing)}))
    result = invoke("search", space, "--out", root / "missing-data-run")
    assert_one_line_error(result, f"data path '{missing}' not found", "check --data", alone=False)
    # resuming a finished run with it is refused before any data is read: the study was made from other data
    result = invoke("search", space, "--out", intact_run, "--resume")
    assert_one_line_error(result, "was made from other inputs (retrain was", alone=False)


def test_empty_data(root, teacher, intact_rankings):
    empty = root / "empty.txt"
    empty.write_text("\n\n  \n")
    result = invoke("rank", "--model", teacher, "--data", empty, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, str(empty), "gives no block of 32 tokens", "give more text", alone=False)


GOOD_LINE = "A line of plain text for the calibration corpus, long enough to fill blocks.\n"
LATIN_1 = GOOD_LINE.encode() * 3 + "Un café crème, s'il vous plaît.\n".encode("latin-1")
CUT_JSONL = (json.dumps({"text": GOOD_LINE}) + "\n") * 3 + json.dumps({"text": GOOD_LINE})[:30] + "\n" + json.dumps({"text": GOOD_LINE}) + "\n"


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("binary.txt", bytes(range(256)) * 64, ("is not UTF-8 text (a NUL byte at offset 0", "binary data or UTF-16", "convert it to UTF-8")),
        ("utf-16.txt", (GOOD_LINE * 20).encode("utf-16"), ("is not UTF-8 text (a NUL byte at offset 3", "convert it to UTF-8")),
        ("latin-1.txt", LATIN_1 * 20, (f"is not UTF-8 text (byte 0xe9 at offset {LATIN_1.index(0xE9)})", "convert it to UTF-8")),
        (
            "latin-1.jsonl",
            b"".join(json.dumps({"text": line}).encode() + b"\n" for line in [GOOD_LINE] * 20) + '{"text": "café"}\n'.encode("latin-1"),
            (f"is not UTF-8 text (byte 0xe9 at offset {20 * len(json.dumps({'text': GOOD_LINE})) + 20 + 13})", "convert it to UTF-8"),
        ),
        ("cut.jsonl", CUT_JSONL.encode() * 20, ("has invalid JSON at line 4", "cut short?", "fix or remove that line")),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_data_that_is_not_text(root, teacher, intact_rankings, name, content, fragments):
    """Garbage bytes used to be ranked as if they were text (or ended in a traceback)."""
    data = root / name
    data.write_bytes(content)
    result = invoke("rank", "--model", teacher, "--data", data, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"'{data}'" if name != "cut.jsonl" else str(data), *fragments, alone=False)


def test_half_a_parquet_file(root, teacher, intact_rankings):
    whole = root / "whole.parquet"
    pd.DataFrame({"text": [GOOD_LINE] * 400}).to_parquet(whole)
    half = root / "half.parquet"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    result = invoke("rank", "--model", teacher, "--data", half, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"'{half}' is not a readable Parquet file", "ArrowInvalid", "copy or write it again", alone=False)


def test_fifo_as_data(tmp_path, teacher, intact_rankings):
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    result = invoke("rank", "--model", teacher, "--data", fifo, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"data path '{fifo}' is not a regular file or folder", "point --data at a file or folder", alone=False)


@pytest.mark.parametrize("command", ["rank", "loss"])
def test_zero_samples(teacher, corpus, intact_rankings, command):
    out = ["--out", intact_rankings, "--overwrite"] if command == "rank" else []
    result = invoke(command, "--model", teacher, "--data", corpus, *out, "--samples", "0", "--seq-len", "32")
    expected = "--samples is 0: give a positive whole number" if command == "rank" else "samples must be at least 1, not 0"  # rank: RankSettings' own check
    assert_one_line_error(result, expected, "--samples", alone=False)


# --------------------------------------------------------------------------- rankings and models


def test_corrupt_rankings(root, teacher, rankings_dir):
    corrupt = root / "corrupt-rankings"
    shutil.copytree(rankings_dir, corrupt)
    tensors = corrupt / "rankings.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])  # truncated mid-file
    before = snapshot(corrupt)
    out = root / "pruned-from-corrupt"
    result = invoke("prune", "--model", teacher, "--rankings", corrupt, "--arch", SMALL_ARCH, "--out", out)
    assert_one_line_error(result, f"rankings in '{corrupt}' are corrupt", "rerun `minitron-nas rank`", alone=False)
    assert snapshot(corrupt) == before and not out.exists() and not leftovers(root)


def test_mismatched_rankings(root, teacher, corpus, rankings_dir):
    other = root / "other-teacher"
    save_model(tiny_model("llama", seed=1, vocab_size=257), other, byte_tokenizer())
    other_rankings = root / "other-rankings"
    assert invoke("rank", "--model", other, "--data", corpus, "--out", other_rankings, *TINY_RANK).exit_code == 0
    before = snapshot(other_rankings)
    out = root / "pruned-from-other"
    result = invoke("prune", "--model", teacher, "--rankings", other_rankings, "--arch", SMALL_ARCH, "--out", out)
    assert_one_line_error(result, "was made from other inputs (teacher_fingerprint was", "rank this teacher first", alone=False)
    assert snapshot(other_rankings) == before and not out.exists() and not leftovers(root)


def test_unsupported_model_type(root, intact_rankings):
    gpt2 = root / "gpt2"
    GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=257).save_pretrained(gpt2)
    result = invoke("rank", "--model", gpt2, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, "Model type 'gpt2' is not supported: the supported types are llama", "families.py")


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("command", ["rank", "search"])
def test_unwritable_output_folder(root, teacher, good_space, command, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    if command == "rank":
        result = invoke("rank", "--model", teacher, "--out", blocker / "rankings", *TINY_RANK)
    else:
        result = invoke("search", good_space, "--out", blocker / "run")
    assert_one_line_error(result, "cannot write to", str(blocker), "choose a writable --out")
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _disk_full(path, *args, **kwargs):
    """A write that runs out of space half-way: some bytes land, then ENOSPC."""
    target = Path(path)
    target = target / "model.safetensors" if target.is_dir() else target
    target.write_bytes(b"\0" * 1024)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))


@pytest.mark.parametrize("what", ["rankings", "model"])
def test_disk_full_during_a_checkpoint(root, teacher, corpus, rankings_dir, monkeypatch, what):
    """ENOSPC while a folder is written: one line naming it, the previous version untouched."""
    if what == "rankings":
        out = root / "rankings-to-replace"
        shutil.copytree(rankings_dir, out)
        monkeypatch.setattr(saving, "save_file", lambda tensors, path, *a, **k: _disk_full(path))
        command = ["rank", "--model", teacher, "--data", corpus, "--out", out, "--overwrite", *TINY_RANK]
    else:
        out = root / "model-to-replace"
        assert invoke("prune", "--model", teacher, "--rankings", rankings_dir, "--arch", SMALL_ARCH, "--out", out).exit_code == 0
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda self, path, *a, **k: _disk_full(path))
        command = ["prune", "--model", teacher, "--rankings", rankings_dir, "--arch", SMALL_ARCH, "--out", out, "--overwrite"]
    before = snapshot(out)
    result = invoke(*command)
    assert_one_line_error(result, f"'{out}'", "no space left", "free disk space", alone=False)
    assert snapshot(out) == before, f"the previous {what} folder was modified"
    assert not leftovers(root)


def test_existing_study_is_not_reused_without_resume(good_space, intact_run):
    result = invoke("search", good_space, "--out", intact_run)
    assert_one_line_error(result, "a study already exists", "pass --resume or choose another --out", alone=False)


def test_unsupported_storage_url(good_space, intact_run):
    result = invoke("search", good_space, "--out", intact_run, "--resume", "--storage", "redis://localhost/0")
    assert_one_line_error(result, "unsupported storage 'redis://localhost/0'", "postgresql://", alone=False)


@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"MINITRON_NAS_GRACE_SECONDS": "soon"}, ("MINITRON_NAS_GRACE_SECONDS='soon'", "fix or unset it")),
        ({"MINITRON_NAS_HEARTBEAT_SECONDS": "30"}, ("must exceed MINITRON_NAS_HEARTBEAT_SECONDS (30)", "raise the grace period")),
    ],
)
def test_bad_heartbeat_settings(good_space, tmp_path, env, fragments):
    """Checked when the search starts, before the run folder is made; a subprocess so this process keeps its own values."""
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "minitron_nas.cli", "search", str(good_space), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert_one_line_error(done, *fragments)
    assert not out.exists()


# --------------------------------------------------------------------------- training


def test_nan_loss_during_retraining(root, teacher, corpus):
    """A huge learning rate: trials fail with their errors recorded, the search goes on while
    any rung can, and ends with one line saying no candidate finished."""
    space = write_space(root, "nan.yaml", space_dict(teacher, corpus, retrain={"lr": 1e9}))
    out = root / "nan-run"
    result = invoke("search", space, "--out", out)
    assert_one_line_error(result, "no candidate finished the search", "trials.csv", alone=False)
    table = pd.read_csv(out / "trials.csv")
    failed = table[table.state == "FAIL"]
    assert len(failed) and failed.error.str.contains("NaN/inf").all(), table
    assert not (table[table.rung == table.rung.max()].state == "COMPLETE").any()  # the last rung reached: all failed
    assert not (out / "best_arch.json").exists()
    retrained = table[table.rung > 0]  # rung 0 scores pruned: nothing to diverge
    assert retrained.error.str.contains("NaN|inf|non-finite|diverged", regex=True).all(), retrained.error.tolist()


# --------------------------------------------------------------------------- types and ranges of the space's keys

LR = RetrainSettings().lr
TOLERANCE = Budget(parameters=1).tolerance


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"retrain": {"lr": "abc"}}, (f"retrain.lr is 'abc': give a positive number such as {LR:g}",)),
        ({"budget": {"tolerance": 2}}, (f"budget.tolerance is 2: give a number in (0, 1) such as {TOLERANCE:g}",)),
        ({"budget": {"parameters": "many"}}, ("budget.parameters is 'many'", "give a positive whole number")),
        ({"seed": -1}, ("seed is -1", "give a whole number in [0,")),
        ({"trials": 1.5}, ("trials is 1.5", "give a positive whole number")),
        ({"scoring": {"limit": 0}}, ("scoring.limit is 0", "give a positive whole number")),
        ({"scoring": {"heldout_samples": "four"}}, ("scoring.heldout_samples is 'four'", f"such as {ScoringSettings().heldout_samples}")),
        ({"axes": {**AXES, "hidden_size": {"range": [32]}}}, ("axes.hidden_size.range is [32]", "give two integers [lo, hi]")),
        ({"family": [40000, "big"]}, ("family[1] is 'big'", "give a positive whole number")),
        ({"distill": {"intermediate": "sometimes"}}, ("distill.intermediate is 'sometimes'", "use auto, on or off")),
        ({"retrain": "fast"}, ("'retrain' is 'fast'", "give a mapping of its settings")),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_bad_value_in_search_space(root, teacher, corpus, intact_run, changes, fragments):
    space = space_dict(teacher, corpus)
    for key, value in changes.items():
        space[key] = {**space[key], **value} if isinstance(value, dict) and isinstance(space.get(key), dict) and key != "axes" else value
    path = write_space(root, "bad-value.yaml", space)
    result = invoke("search", path, "--out", intact_run, "--resume")
    assert_one_line_error(result, *fragments)


def test_budget_without_parameters(root, teacher, corpus, intact_run):
    space = space_dict(teacher, corpus)
    space["budget"] = {"tolerance": 0.25}
    result = invoke("search", write_space(root, "no-parameters.yaml", space), "--out", intact_run, "--resume")
    assert_one_line_error(result, "'budget' lacks 'parameters'", "add budget.parameters")


# --------------------------------------------------------------------------- unreadable model files


def test_truncated_gguf(tmp_path, intact_rankings, monkeypatch):
    source = embedded_gguf(next(iter(EMBEDDED)))
    if not source.is_file():
        pytest.fail(f"the embedded GGUF teacher is missing ({source}): run `make setup`")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(source.read_bytes()[: source.stat().st_size // 3])
    monkeypatch.setenv("MINITRON_NAS_CACHE", str(tmp_path / "cache"))
    result = invoke("rank", "--model", cut, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"GGUF file '{cut}' is unreadable", "may be truncated", "download it again")
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_unreadable_model_weights(root, teacher, intact_rankings, damage):
    broken = root / f"teacher-{damage}"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(teacher, broken)
    weights = broken / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\0" * 64)
    else:
        weights.unlink()
    before = snapshot(broken)
    result = invoke("rank", "--model", broken, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    if damage == "missing":
        assert_one_line_error(result, f"'{broken}' holds no weights", "save_pretrained")
    else:
        assert_one_line_error(result, f"the weights in '{broken}' are unreadable", "SafetensorError", "may be truncated")
    assert snapshot(broken) == before


def _edited_config(teacher: Path, folder: Path, **changes) -> Path:
    """A copy of the teacher whose config.json says something its weights do not."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    return folder


@pytest.mark.parametrize(
    "changes, fragments",
    [
        ({"num_hidden_layers": 6}, ("18 missing, e.g. 'model.layers.4.",)),
        ({"num_hidden_layers": 3}, ("9 unexpected, e.g. 'model.layers.3.",)),
        ({"intermediate_size": 64}, ("of another shape, e.g. 'model.layers.0.mlp.down_proj.weight'",)),
    ],
    ids=["more-layers", "fewer-layers", "other-sizes"],
)
def test_config_that_does_not_match_the_weights(root, teacher, intact_rankings, changes, fragments):
    """transformers fills the weights a config claims but the files lack with random values."""
    folder = _edited_config(teacher, root / "teacher-edited-config", **changes)
    before = snapshot(folder)
    result = invoke("rank", "--model", folder, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"the config.json of '{folder}' does not match its weights in model.safetensors", *fragments, "fix config.json")
    assert snapshot(folder) == before


@pytest.mark.parametrize("command", ["rank", "count"])
def test_hidden_size_not_divisible_by_heads(root, teacher, intact_rankings, command):
    folder = _edited_config(teacher, root / "teacher-indivisible", hidden_size=50, head_dim=None)
    model = folder if command == "rank" else folder / "config.json"
    extra = ["--out", intact_rankings, "--overwrite", *TINY_RANK] if command == "rank" else []
    result = invoke(command, "--model", model, *extra)
    assert_one_line_error(
        result, f"the config of '{model}' is invalid", "hidden size (50) is not a multiple of the number of attention heads (6)", "fix its config.json"
    )


def test_tokenizer_larger_than_the_vocabulary(root, intact_rankings):
    """Token ids past the embedding ended in an IndexError half-way through ranking."""
    folder = root / "teacher-small-vocabulary"
    if not folder.exists():
        save_model(tiny_model("llama", vocab_size=128), folder, byte_tokenizer())
    result = invoke("rank", "--model", folder, "--out", intact_rankings, "--overwrite", *TINY_RANK)
    assert_one_line_error(result, f"the tokenizer of '{folder}' has 257 ids but the model's vocabulary only 128", "the model's own tokenizer", alone=False)


@pytest.mark.parametrize("command", ["rank", "loss"])
def test_seq_len_beyond_the_model_s_positions(teacher, corpus, intact_rankings, command):
    out = ["--out", intact_rankings, "--overwrite"] if command == "rank" else []
    result = invoke(command, "--model", teacher, "--data", corpus, *out, "--samples", "4", "--seq-len", "256")
    assert_one_line_error(result, "--seq-len", "256 is above the model's max_position_embeddings (128)", "make it 128 or less", alone=False)


def test_zero_batch_size(teacher, corpus, intact_rankings):
    result = invoke(
        "rank", "--model", teacher, "--data", corpus, "--out", intact_rankings, "--overwrite", "--samples", "4", "--seq-len", "32", "--batch-size", "0"
    )
    assert_one_line_error(result, "--batch-size is 0", "give a positive whole number", alone=False)  # RankSettings' own range check


# --------------------------------------------------------------------------- stages out of order, lost storage


@pytest.mark.parametrize(
    "command, fragments",
    [
        ("distill", ("no best_arch.json in", "run `minitron-nas search` first")),
        ("export", ("no distilled model in", "run `minitron-nas distill` first")),
    ],
)
def test_stage_before_its_inputs_exist(good_space, tmp_path, command, fragments):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    result = invoke(command, good_space, "--out", empty)
    assert_one_line_error(result, *fragments)
    assert not any(empty.iterdir())


def test_unreachable_database(good_space, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/minitron"
    result = invoke("search", good_space, "--out", tmp_path / "run", "--storage", url)
    assert_one_line_error(result, "lost the connection to the study's database", "rerun with --resume", alone=False)


# --------------------------------------------------------------------------- resuming from changed inputs

SMALL_DISTILL = {"tokens": 4 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 1e-3, "eval_every": 2, "checkpoint_every": 2, "heldout_samples": 4}


@pytest.fixture(scope="module")
def distill_space(root, teacher, corpus) -> Path:
    return write_space(root, "distill.yaml", space_dict(teacher, corpus, distill={**SMALL_DISTILL, "data": corpus}))


@pytest.fixture(scope="module")
def distilled_run(root, previous_run, distill_space) -> Path:
    """The previous search run, distilled: distill/checkpoint (last step) and distill/model."""
    out = root / "distilled-run"
    shutil.copytree(previous_run, out)
    result = invoke("distill", distill_space, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture
def intact_distilled(distilled_run):
    yield from kept_whole(distilled_run, "the distilled run")


def test_distillation_resumed_with_other_data(root, teacher, corpus, intact_distilled):
    other = root / "other-corpus.txt"
    other.write_text(Path(corpus).read_text()[::-1])
    space = write_space(root, "other-data.yaml", space_dict(teacher, corpus, distill={**SMALL_DISTILL, "data": str(other)}))
    result = invoke("distill", space, "--out", intact_distilled)
    assert_one_line_error(result, "was made from other inputs (training data was", "resume with the original", alone=False)


def test_distillation_resumed_for_another_student(root, distill_space, distilled_run):
    out = fresh_copy(distilled_run, root / "other-student")
    best = json.loads((out / "best_arch.json").read_text())
    best["architecture"]["intermediate_size"] = 96 if best["architecture"]["intermediate_size"] != 96 else 48
    (out / "best_arch.json").write_text(json.dumps(best))
    before = snapshot(out)
    result = invoke("distill", distill_space, "--out", out)
    assert_one_line_error(result, "was made from other inputs (student architecture.intermediate_size was", alone=False)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "command, damaged, kept_bytes, fragments",
    [
        ("distill", "distill/checkpoint/optimizer.bin", 100, ("checkpoint in", "is unreadable", "delete it to start the distillation over")),
        ("export", "distill/model/model.safetensors", 1000, ("are unreadable", "rerun `minitron-nas distill`")),
    ],
)
def test_a_cut_file_of_a_distilled_run_is_refused_untouched(root, distill_space, distilled_run, command, damaged, kept_bytes, fragments):
    """A cut checkpoint (distill) or distilled model (export): one line naming it, the run folder unchanged."""
    out = fresh_copy(distilled_run, root / f"cut-for-{command}")
    (out / damaged).write_bytes((out / damaged).read_bytes()[:kept_bytes])
    before = snapshot(out)
    result = invoke(command, distill_space, "--out", out)
    assert_one_line_error(result, *fragments, alone=False)
    assert snapshot(out) == before and not (out / "export").exists()


@pytest.mark.parametrize(
    "options, fragments",
    [
        (("--gguf", "q4_k"), ("--gguf 'q4_k' is not a GGUF type written here", "give one of f16, bf16, q8_0")),
        (("--check",), ("--check compares a GGUF file with transformers", "add --gguf f16")),
    ],
)
def test_export_gguf_options_are_checked_before_any_work(distill_space, intact_distilled, options, fragments):
    result = invoke("export", distill_space, "--out", intact_distilled, *options)
    assert_one_line_error(result, *fragments)


def test_export_with_gguf_writes_it_beside_the_folder(root, distill_space, distilled_run, monkeypatch):
    out = fresh_copy(distilled_run, root / "gguf-export")
    for binding in ("llama_cpp", "ik_llama_cpp"):
        monkeypatch.setitem(sys.modules, binding, None)  # the check says why it is skipped, in one line
    result = invoke("export", distill_space, "--out", out, "--gguf", "q8_0", "--check")
    assert result.exit_code == 0, result.output
    path = out / "export-q8_0.gguf"
    assert path.is_file() and (out / "export" / "model.safetensors").is_file() and not leftovers(out)
    assert "GGUF (q8_0) -> " in result.output and "GGUF check skipped: llama.cpp is not installed" in result.output
    name = json.loads((out / "export" / "best_arch.json").read_text())["name"]
    assert gguf.GGUFReader(str(path)).fields["general.name"].contents() == name


@pytest.mark.parametrize(
    "options, fragments",
    [
        (("--front-by", "params"), ("--front-by chooses the size of --front's Pareto front", "add --front")),
        (("--front", "--gguf", "q8_0"), ("--front writes model folders only", "drop --gguf")),
        (("--front", "--front-by", "speed"), ("--front-by 'speed' is not a size a front is drawn over", "give --front-by params or --front-by latency")),
        (("--front", "--front-by", "latency"), ("the search measured no decode latency", "set `latency: {measure: true}`")),
    ],
)
def test_export_front_options_are_checked_before_any_work(good_space, intact_run, options, fragments):
    result = invoke("export", good_space, "--out", intact_run, *options)
    assert_one_line_error(result, *fragments)
    assert not (intact_run / "family").exists()


def test_export_front_before_a_finished_search(good_space, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    result = invoke("export", good_space, "--out", empty, "--front")
    assert_one_line_error(result, "no finished search in", "run `minitron-nas search` to its last rung first")
    assert not any(empty.iterdir())


def test_export_front_of_a_search_that_recorded_no_front(root, good_space, previous_run):
    out = root / "no-front"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(previous_run, out)
    best = json.loads((out / "best_arch.json").read_text())
    del best["front"]
    (out / "best_arch.json").write_text(json.dumps(best))
    before = snapshot(out)
    result = invoke("export", good_space, "--out", out, "--front")
    assert_one_line_error(result, "records no Pareto front", "rerun `minitron-nas search --resume`")
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def started_run(root, teacher, corpus) -> tuple[Path, Path, Path]:
    """(space, its corpus, run folder) of a `run` stopped at its first stage: run.json written, nothing else finished."""
    data = root / "run-corpus.txt"
    shutil.copy(corpus, data)
    space = write_space(root, "run.yaml", space_dict(teacher, str(data), ranking={"data": str(data)}, distill={**SMALL_DISTILL, "data": str(data)}))
    out = root / "started-run"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ranking, "compute_rankings", stop)
        result = invoke("run", space, "--out", out)
    assert result.exit_code == 130 and (out / "run.json").is_file(), result.output
    return space, data, out


@pytest.mark.parametrize("change", ["settings", "data", "teacher"])
def test_run_resumed_from_changed_inputs(root, teacher, started_run, change):
    space, data, out = started_run
    text = yaml.safe_load(space.read_text())
    before = snapshot(out)
    original = data.read_bytes()
    try:
        if change == "settings":
            text["retrain"]["lr"] = text["retrain"]["lr"] * 2
            fragments = ("was made from other settings", f"retrain.lr was {json.dumps(text['retrain']['lr'] / 2)}")
        elif change == "data":
            data.write_bytes(original[: len(original) // 2])
            fragments = ("was made from other data", f"'{data}' whose content changed")
        else:
            other = root / "other-run-teacher"
            if not other.exists():
                save_model(tiny_model("llama", seed=2, vocab_size=257), other, byte_tokenizer())
            text["teacher"] = str(other)
            fragments = ("was made from another teacher", "fingerprint")
        changed = write_space(root, f"run-changed-{change}.yaml", text)
        result = invoke("run", changed, "--out", out)
        assert_one_line_error(result, f"run folder '{out}'", *fragments, "use another --out", alone=change != "teacher")
    finally:
        data.write_bytes(original)
    assert snapshot(out) == before and not leftovers(out)


# --------------------------------------------------------------------------- state cut short or overwritten


def _copy(source: Path, folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    return folder


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("command", ["search", "run", "dashboard"])
@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_damaged_study_database(root, good_space, previous_run, damage, command):
    """Optuna read a cut study.db as an empty study (or failed in a traceback): refused, nothing touched."""
    out = _copy(previous_run, root / f"study-{damage}-{command}")
    db = out / "study.db"
    _cut(db) if damage == "cut" else db.write_bytes(b"not a database\n" * 512)
    before = snapshot(out)
    args = {"search": ("search", good_space, "--out", out, "--resume"), "run": ("run", good_space, "--out", out), "dashboard": ("dashboard", out)}
    result = invoke(*args[command])
    assert_one_line_error(result, f"the study database '{db}' is unreadable", "delete it to start the search over, or restore it", alone=False)
    assert snapshot(out) == before and not leftovers(out)


def test_cut_stages_file(root, started_run):
    space, _, started = started_run
    out = _copy(started, root / "cut-stages")
    (out / "stages.json").write_text('{"rank": {"finished": "2026-')
    before = snapshot(out)
    result = invoke("run", space, "--out", out)
    assert_one_line_error(result, f"'{out / 'stages.json'}' is corrupt", "delete it and rerun the same command", alone=False)
    assert snapshot(out) == before


def test_cut_run_file(root, started_run):
    space, _, started = started_run
    out = _copy(started, root / "cut-run-file")
    _cut(out / "run.json")
    before = snapshot(out)
    result = invoke("run", space, "--out", out)
    assert_one_line_error(result, f"'{out / 'run.json'}' is corrupt", "delete it", "or use another --out", alone=False)
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["distill", "export"])
def test_cut_best_arch(root, distill_space, distilled_run, command):
    out = _copy(distilled_run, root / f"cut-best-arch-{command}")
    _cut(out / "best_arch.json")
    before = snapshot(out)
    result = invoke(command, distill_space, "--out", out)
    assert_one_line_error(result, f"'{out / 'best_arch.json'}' is corrupt", "delete it and rerun `minitron-nas search", alone=False)
    assert snapshot(out) == before


@pytest.mark.parametrize("damage", ["cut", "missing"])
def test_damaged_distill_summary(root, distill_space, distilled_run, damage):
    out = _copy(distilled_run, root / f"summary-{damage}")
    summary = out / "distill" / "summary.json"
    _cut(summary) if damage == "cut" else summary.unlink()
    before = snapshot(out)
    result = invoke("export", distill_space, "--out", out)
    problem = "is corrupt" if damage == "cut" else "is missing"
    assert_one_line_error(result, f"'{summary}' {problem}", "rerun `minitron-nas distill`", alone=False)
    assert snapshot(out) == before and not (out / "export").exists()


def _failed_write(code: int, filename) -> None:
    """A safetensors write that fails half-way: some bytes land, then Rust's io::Error in a SafetensorError."""
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"\0" * 1024)
    raise SafetensorError(f'Error while serializing: IoError(Os {{ code: {code}, kind: Other, message: "{os.strerror(code)}" }})')


WRITE_ERRORS = [
    (errno.ENOSPC, ("no space left on the device", "free disk space")),
    (errno.EROFS, ("is on a read-only file system", "remount it read-write or choose another --out")),
    (errno.EACCES, ("permission denied while writing", "fix the folder's permissions")),
]


@pytest.mark.parametrize("code, fragments", WRITE_ERRORS, ids=[errno.errorcode[code] for code, _ in WRITE_ERRORS])
def test_write_error_during_a_checkpoint_save(root, distill_space, previous_run, monkeypatch, code, fragments):
    """safetensors raises SafetensorError, not OSError: still one line naming the checkpoint, the run untouched."""
    import accelerate.utils.other

    out = _copy(previous_run, root / f"checkpoint-{errno.errorcode[code]}")
    before = snapshot(out)
    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", lambda tensors, filename, *a, **k: _failed_write(code, filename))
    result = invoke("distill", distill_space, "--out", out)
    assert_one_line_error(result, f"'{out / 'distill' / 'checkpoint'}'", *fragments, alone=False)
    assert {name: data for name, data in snapshot(out).items() if name in before} == before
    assert not (out / "distill" / "checkpoint").exists() and not leftovers(out)


@pytest.mark.parametrize("code, fragments", WRITE_ERRORS, ids=[errno.errorcode[code] for code, _ in WRITE_ERRORS])
def test_write_error_in_a_library(good_space, tmp_path, monkeypatch, code, fragments):
    """A write no atomic writer wraps (a library's own file) still ends in one line naming the file."""
    import minitron_nas.recipes.search as recipe

    target = tmp_path / "somewhere" / "file.bin"

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(target))

    monkeypatch.setattr(recipe, "run_search", fail)
    result = invoke("search", good_space, "--out", tmp_path / "run")
    assert_one_line_error(result, f"'{target}'", *fragments, alone=False)


@pytest.mark.parametrize(
    "reason, fragments",
    [
        ("database or disk is full", ("no space left on the device while writing the study's database", "free disk space", "--resume")),
        ("attempt to write a readonly database", ("the study's database is read-only", "make the file and its folder writable")),
    ],
    ids=["full", "read-only"],
)
def test_study_database_write_error(good_space, tmp_path, monkeypatch, reason, fragments):
    """SQLite names neither errno nor file: still not 'check that the server runs'."""
    import sqlite3

    import sqlalchemy.exc

    import minitron_nas.recipes.search as recipe

    def fail(*args, **kwargs):
        raise sqlalchemy.exc.OperationalError("INSERT INTO trials", None, sqlite3.OperationalError(reason))

    monkeypatch.setattr(recipe, "run_search", fail)
    line = assert_one_line_error(invoke("search", good_space, "--out", tmp_path / "run"), *fragments, alone=False)
    assert "server" not in line


@pytest.mark.parametrize("storage", ["study.journal", "study.db"])
def test_storage_in_a_missing_folder(good_space, tmp_path, storage):
    missing = tmp_path / "no-such-folder"
    url = str(missing / storage) if storage.endswith(".journal") else f"sqlite:///{missing / storage}"
    result = invoke("search", good_space, "--out", tmp_path / "run", "--storage", url)
    assert_one_line_error(result, f"the folder '{missing}' of the study file '{storage}' does not exist", "create it (mkdir -p)", alone=False)
    assert not missing.exists()


def test_read_only_study_database(root, good_space, previous_run, monkeypatch):
    """Root may write any file, so the refusal's own check is made to see the file read-only."""
    out = _copy(previous_run, root / "read-only-study")
    db = out / "study.db"
    db.chmod(0o444)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: access(path, mode, **kw) and not (Path(path) == db and mode & os.W_OK))
    before = snapshot(out)
    line = assert_one_line_error(
        invoke("search", good_space, "--out", out, "--resume"), f"the study database '{db}' is read-only", "make both writable (chmod u+w)", alone=False
    )
    assert "server" not in line and snapshot(out) == before


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_cache_variable_that_is_not_a_folder(tmp_path, intact_rankings, monkeypatch, where):
    """The GGUF teacher is converted into the cache: the line names the variable, not --out."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MINITRON_NAS_CACHE", str(blocker if where == "file" else blocker / "cache"))
    result = invoke("rank", "--model", embedded_gguf(next(iter(EMBEDDED))), "--out", intact_rankings, "--overwrite", *TINY_RANK)
    fragments = (
        (f"MINITRON_NAS_CACHE='{blocker}' is a file", "point MINITRON_NAS_CACHE at a folder")
        if where == "file"
        else (str(blocker), "point MINITRON_NAS_CACHE at a writable folder")
    )
    line = assert_one_line_error(result, *fragments, alone=False)
    assert "--out" not in line and blocker.read_text() == "not a folder"


def test_corrupt_teacher_logit_cache(root, good_space, previous_run):
    """Read once the study is open (which marks it resumed); every other file stays as it was."""
    out = _copy(previous_run, root / "corrupt-teacher-logits")
    _cut(out / "teacher_logits" / "teacher_topk.safetensors")
    before = snapshot(out)
    result = invoke("search", good_space, "--out", out, "--resume")
    assert_one_line_error(
        result, f"the teacher logit cache in '{out / 'teacher_logits'}' is corrupt", "delete the folder to rebuild it from the teacher", alone=False
    )
    after = snapshot(out)
    assert after.keys() == before.keys() and all(after[name] == data for name, data in before.items() if name != "study.db")


# --------------------------------------------------------------------------- one process per run folder

HOLD = "import sys, time\nfrom minitron_nas.files import run_lock\nwith run_lock(sys.argv[1], 'search'):\n    print('held', flush=True)\n    time.sleep(120)\n"


@pytest.mark.parametrize("command", ["search", "distill", "export", "run"])
def test_run_folder_in_use(root, good_space, distill_space, distilled_run, command):
    """A second process on a run folder is refused before it writes anything, naming the holder."""
    import socket

    out = _copy(distilled_run, root / f"in-use-{command}")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=_this_checkout())
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        args = ("search", good_space, "--out", out, "--resume") if command == "search" else (command, distill_space, "--out", out)
        result = invoke(*args)
        assert_one_line_error(
            result,
            f"run folder '{out}' is in use by `search` (pid {holder.pid} on {socket.gethostname()}, since 20",
            f"wait for it to finish, or delete '{out / '.minitron.lock'}' if that process is gone",
        )
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_process_that_is_gone(root, good_space, previous_run):
    """A killed holder's record is taken over with a warning; the lock is gone again afterwards."""
    out = _copy(previous_run, root / "stale-lock")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    import socket

    (out / ".minitron.lock").write_text("")
    (out / ".minitron.lock.json").write_text(
        json.dumps({"pid": child.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "stage": "distill"})
    )
    result = invoke("search", good_space, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert f"warning: took over the lock of run folder '{out}' from `distill` (pid {child.pid}" in result.output and "which is gone" in result.output
    assert not (out / ".minitron.lock").exists() and not (out / ".minitron.lock.json").exists()


# --------------------------------------------------------------------------- interrupts

INTERRUPTIBLE = """
import atexit, sys, time
import minitron_nas.search.candidates as candidates
from minitron_nas.cli.app import app

def wait(path):
    print("ready", flush=True)
    time.sleep(60)

candidates.load_space = wait
atexit.register(time.sleep, 0.5)  # a library's cleanup at exit, as torch's and Optuna's are
sys.argv = ["minitron-nas", "enumerate", "space.yaml"]
app()
"""


def test_ctrl_c_twice():
    """The second Ctrl-C (20 ms after the first) lands while the command exits: still one line, no traceback."""
    import signal
    import time

    worker = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_this_checkout())
    assert worker.stdout.readline().strip() == "ready"
    worker.send_signal(signal.SIGINT)
    time.sleep(0.02)
    worker.send_signal(signal.SIGINT)
    out, err = worker.communicate(timeout=60)
    assert worker.returncode == 130, out + err
    assert "Traceback" not in err and "Exception ignored" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if line.strip()] == ["interrupted: nothing was written; rerun the same command"]
