"""Search spaces: YAML validation, and enumeration that equals brute force."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from helpers import TINY_CONFIGS
from transformers import AutoModelForCausalLM

from minitron_nas.config.space import Budget, SearchSpace
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture, student_config
from minitron_nas.model.teachers import load_config
from minitron_nas.search.candidates import enumerate_candidates, load_space, require_feasible

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
        ("teacher: x\naxes: {hidden_size: [a]}\nbudget: {parameters: 10}\n", "axes.hidden_size\\[0\\] is 'a': give a positive whole number"),
        ("axes: {}\nbudget: {parameters: 10}\n", "lacks 'teacher'"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10}\nsampler: nsga\n", "unknown sampler 'nsga': use one of auto, grid, random, tpe"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10}\nscoring: {metric: lm_eval}\n", "scoring.tasks is empty"),
        ("teacher: x\naxes: {}\nbudget: {parameters: 10, count: all}\n", "budget.count is 'all': use total, non_embedding, active"),
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
    path.write_text(
        json.dumps(
            {
                "teacher": "x",
                "axes": {"hidden_size": {"range": [64, 256], "step": 64}, "intermediate_size": {"range": [100, 130], "divisor": 16}},
                "budget": {"parameters": 10},
            }
        )
    )
    space = load_space(path)
    assert space.axes == {"hidden_size": (64, 128, 192, 256), "intermediate_size": (112, 128)}


def _space_text(**sections) -> str:
    import yaml

    return yaml.safe_dump({"teacher": "x", "axes": {}, "budget": {"parameters": 10}, **sections})


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"retrain": {"lr": "abc"}}, "retrain.lr is 'abc': give a positive number such as 0.0001"),
        ({"retrain": {"lr": -1}}, "retrain.lr is -1: give a positive number"),
        ({"retrain": {"lr": None}}, "retrain.lr is None: give a positive number"),
        ({"retrain": {"tokens": 2.5}}, "retrain.tokens is 2.5: give a positive whole number such as 8192"),
        ({"retrain": {"eval_every": -3}}, "retrain.eval_every is -3: give a whole number >= 0 such as 5"),
        ({"budget": {"parameters": 10, "tolerance": 2}}, r"budget.tolerance is 2: give a number in \(0, 1\) such as 0.05"),
        ({"budget": {"parameters": 10, "tolerance": 0}}, r"budget.tolerance is 0: give a number in \(0, 1\)"),
        ({"budget": {"parameters": "many"}}, "budget.parameters is 'many': give a positive whole number"),
        ({"budget": {"tolerance": 0.1}}, "'budget' lacks 'parameters': add budget.parameters"),
        ({"budget": None}, "'budget' lacks 'parameters'"),
        ({"budget": {"parameters": 10, "memory_gb": "lots"}}, "budget.memory_gb is 'lots': give a positive number"),
        ({"scoring": {"limit": 0}}, "scoring.limit is 0: give a positive whole number"),
        ({"scoring": {"tasks": "arc_easy"}}, "scoring.tasks is 'arc_easy': give a list"),
        ({"scoring": {"tasks": [1]}}, r"scoring.tasks\[0\] is 1: give a text value"),
        ({"ranking": {"data": 5}}, "ranking.data is 5: give a text value such as 'shakespeare'"),
        ({"distill": {"top_k": "all"}}, "distill.top_k is 'all': give a positive whole number"),
        ({"distill": {"intermediate": "sometimes"}}, "distill.intermediate is 'sometimes': use auto, on or off"),
        ({"retrain": [1, 2]}, "'retrain' is \\[1, 2\\]: give a mapping"),
        ({"seed": -1}, "seed is -1: give a whole number in \\[0, 4294967295\\] such as 0"),
        ({"seed": "x"}, "seed is 'x': give a whole number"),
        ({"trials": 0}, "trials is 0: give a positive whole number"),
        ({"trials": 10**400}, "trials is 1000.*: give a positive whole number"),
        ({"retrain": {"lr": "nan"}}, "retrain.lr is 'nan': give a positive number"),
        ({"family": [10, "big"]}, r"family\[1\] is 'big': give a positive whole number"),
        ({"family": 10}, "family is 10: give a list"),
        ({"sampler": 3}, "sampler is 3: give a text value such as 'auto'"),
        ({"axes": {"hidden_size": [0, 8]}}, r"axes.hidden_size\[0\] is 0: give a positive whole number"),
        ({"axes": {"hidden_size": {"range": [64]}}}, r"axes.hidden_size.range is \[64\]: give two integers"),
        ({"axes": {"hidden_size": {"range": [64, 32]}}}, "give the lower bound first"),
        ({"axes": {"hidden_size": {"range": [64, 128], "step": 0}}}, "axes.hidden_size.step is 0: give a positive whole number"),
        ({"axes": {"hidden_size": {"range": [65, 70], "divisor": 64}}}, "axes.hidden_size allows no value"),
        ({"axes": [1, 2]}, "'axes' is \\[1, 2\\]: give a mapping"),
        ({"teacher": None}, "teacher is None: give a text value"),
        ({"retrain": {"seed": 3}}, "unknown key 'retrain.seed' \\(the space's top-level seed sets it\\)"),
        ({"ranking": {"aggregation": {"batch": "max"}}}, "unknown batch aggregation 'max': use one of mean, l2, var"),
        ({"ranking": {"aggregation": {"tokens": "mean"}}}, "unknown key 'ranking.aggregation.tokens': allowed are batch, seq"),
        ({"retrain": {"grad_accum": 0}}, "retrain.grad_accum is 0: give a positive whole number"),
        ({"distill": {"intermediate_loss": "l1"}}, "distill.intermediate_loss is 'l1': use nmse or cosine"),
    ],
)
def test_every_key_is_checked_for_type_and_range(tmp_path, sections, message):
    path = tmp_path / "space.yaml"
    path.write_text(_space_text(**sections))
    with pytest.raises(MinitronError, match=message) as info:
        load_space(path)
    text = str(info.value)
    assert "\n" not in text and ": " in text


def test_numbers_yaml_reads_as_text_and_yaml_booleans_are_accepted(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        "teacher: x\naxes: {}\nbudget: {parameters: 4.5e9}\nretrain: {lr: 3e-4, tokens: 1e4}\n"
        "distill: {intermediate: off, top_k: null}\nfamily: [2e9, 1e9]\nscoring: {tasks: [piqa], metric: lm_eval}\n"
    )
    space = load_space(path)
    assert space.budget.parameters == 4_500_000_000 and isinstance(space.budget.parameters, int)
    assert space.retrain.lr == 3e-4 and space.retrain.tokens == 10_000 and isinstance(space.retrain.tokens, int)
    assert space.distill.intermediate == "off" and space.distill.top_k is None
    assert space.family == (2_000_000_000, 1_000_000_000) and space.scoring.tasks == ("piqa",)


def test_fields_added_later_are_checked_from_their_annotations():
    """A new section needs no change to the checker: its annotations and metadata drive it."""
    from dataclasses import dataclass, field

    from minitron_nas.config.checks import Range
    from minitron_nas.config.loader import _section

    @dataclass(frozen=True)
    class Halving:
        eta: int = field(default=3, metadata={"range": Range(2)})
        budget_tokens: int | None = None
        budget_fraction: float | None = field(default=None, metadata={"range": Range(0, 1, low_open=True)})
        rungs: tuple[int, ...] = ()
        name: str = "halving"
        extra: dict = field(default_factory=dict)
        opaque: SomethingUnknown = None  # noqa: F821  an unresolvable annotation is left unchecked

    assert _section(Halving, {"eta": "4", "budget_tokens": None, "rungs": [1, 2], "extra": {"a": 1}, "opaque": object}, "halving").eta == 4
    for data, message in [
        ({"eta": 1}, "halving.eta is 1: give a whole number >= 2 such as 3"),
        ({"budget_tokens": "x"}, "halving.budget_tokens is 'x': give a positive whole number"),  # RANGES: positive
        ({"budget_fraction": 1.5}, r"halving.budget_fraction is 1.5: give a number in \(0, 1\]"),
        ({"rungs": [1, -2]}, r"halving.rungs\[1\] is -2: give a whole number >= 0"),
        ({"name": ["a"]}, "halving.name is \\['a'\\]: give a text value such as 'halving'"),
        ({"extra": [1]}, "halving.extra is \\[1\\]: give a mapping"),
        ({"eta": True}, "halving.eta is True: give a whole number"),
    ]:
        with pytest.raises(MinitronError, match=message):
            _section(Halving, data, "halving")


def test_every_stage_setting_is_a_space_key(tmp_path):
    """The space sections are the stages' own settings: what the trainer and the ranking pass take."""
    path = tmp_path / "space.yaml"
    path.write_text(
        _space_text(
            ranking={"aggregation": {"batch": "mean", "seq": "l2"}, "layer_loss": True, "batch_size": 2},
            retrain={"tokens": 4096, "batch_size": 2, "seq_len": 64, "grad_accum": 4, "warmup_steps": 3},
            distill={"intermediate_loss": "cosine", "grad_accum": 2, "clm_weight": 0.5},
            seed=7,
        )
    )
    space = load_space(path)
    assert (space.ranking.aggregation.batch, space.ranking.aggregation.seq, space.ranking.layer_loss) == ("mean", "l2", True)
    assert space.retrain.total_steps == 4096 // (2 * 64 * 4) and space.retrain.warmup == 3
    assert space.distill.intermediate_loss == "cosine" and space.distill.clm_weight == 0.5
    assert space.distill.warmup == max(1, space.distill.total_steps // 20)  # the final distillation warms up on a twentieth
