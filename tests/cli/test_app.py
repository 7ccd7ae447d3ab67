"""The command line: real runs on the embedded teacher, and one-line errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error
from transformers import GPT2Config
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.config.settings import RankSettings

runner = CliRunner()
TINY_RANK = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def no_partial_left(folder: Path) -> bool:
    return not any(".partial-" in p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def wikitext(shared_data) -> str:
    return str(shared_data / "wikitext2" / "valid.txt")


@pytest.fixture(scope="module")
def ranked(tmp_path_factory, wikitext) -> Path:
    out = tmp_path_factory.mktemp("rank") / "rankings"
    result = invoke("rank", "--model", "smollm2-135m", "--data", wikitext, "--out", out, *TINY_RANK)
    assert result.exit_code == 0, result.output
    return out


def test_count_prints_exact_counts_of_the_teacher():
    result = invoke("count", "--model", "smollm2-135m")
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["total"] == 134_515_008  # SmolLM2-135M, tied embeddings
    assert counts["non_embedding"] == 134_515_008 - 49152 * 576


@pytest.mark.teacher
def test_rank_then_prune_gives_a_folder_plain_transformers_loads(ranked, tmp_path):
    meta = json.loads((ranked / "rankings.json").read_text())
    assert meta["samples"] == 4 and meta["aggregation"] == {"batch": "l2", "seq": "mean"}
    out = tmp_path / "pruned"
    arch = '{"hidden_size": 384, "intermediate_size": 768, "num_attention_heads": 6, "num_key_value_heads": 2, "num_hidden_layers": 20}'
    result = invoke("prune", "--model", "smollm2-135m", "--rankings", ranked, "--arch", arch, "--out", out)
    assert result.exit_code == 0, result.output
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('The capital of France is', return_tensors='pt').input_ids\n"
        "print(m.config.num_hidden_layers, m.config.hidden_size, sum(p.numel() for p in m.parameters()), tuple(m(ids).logits.shape))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
    layers, hidden, params, shape = loaded.stdout.split(maxsplit=3)
    provenance = json.loads((out / "minitron.json").read_text())
    assert (int(layers), int(hidden)) == (20, 384)
    assert int(params) == provenance["parameters"]["total"]
    assert "49152" in shape


@pytest.mark.teacher
def test_rankings_of_another_teacher_are_refused(ranked, tmp_path):
    meta_file = ranked.parent / "other" / "rankings.json"
    meta_file.parent.mkdir()
    (meta_file.parent / "rankings.safetensors").write_bytes((ranked / "rankings.safetensors").read_bytes())
    meta_file.write_text(json.dumps({**json.loads((ranked / "rankings.json").read_text()), "teacher_fingerprint": "0" * 16}))
    result = invoke("prune", "--rankings", meta_file.parent, "--arch", '{"intermediate_size": 768}', "--out", tmp_path / "x")
    assert_one_line_error(result, "was made from other inputs (teacher_fingerprint was", "rank this teacher first")
    assert not (tmp_path / "x").exists()


def test_unknown_model_type_is_refused(tmp_path):
    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    assert_one_line_error(invoke("count", "--model", tmp_path / "gpt2"), "Model type 'gpt2' is not supported: the supported types are llama", "families.py")


def test_model_type_transformers_does_not_know_is_named_with_the_supported_families(tmp_path):
    folder = tmp_path / "mystery"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery_lm", "hidden_size": 8}))
    for model in (folder, folder / "config.json"):
        result = invoke("count", "--model", model)
        assert_one_line_error(result, "Model type 'mystery_lm' is not supported: ", "llama, mistral, qwen2, qwen3, gemma3_text")
        assert result.output.rstrip().endswith("."), result.output


def test_help_and_argument_errors_do_not_import_torch():
    """The front door answers without the heavy libraries: only the commands that need them load them."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from minitron_nas.cli.app import app\n"
        "for args in (['--help'], ['search', '--help'], ['search']):\n"
        "    CliRunner().invoke(app, args)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'optuna', 'lm_eval') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_architecture_larger_than_the_teacher_is_refused():
    result = invoke("count", "--arch", '{"intermediate_size": 4096}')
    assert_one_line_error(result, "intermediate_size=4096", "larger than the teacher")


