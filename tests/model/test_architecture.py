"""Architectures: exact parameter counts, parsing, validation and student configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import MOE_FAMILY_NAMES, TINY_CONFIGS, expert_width, random_rankings, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import (
    Architecture,
    ParamCounter,
    student_config,
    validate,
)
from minitron_nas.model.families import family_for, layers_of
from minitron_nas.model.teachers import load_config
from minitron_nas.prune.pruning import prune

N_RANDOM = 50


def random_arch(teacher: Architecture, rng: random.Random, explicit_layers: bool, hidden_is_query_width: bool = False) -> Architecture:
    """Any architecture the teacher can be sliced to; an MoE teacher's expert count, expert width
    and shared expert width are drawn too. `hidden_is_query_width` (OLMoE): hidden = heads x head_dim."""
    kv = rng.randint(1, teacher.num_key_value_heads)
    heads = kv * rng.randint(1, teacher.heads_per_group)
    hidden = heads * (8 if hidden_is_query_width else rng.randint(1, teacher.hidden_size // heads))  # llama/gemma need hidden % heads == 0
    ffn = rng.randint(1, teacher.intermediate_size)
    moe = {
        name: rng.randint(1, getattr(teacher, name))
        for name in ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")
        if getattr(teacher, name) is not None
    }
    if explicit_layers:
        layers = rng.sample(range(teacher.num_hidden_layers), rng.randint(1, teacher.num_hidden_layers))
        if rng.random() < 0.5:
            layers.sort()
        return Architecture(hidden, ffn, heads, kv, len(layers), tuple(layers), **moe)
    return Architecture(hidden, ffn, heads, kv, rng.randint(1, teacher.num_hidden_layers), **moe)


def embedding_params(model) -> int:
    n = model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        n += model.get_output_embeddings().weight.numel()
    return n


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_count_of_teacher_matches_instantiated_model(family_name):
    model = tiny_model(family_name)
    count = ParamCounter(model.config).count(Architecture.from_config(model.config))
    assert count.total == numel(model)
    assert count.non_embedding == numel(model) - embedding_params(model)


def test_count_matches_pruned_models_for_random_architectures(family_name):
    teacher_model = tiny_model(family_name)
    teacher = Architecture.from_config(teacher_model.config)
    counter = ParamCounter(teacher_model.config)
    rng = random.Random(f"arch-{family_name}")
    seen = set()
    for i in range(N_RANDOM):
        arch = random_arch(teacher, rng, explicit_layers=i % 3 == 0, hidden_is_query_width=family_for(teacher_model.config).hidden_is_query_width)
        seen.add(arch)
        student = prune(teacher_model, random_rankings(teacher, i), arch)
        count = counter.count(arch)
        total = numel(student)
        assert count.total == total, arch
        assert count.non_embedding == total - embedding_params(student), arch
        # the model really has the shape we counted
        assert student.config.hidden_size == arch.hidden_size
        assert student.config.num_hidden_layers == arch.num_hidden_layers == len(student.model.layers)
    assert len(seen) > N_RANDOM * 0.8  # the random architectures are actually varied


def test_count_matches_from_config_on_meta_device(family_name):
    """A second, independent route: transformers builds the student config from scratch."""
    config = TINY_CONFIGS[family_name]()
    teacher = Architecture.from_config(config)
    counter = ParamCounter(config)
    rng = random.Random(f"meta-{family_name}")
    for i in range(N_RANDOM):
        arch = random_arch(teacher, rng, explicit_layers=i % 2 == 0, hidden_is_query_width=family_for(config).hidden_is_query_width)
        cfg = student_config(config, arch, list(arch.layers) if arch.layers else None)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        assert counter.count(arch).total == numel(model), arch
        assert counter.count(arch).non_embedding == numel(model) - embedding_params(model), arch


def test_untied_lm_head_is_embedding_not_body():
    tied = ParamCounter(TINY_CONFIGS["llama"]())
    untied = ParamCounter(TINY_CONFIGS["llama"](tie_word_embeddings=False))
    arch = Architecture.from_config(TINY_CONFIGS["llama"]())
    vocab_by_hidden = 128 * arch.hidden_size
    assert untied.count(arch).total - tied.count(arch).total == vocab_by_hidden
    assert untied.count(arch).non_embedding == tied.count(arch).non_embedding


LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def _llama_closed_form(arch: Architecture, vocab: int, head_dim: int) -> tuple[int, int]:
    h, f = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_attention_heads * head_dim, arch.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * f + 2 * h
    body = arch.num_hidden_layers * per_layer + h
    return 2 * vocab * h + body, body


def test_llama_3_1_8b_count_is_exact():
    counter = ParamCounter(LlamaConfig(**LLAMA_8B))
    count = counter.count(Architecture.from_config(LlamaConfig(**LLAMA_8B)))
    assert count.total == 8_030_261_248
    assert count.non_embedding == 8_030_261_248 - 2 * 128256 * 4096


def test_counting_ten_thousand_architectures():
    config = LlamaConfig(**LLAMA_8B)
    counter = ParamCounter(config)
    teacher = Architecture.from_config(config)
    rng = random.Random(0)
    counts = set()
    for _ in range(10_000):
        kv = rng.randint(1, 8)
        arch = Architecture(
            hidden_size=rng.randrange(128, 4097, 128),
            intermediate_size=rng.randrange(512, 14337, 512),
            num_attention_heads=kv * rng.randint(1, 4),
            num_key_value_heads=kv,
            num_hidden_layers=rng.randint(1, 32),
        )
        validate(arch, teacher)
        count = counter.count(arch)
        assert (count.total, count.non_embedding) == _llama_closed_form(arch, 128256, 128)
        counts.add(count.total)
    assert len(counts) > 9000


# --- mixture of experts: total and active counts -------------------------------------------


def moe_architectures(config) -> list[Architecture]:
    """The teacher, fewer experts, narrower experts (and shared expert), fewer experts than the
    top-k, and every axis cut at once (OLMoE: hidden = heads x head_dim)."""
    teacher = Architecture.from_config(config)
    family = family_for(config)
    width = family.moe.width_key
    shared = {"shared_expert_intermediate_size": 8} if teacher.shared_expert_intermediate_size is not None else {}
    cut = {"hidden_size": 16 if family.hidden_is_query_width else 24, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 3}
    return [
        teacher,
        Architecture.from_dict({"num_experts": 3}, teacher),
        Architecture.from_dict({"num_experts": 2, width: 20, **shared}, teacher),
        Architecture.from_dict({"num_experts": 1, width: 7}, teacher),
        Architecture.from_dict({"num_experts": 3, width: 12, **shared, **cut}, teacher),
        Architecture.from_dict({"layers": [3, 1], "num_experts": 2}, teacher),
    ]


@pytest.mark.parametrize("name", MOE_FAMILY_NAMES)
def test_moe_counts_equal_instantiated_models_and_active_counts_top_k_experts(name):
    config = TINY_CONFIGS[name]()
    counter = ParamCounter(config)
    for arch in moe_architectures(config):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(student_config(config, arch, list(arch.layers) if arch.layers else None))
        count = counter.count(arch)
        assert count.total == numel(model), arch
        assert count.non_embedding == numel(model) - embedding_params(model), arch
        # by hand: a token passes through min(top-k, experts) experts of each layer, not all of them
        experts = layers_of(model)[0].mlp.experts
        width = expert_width(arch)
        per_expert = 3 * width * arch.hidden_size  # gate, up and down rows of one expert
        assert per_expert == experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()
        top_k = min(2, arch.num_experts)
        assert model.config.num_experts_per_tok == top_k
        assert count.active == count.total - (arch.num_experts - top_k) * per_expert * arch.num_hidden_layers, arch
    dense_like = ParamCounter(TINY_CONFIGS["llama"]()).count(Architecture.from_config(TINY_CONFIGS["llama"]()))
    assert dense_like.active == dense_like.total  # a dense model's active count is its total


PUBLIC_CONFIGS = Path(__file__).resolve().parents[2] / "search_spaces" / "configs"


def test_qwen3_30b_a3b_total_and_active_counts_by_hand():
    """Qwen3-30B-A3B: 48 layers of 32 query heads and 4 KV heads of 128 on hidden 2048 (q/k norms
    of 128 per head), a router over 128 experts of width 768, 8 routed per token; untied 151,936 vocabulary."""
    counter = ParamCounter(load_config(str(PUBLIC_CONFIGS / "qwen3-30b-a3b.json")))
    count = counter.count(counter.teacher)
    hidden, layers, expert = 2048, 48, 3 * 768 * 2048
    attention = hidden * (32 + 2 * 4) * 128 + 32 * 128 * hidden + 2 * 128
    per_layer = attention + 2 * hidden + 128 * hidden + 128 * expert  # + two norms, the router, the experts
    embeddings = 2 * 151936 * hidden
    total = embeddings + layers * per_layer + hidden
    assert count.total == total == 30_532_122_624
    assert count.non_embedding == total - embeddings
    assert count.active == total - layers * (128 - 8) * expert == 3_353_032_704  # "A3B": 3.35B active, embeddings included


def test_mixtral_8x7b_total_and_active_counts_by_hand():
    """Mixtral-8x7B: 32 layers of 32 query heads and 8 KV heads of 128 on hidden 4096, a router over
    8 experts of width 14,336, 2 routed per token; untied 32,000 vocabulary."""
    counter = ParamCounter(load_config(str(PUBLIC_CONFIGS / "mixtral-8x7b.json")))
    count = counter.count(counter.teacher)
    hidden, layers, expert = 4096, 32, 3 * 14336 * 4096
    per_layer = hidden * (32 + 2 * 8) * 128 + 32 * 128 * hidden + 2 * hidden + 8 * hidden + 8 * expert
    total = 2 * 32000 * hidden + layers * per_layer + hidden
    assert count.total == total == 46_702_792_704
    assert count.active == total - layers * (8 - 2) * expert == 12_879_925_248


# --- Architecture.from_dict / load -------------------------------------------------------

BASE = Architecture(hidden_size=48, intermediate_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=4)


def test_from_dict_fills_missing_keys_from_base():
    arch = Architecture.from_dict({"hidden_size": 24, "num_attention_heads": 2}, BASE)
    assert arch == Architecture(24, 96, 2, 2, 4)
    assert Architecture.from_dict({}, BASE) == BASE
    assert Architecture.from_dict({"intermediate_size": None}, BASE) == BASE


def test_from_dict_layers_set_depth():
    arch = Architecture.from_dict({"layers": [0, 3]}, BASE)
    assert arch.layers == (0, 3)
    assert arch.num_hidden_layers == 2
    assert arch.to_dict()["layers"] == [0, 3]
    # a base with layers does not leak its layer list into a new candidate
    assert Architecture.from_dict({"num_hidden_layers": 3}, arch).layers is None


@pytest.mark.parametrize("data", [{"hidden": 32}, {"hidden_size": 32, "num_layers": 2}])
def test_from_dict_unknown_key(data):
    with pytest.raises(MinitronError, match="unknown architecture key"):
        Architecture.from_dict(data, BASE)


@pytest.mark.parametrize("value", ["32", 32.0, True, [32]])
def test_from_dict_non_integer(value):
    with pytest.raises(MinitronError, match="must be an integer"):
        Architecture.from_dict({"hidden_size": value}, BASE)


@pytest.mark.parametrize("layers", [[0, "1"], [0, 1.5], 3, [True]])
def test_from_dict_non_integer_layers(layers):
    with pytest.raises(MinitronError, match="layers"):
        Architecture.from_dict({"layers": layers}, BASE)


def test_load_inline_and_file(tmp_path):
    assert Architecture.load('{"hidden_size": 24}', BASE) == Architecture(24, 96, 6, 2, 4)
    path = tmp_path / "arch.json"
    path.write_text(json.dumps({"num_key_value_heads": 1, "num_attention_heads": 3}))
    assert Architecture.load(path, BASE) == Architecture(48, 96, 3, 1, 4)
    with pytest.raises(MinitronError, match="not found"):
        Architecture.load(tmp_path / "missing.json", BASE)
    with pytest.raises(MinitronError, match="not valid JSON"):
        Architecture.load('{"hidden_size": ', BASE)
    path.write_text("[1, 2]")
    with pytest.raises(MinitronError, match="JSON object"):
        Architecture.load(path, BASE)


# --- validate ------------------------------------------------------------------------------


def test_validate_accepts_teacher_and_smaller():
    validate(BASE, BASE)
    validate(Architecture(6, 1, 1, 1, 1), BASE)
    validate(Architecture(48, 96, 6, 2, 2, layers=(3, 0)), BASE)


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"])
def test_validate_rejects_larger_than_teacher(field):
    from dataclasses import replace

    larger = replace(BASE, **{field: getattr(BASE, field) * 2})
    with pytest.raises(MinitronError, match=f"{field}=.*larger than the teacher"):
        validate(larger, BASE)
    with pytest.raises(MinitronError, match="at least 1"):
        validate(replace(BASE, **{field: 0}), BASE)


def test_validate_rejects_heads_not_multiple_of_groups():
    with pytest.raises(MinitronError, match="not a multiple"):
        validate(Architecture(48, 96, 5, 2, 4), BASE)


def test_validate_rejects_too_many_heads_per_group():
    # 4 heads over 1 group = 4 per group; the teacher has 3
    with pytest.raises(MinitronError, match="per KV group exceeds"):
        validate(Architecture(48, 96, 4, 1, 4), BASE)


@pytest.mark.parametrize(
    "layers, n, match",
    [
        ((0, 1), 3, "make them agree"),
        ((0, 0, 1), 3, "distinct"),
        ((0, 4), 2, "distinct"),
        ((-1, 2), 2, "distinct"),
    ],
)
def test_validate_rejects_bad_layer_lists(layers, n, match):
    with pytest.raises(MinitronError, match=match):
        validate(Architecture(48, 96, 6, 2, n, layers=layers), BASE)


# --- student_config --------------------------------------------------------------------------


def test_student_config_rejects_llama_hidden_not_divisible_by_heads():
    with pytest.raises(MinitronError, match="transformers refuses") as info:
        student_config(TINY_CONFIGS["llama"](), Architecture(47, 96, 6, 2, 4))
    assert "\n" not in str(info.value)
    assert "47" in str(info.value)


def test_student_config_sizes_and_layer_lists(family_name):
    config = TINY_CONFIGS[family_name]()
    teacher = Architecture.from_config(config)
    hidden = 32 if family_for(config).hidden_is_query_width else 24  # OLMoE: hidden = 4 heads x 8
    moe = {k: v for k, v in {"num_experts": 3, "moe_intermediate_size": 20, "shared_expert_intermediate_size": 24}.items() if getattr(teacher, k) is not None}
    arch = Architecture(hidden, 40, 4, 2, 3, **moe)
    cfg = student_config(config, arch, [3, 0, 2])
    assert type(cfg) is type(config)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (
        hidden,
        40,
        4,
        2,
        3,
    )
    assert cfg.head_dim == 8  # head_dim never changes, even though hidden / heads = 6
    assert cfg.vocab_size == config.vocab_size
    if getattr(config, "layer_types", None) is not None:
        assert cfg.layer_types == [config.layer_types[i] for i in (3, 0, 2)]
    if moe:  # the expert count under the family's own key, top-k kept
        assert Architecture.from_config(cfg) == arch
        assert getattr(cfg, family_for(config).moe.experts_key) == 3 and cfg.num_experts_per_tok == 2
    assert config.num_hidden_layers == 4 and config.hidden_size == 48  # teacher untouched
