"""Search spaces: YAML validation, and enumeration that equals brute force."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron_nas.architecture import Architecture, student_config
from minitron_nas.errors import MinitronError
from minitron_nas.space import Budget, SearchSpace, enumerate_candidates, load_space, require_feasible
from minitron_nas.teachers import load_config

from conftest import TINY_CONFIGS

AXES = {
    "hidden_size": (24, 32, 40, 48),
    "intermediate_size": (32, 64, 96),
    "heads_per_group": (1, 2, 3),
    "num_key_value_heads": (1, 2),
    "num_hidden_layers": (2, 3, 4),
}


def brute_force(config, budget: Budget) -> set[Architecture]:
    """Instantiate every combination on the meta device and count its parameters directly."""
    found = set()
    for hidden, ffn, per_group, groups, layers in itertools.product(*AXES.values()):
        arch = Architecture(hidden, ffn, per_group * groups, groups, layers)
        try:
            student = student_config(config, arch)
        except MinitronError:
            continue
        if per_group > config.num_attention_heads // config.num_key_value_heads:
            continue
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(student).parameters())
        if abs(n - budget.parameters) <= budget.tolerance * budget.parameters:
            found.add(arch)
    return found


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_enumeration_equals_brute_force(name):
    config = TINY_CONFIGS[name]()
    budget = Budget(parameters=30_000, tolerance=0.15)
    space = SearchSpace(teacher="tiny", axes=AXES, budget=budget)
    feasible, _ = enumerate_candidates(space, config)
    assert {c.arch for c in feasible} == brute_force(config, budget)
    assert len(feasible) > 3
    distances = [abs(c.total - budget.parameters) for c in feasible]
    assert distances == sorted(distances)  # closest first


def test_no_feasible_architecture_names_the_nearest_budget():
    space = SearchSpace(teacher="tiny", axes=AXES, budget=Budget(parameters=10, tolerance=0.01))
    with pytest.raises(MinitronError, match=r"nearest feasible budget is [\d,]+"):
        require_feasible(space, TINY_CONFIGS["llama"]())


def test_memory_budget_counts_the_kv_cache():
    config = TINY_CONFIGS["llama"]()
    loose = SearchSpace(teacher="tiny", axes=AXES, budget=Budget(parameters=30_000, tolerance=0.15))
    feasible, _ = enumerate_candidates(loose, config)
    cap = sorted(c.memory_gb for c in feasible)[len(feasible) // 2]
    tight = SearchSpace(teacher="tiny", axes=AXES, budget=Budget(parameters=30_000, tolerance=0.15, memory_gb=cap))
    kept, _ = enumerate_candidates(tight, config)
    assert 0 < len(kept) < len(feasible) and all(c.memory_gb <= cap for c in kept)
    c = kept[0]
    kv = 2 * c.arch.num_hidden_layers * c.arch.num_key_value_heads * config.head_dim * 4096
    assert c.memory_gb == pytest.approx((c.total + kv) * 2 / 2**30)


@pytest.mark.parametrize(
    "name, published",
    [
        ("llama-3.1-8b-to-4b", Architecture(3072, 9216, 32, 8, 32)),  # Llama-3.1-Minitron-4B-Width
        ("mistral-nemo-12b-to-8b", Architecture(4096, 11520, 32, 8, 40)),  # Mistral-NeMo-Minitron-8B
    ],
)
def test_paper_spaces_enumerate_from_configs_alone(name, published):
    space = load_space(f"search_spaces/{name}.yaml")
    config = load_config(space.teacher)
    feasible = require_feasible(space, config)
    assert len(feasible) > 10
    low, high = (space.budget.parameters * (1 + s * space.budget.tolerance) for s in (-1, 1))
    assert all(low <= c.total <= high for c in feasible)
    assert published in {c.arch for c in feasible}


def test_shipped_smollm2_spaces_have_candidates():
    for name in ("smollm2-135m-demo", "smollm2-135m"):
        space = load_space(f"search_spaces/{name}.yaml")
        assert len(require_feasible(space, load_config(space.teacher))) >= 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("teacher: x\naxes: {hidden_size: [1]\n", "not valid YAML at line"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10}\ncolour: red\n", "unknown key 'colour'"),
        ("teacher: x\naxes: {width: [1]}\nbudget: {parameters: 10}\n", "unknown key 'axes.width'"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10, slack: 1}\n", "unknown key 'budget.slack'"),
        ("teacher: x\naxes: {hidden_size: [a]}\nbudget: {parameters: 10}\n", "axes.hidden_size must be"),
        ("axes: {}\nbudget: {parameters: 10}\n", "lacks 'teacher'"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10}\nsampler: random\n", "unknown sampler 'random'"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10}\nscoring: {metric: lm_eval}\n", "scoring.tasks is empty"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10, count: all}\n", "budget.count must be"),
        ("- a list\n", "must be a YAML mapping"),
    ],
)
def test_bad_spaces_give_one_line_errors(tmp_path, text, message):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(MinitronError, match=message) as info:
        load_space(path)
    assert "\n" not in str(info.value)


def test_ranges_with_step_and_divisor(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps({
        "teacher": "x",
        "axes": {"hidden_size": {"range": [64, 256], "step": 64}, "intermediate_size": {"range": [100, 130], "divisor": 16}},
        "budget": {"parameters": 10},
    }))
    space = load_space(path)
    assert space.axes == {"hidden_size": (64, 128, 192, 256), "intermediate_size": (112, 128)}