def test_architecture_transformers_would_refuse_is_refused_before_work():
    result = invoke("count", "--arch", '{"hidden_size": 500}')  # 500 % 9 heads != 0
    assert_one_line_error(result, "transformers refuses this architecture")


def test_unknown_architecture_key_is_refused():
    assert_one_line_error(invoke("count", "--arch", '{"hiden_size": 64}'), "unknown architecture key 'hiden_size'")


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_missing_or_empty_data_is_refused(tmp_path, case):
    data = tmp_path / "corpus.txt"
    if case == "empty":
        data.write_text("\n\n")
    result = invoke("rank", "--data", data, "--out", tmp_path / "r", *TINY_RANK)
    assert_one_line_error(result, str(data))
    assert not (tmp_path / "r").exists() and no_partial_left(tmp_path)


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke("rank", "--out", blocker / "rankings", *TINY_RANK)
    assert_one_line_error(result, "cannot write", "writable --out")


@pytest.mark.teacher
def test_existing_output_is_never_overwritten_by_default(ranked, tmp_path):
    before = (ranked / "rankings.safetensors").read_bytes()
    result = invoke("rank", "--data", "shakespeare", "--out", ranked, *TINY_RANK)
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (ranked / "rankings.safetensors").read_bytes() == before


def test_bad_aggregation_is_refused(tmp_path):
    result = invoke("rank", "--batch-agg", "median", "--out", tmp_path / "r", *TINY_RANK)
    assert_one_line_error(result, "unknown batch aggregation 'median'")


def test_rank_options_are_the_rank_settings():
    """Defaults and help of `rank` come from RankSettings: one place for both."""
    from minitron_nas.config.settings import RankSettings, field_doc

    result = runner.invoke(app, ["rank", "--help"])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.replace("│", " ").split())  # rich wraps help inside a box
    for name in ("samples", "seq_len", "batch_size", "heldout_samples"):
        assert field_doc(RankSettings, name) in flat, name
        assert f"[default: {getattr(RankSettings, name)}]" in flat.split(f"--{name.replace('_', '-')} ")[1][:400], name


def test_options_that_mirror_a_settings_field_share_its_default():
    """Where a command's option is a field of the settings it fills, the default lives in the settings:
    the option's default is that field's, or None (the field's default applies)."""
    import dataclasses

    import typer.main

    from minitron_nas.config.space import ScoringSettings

    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    for command, settings in (("rank", RankSettings), ("evaluate", ScoringSettings)):
        defaults = {f.name: f.default for f in dataclasses.fields(settings)}
        shared = [p for p in commands[command].params if p.name in defaults]
        assert len(shared) >= 3, (command, [p.name for p in shared])
        for param in shared:
            empty = param.default in ((), []) and defaults[param.name] == ()
            assert param.default is None or param.default == defaults[param.name] or empty, (command, param.name, param.default)


def test_each_command_is_one_api_function_with_the_same_options():
    """The CLI is the Python API: a command's options are the arguments of the one function it calls
    (`rank`'s calibration options fill that function's RankSettings)."""
    import dataclasses
    import inspect

    import typer.main

    import minitron_nas

    api = {
        "rank": "rank_model",
        "count": "count_parameters",
        "prune": "prune_model",
        "loss": "model_loss",
        "evaluate": "evaluate_model",
        "dashboard": "report_stage",
    }
    commands = {c.name: c for c in typer.main.get_command(app).commands.values()}
    for command, name in api.items():
        assert name in minitron_nas.__all__, name
        arguments = set(inspect.signature(getattr(minitron_nas, name)).parameters)
        options = {p.name for p in commands[command].params}
        if command == "rank":
            options -= {f.name for f in dataclasses.fields(RankSettings)} | {"batch_agg", "seq_agg"}
        assert options <= arguments, (command, sorted(options - arguments))
    for name in minitron_nas.__all__:  # every exported name resolves
        assert getattr(minitron_nas, name) is not None, name
