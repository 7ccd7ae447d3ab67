"""The real SmolLM2-135M teacher on WikiText-2: rankings must beat chance by a wide margin."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from minitron_nas.data import token_blocks
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.teachers import load_teacher
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import Rankings, compute_rankings

pytestmark = pytest.mark.teacher


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("smollm2-135m")


@pytest.fixture(scope="module")
def rankings(teacher, shared_data):
    blocks = token_blocks(str(shared_data / "wikitext2" / "valid.txt"), teacher.tokenizer, 256, 64)
    assert blocks.shape == (64, 256)
    return compute_rankings(teacher.model, blocks, progress=False, meta={"teacher_fingerprint": teacher.fingerprint})


@pytest.fixture(scope="module")
def test_blocks(teacher, shared_data):
    return token_blocks(str(shared_data / "wikitext2" / "test.txt"), teacher.tokenizer, 256, 16)


def _random_rankings(like: Rankings, seed: int) -> Rankings:
    g = torch.Generator().manual_seed(seed)
    rand = lambda t: torch.rand(t.shape, generator=g)
    return Rankings(heads=rand(like.heads), neurons=rand(like.neurons), channels=rand(like.channels), block_importance=rand(like.block_importance))


def test_embedded_teacher_is_smollm2_and_cached(teacher):
    config = teacher.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert (teacher.path / "model.safetensors").is_file()
    assert load_teacher("smollm2-135m").fingerprint == teacher.fingerprint


def test_halving_ffn_by_rankings_beats_random_neurons(teacher, rankings, test_blocks):
    teacher_loss = lm_loss(teacher.model, test_blocks)
    arch = replace(Architecture.from_config(teacher.model.config), intermediate_size=768)
    ranked = lm_loss(prune(teacher.model, rankings, arch), test_blocks)
    chance = [lm_loss(prune(teacher.model, _random_rankings(rankings, seed), arch), test_blocks) for seed in (0, 1)]
    print(f"teacher {teacher_loss:.3f}  ranked {ranked:.3f}  random {chance}")
    assert teacher_loss < ranked < min(chance)  # an ordering against reference prunes: by how much is the benchmarks' business


def test_dropping_ten_layers_by_block_importance_beats_dropping_the_last_ten(teacher, rankings, test_blocks):
    arch = replace(Architecture.from_config(teacher.model.config), num_hidden_layers=20)
    by_bi = lm_loss(prune(teacher.model, rankings, arch, "block_importance"), test_blocks)
    last = lm_loss(prune(teacher.model, rankings, arch, "last"), test_blocks)
    print(f"drop 10 by BI {by_bi:.3f}  drop last 10 {last:.3f}")
    assert by_bi < last
