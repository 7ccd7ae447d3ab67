"""`enumerate` and `count` on the public Nemotron-H 8B config (no weights): the hybrid axes show,
counts equal those of models transformers instantiates, hybrid-only rules are enforced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.model.architecture import student_config
from minitron_nas.recipes.search import feasible_candidates

REPO = Path(__file__).resolve().parents[2]
SPACE = REPO / "search_spaces" / "nemotron-h-8b-to-4b.yaml"
CONFIG = REPO / "search_spaces" / "configs" / "nemotron-h-8b.json"
TEACHER_TOTAL = 8_100_852_736  # a meta NemotronHForCausalLM of the public config

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def meta_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def teacher_layers_of_types(types: list[str], counts: dict[str, int]) -> list[int]:
    """The first counts[t] teacher layers of each type t: any layers of the right types give the student's shapes."""
    kept = []
    for kind, n in counts.items():
        kept += [i for i, t in enumerate(types) if t == kind][:n]
    return sorted(kept)


def write(path: Path, axes: dict, budget: dict) -> Path:
    path.write_text(yaml.safe_dump({"teacher": str(CONFIG), "axes": axes, "budget": budget}))
    return path


def test_count_of_the_public_config_is_the_instantiated_models():
    config = AutoConfig.from_pretrained(CONFIG)
    assert meta_count(config) == TEACHER_TOTAL
    result = invoke("count", "--model", CONFIG)
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["total"] == TEACHER_TOTAL
    assert counts["non_embedding"] == TEACHER_TOTAL - 2 * 131072 * 4096  # untied embedding and output head
    arch = counts["architecture"]
    assert (arch["num_mamba_layers"], arch["num_attention_layers"], arch["num_mlp_layers"], arch["num_hidden_layers"]) == (24, 4, 24, 52)
    assert "active" not in counts


def test_enumerate_shows_the_hybrid_columns_and_counts_what_transformers_builds():
    result = invoke("enumerate", SPACE)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "hidden" in line)
    for column in ("mamba heads", "mamba dim", "mamba layers", "attn layers", "mlp layers", "total", "memory GiB"):
        assert column in header, header
    assert "active" not in header  # no experts
    # every combination of the axes is valid (96, 112 and 128 heads split over 8 groups): 3*3*3*2*2*1*2
    assert "of 216 valid architectures meet the budget" in result.output
    space, feasible, valid = feasible_candidates(SPACE)
    assert valid == 216 and len(feasible) > 10
    config = AutoConfig.from_pretrained(CONFIG)
    for c in feasible[:10]:  # the rows enumerate shows
        a = c.arch
        counts = {"linear_attention": a.num_mamba_layers, "full_attention": a.num_attention_layers, "mlp": a.num_mlp_layers}
        student = student_config(config, a, teacher_layers_of_types(config.layers_block_type, counts))
        assert meta_count(student) == c.total, a
        assert f"{c.total:,}" in result.output


def test_a_hybrid_space_with_num_hidden_layers_is_refused_naming_the_per_type_axes(tmp_path):
    space = write(tmp_path / "space.yaml", {"num_hidden_layers": [40, 52]}, {"parameters": 8_000_000_000})
    assert_one_line_error(invoke("enumerate", space), "axes.num_hidden_layers is given for a hybrid teacher", "num_mamba_layers")


@pytest.mark.parametrize("heads", [[100, 120, 128], [60, 120]])
def test_mamba_heads_that_the_8_groups_cannot_share_are_no_candidates(tmp_path, heads):
    space = write(tmp_path / "space.yaml", {"mamba_num_heads": heads}, {"parameters": 8_000_000_000, "tolerance": 0.5})
    _, feasible, valid = feasible_candidates(space)
    assert {c.arch.mamba_num_heads for c in feasible} == {h for h in heads if h % 8 == 0}
    assert valid == len([h for h in heads if h % 8 == 0])
    result = invoke("enumerate", space)
    assert result.exit_code == 0, result.output
    assert f"{valid} of {valid} valid architectures" in result.output
