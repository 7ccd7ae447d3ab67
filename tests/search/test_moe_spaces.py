"""Mixture-of-experts search spaces: the shipped ones enumerate from their public configs, budgets
on active parameters pick by what a token uses, and MoE axes are refused for a dense teacher."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import yaml
from helpers import TINY_CONFIGS, assert_one_line_error
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.config.space import Budget, SearchSpace
from minitron_nas.search.candidates import enumerate_candidates
from minitron_nas.search.trials import arch_key

runner = CliRunner()
SPACES = Path(__file__).resolve().parents[2] / "search_spaces"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def table_rows(output: str) -> tuple[list[str], list[list[int]]]:
    """(column names, rows of numbers, "-" where a size does not apply) of the table `enumerate` prints."""
    lines = [line for line in output.splitlines() if line.count("┃") > 2 or line.count("│") > 2]
    split = lambda line, bar: [cell.strip() for cell in line.strip().strip(bar).split(bar)]
    header = split(lines[0], "┃")
    number = lambda cell: cell if cell == "-" else int(cell.replace(",", "")) if "." not in cell else float(cell)
    rows = [[number(cell) for cell in split(line, "│")] for line in lines[1:]]
    return header, rows


def qwen3_30b_counts(hidden: int, layers: int, experts: int, width: int) -> tuple[int, int]:
    """(total, active) of a Qwen3-30B-A3B slice by hand: 32 query and 4 KV heads of 128 (per-head
    q/k norms), a router over `experts`, 8 of them routed per token, untied 151,936 vocabulary."""
    attention = hidden * (32 + 2 * 4) * 128 + 32 * 128 * hidden + 2 * 128
    shared = attention + 2 * hidden + experts * hidden  # + two norms and the router
    expert = 3 * width * hidden
    embeddings = 2 * 151936 * hidden
    return embeddings + layers * (shared + experts * expert) + hidden, embeddings + layers * (shared + 8 * expert) + hidden


def mixtral_8x7b_counts(hidden: int, layers: int, experts: int, width: int) -> tuple[int, int]:
    """(total, active) of a Mixtral-8x7B slice by hand: 32 query and 8 KV heads of 128, 2 experts routed per token."""
    shared = hidden * (32 + 2 * 8) * 128 + 32 * 128 * hidden + 2 * hidden + experts * hidden
    expert = 3 * width * hidden
    embeddings = 2 * 32000 * hidden
    return embeddings + layers * (shared + experts * expert) + hidden, embeddings + layers * (shared + min(2, experts) * expert) + hidden


@pytest.mark.parametrize(
    "space, counts, columns, budgeted",
    [
        ("qwen3-30b-a3b-to-a2b.yaml", qwen3_30b_counts, ("experts", "expert ffn"), "active"),
        ("mixtral-8x7b-to-30b.yaml", mixtral_8x7b_counts, ("experts",), "total"),
    ],
)
def test_shipped_moe_spaces_enumerate_with_experts_and_active_columns(space, counts, columns, budgeted):
    result = invoke("enumerate", SPACES / space, "--show", "50")
    assert result.exit_code == 0, result.output
    budget = yaml.safe_load((SPACES / space).read_text())["budget"]
    assert f"({budget['parameters']:,} {budgeted})" in result.output
    header, rows = table_rows(result.output)
    assert header[:5] == ["hidden", "ffn", "heads", "kv groups", "layers"]
    assert header[5 : 5 + len(columns)] == list(columns) and header[-4:] == ["total", "non-embedding", "active", "memory GiB"]
    assert len(rows) >= 5
    for row in rows:
        cells = dict(zip(header, row))
        width = cells.get("expert ffn", cells["ffn"])  # Mixtral's experts are intermediate_size wide
        assert (cells["ffn"] == "-") == ("expert ffn" in cells)  # Qwen3-MoE's intermediate_size sizes nothing
        total, active = counts(cells["hidden"], cells["layers"], cells["experts"], width)
        assert (cells["total"], cells["active"]) == (total, active), cells
        assert abs(cells[budgeted] - budget["parameters"]) <= budget["tolerance"] * budget["parameters"]
        assert cells["active"] < cells["total"]


def tiny_space(tmp_path: Path, name: str, axes: dict, budget: dict, **overrides) -> Path:
    config = tmp_path / f"{name}.json"
    TINY_CONFIGS[name](**overrides).to_json_file(config)
    space = tmp_path / f"{name}-space.yaml"
    space.write_text(yaml.safe_dump({"teacher": str(config), "axes": axes, "budget": budget}))
    return space


def test_moe_axes_for_a_dense_teacher_are_refused_in_one_line(tmp_path):
    space = tiny_space(tmp_path, "llama", {"num_experts": [2, 4]}, {"parameters": 40_000})
    result = invoke("enumerate", space)
    assert_one_line_error(result, "axes.num_experts is given but this llama teacher has no such part", "remove it from the space")


@pytest.mark.parametrize("overrides, layers", [({"mlp_only_layers": [1]}, "(1;"), ({"decoder_sparse_step": 2}, "(0, 2;")])
def test_an_moe_teacher_with_dense_layers_is_refused_in_one_line(tmp_path, overrides, layers):
    """Its dense layers have no experts to score, prune or count: refused as the config loads, before any weights."""
    space = tiny_space(tmp_path, "qwen2_moe", {"num_experts": [2, 4]}, {"parameters": 40_000}, **overrides)
    result = invoke("enumerate", space)
    assert_one_line_error(result, "has dense MLP layers among its mixture-of-experts layers " + layers, "every layer must be sparse")


# The tiny Qwen3-MoE (helpers.py): 4 layers of hidden 48, 6 query and 2 KV heads of 8 with per-head
# q/k norms, a router, experts of width W, 2 routed per token; untied 128 vocabulary.
GRID = {"num_experts": (1, 2, 3, 4), "moe_intermediate_size": (8, 16, 24, 32)}


def tiny_qwen3_moe_counts(experts: int, width: int) -> tuple[int, int]:
    """(total, active) by hand."""
    per_layer = 48 * 48 + 2 * 48 * 16 + 48 * 48 + 2 * 8 + 2 * 48 + experts * 48  # attention, q/k norms, norms, router
    expert = 3 * width * 48
    embeddings = 2 * 128 * 48
    return embeddings + 4 * (per_layer + experts * expert) + 48, embeddings + 4 * (per_layer + min(2, experts) * expert) + 48


def test_a_budget_on_active_parameters_picks_by_what_a_token_uses():
    config = TINY_CONFIGS["qwen3_moe"]()
    target = tiny_qwen3_moe_counts(4, 24)[1]  # 65,776
    picks = {}
    for count in ("active", "total"):
        budget = Budget(parameters=target, count=count, tolerance=0.01)
        feasible, valid = enumerate_candidates(SearchSpace(teacher="tiny", axes=GRID, budget=budget), config)
        assert len(valid) == 16
        for c in valid:
            assert (c.total, c.active) == tiny_qwen3_moe_counts(c.arch.num_experts, c.arch.moe_intermediate_size)
            assert arch_key(c.arch).endswith(f"/e{c.arch.num_experts}/m{c.arch.moe_intermediate_size}")
        picks[count] = {(c.arch.num_experts, c.arch.moe_intermediate_size) for c in feasible}
        by_hand = {(e, w) for e, w in itertools.product(*GRID.values()) if abs(tiny_qwen3_moe_counts(e, w)[count == "active"] - target) <= 0.01 * target}
        assert picks[count] == by_hand
    # active: every expert count at width 24 (the router differs by 48 parameters per expert and layer);
    # total: the narrower experts only where there are fewer of them
    assert picks["active"] == {(2, 24), (3, 24), (4, 24)}
    assert picks["total"] == {(2, 24), (3, 16)}
