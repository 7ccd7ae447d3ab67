"""Exports every runtime loads: transformers 4.x and 5.x, readable files, a clean name, a card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import byte_tokenizer, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron_nas.model.saving import model_card, save_model
from minitron_nas.model.teachers import cache_root

LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 5e5}
INPUT = torch.arange(40).view(2, 20)
TEXT = "To be, or not to be: that is the question.\n\nWhether 'tis nobler in the mind 123"

# (tiny family, overrides, what transformers 4.x must read: rope_theta, rope_scaling, head_dim, tie)
CASES = {
    "llama-default": ("llama", {}, 10000.0, None, 8, True),
    "llama-linear": ("llama", {"rope_parameters": LINEAR}, 500000.0, {"rope_type": "linear", "factor": 2.0}, 8, True),
    "llama3-untied": ("llama-untied-bias", {"rope_parameters": LLAMA3, "head_dim": 16}, 5e5, {k: v for k, v in LLAMA3.items() if k != "rope_theta"}, 16, False),
    "qwen3": ("qwen3", {}, 10000.0, None, 8, True),
}


def export(tmp_path: Path, case: str, **metadata) -> tuple[torch.nn.Module, Path]:
    family, overrides, *_ = CASES[case]
    model = tiny_model(family, vocab_size=257, **overrides)
    return model, save_model(model, tmp_path / case, byte_tokenizer(), metadata)


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_tokenizer_say_what_transformers_4_reads(tmp_path, case):
    model, folder = export(tmp_path, case)
    _, _, theta, scaling, head_dim, tied = CASES[case]
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == theta
    assert config["rope_scaling"] == scaling
    assert config["head_dim"] == head_dim and config["tie_word_embeddings"] is tied
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # transformers 5 still loads it, with identical logits and tokens.
    reloaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=INPUT).logits, model(input_ids=INPUT).logits)
    assert AutoTokenizer.from_pretrained(str(folder))(TEXT).input_ids == byte_tokenizer()(TEXT).input_ids


def test_gemma3_keeps_the_sliding_layers_rope_base_for_transformers_4(tmp_path):
    folder = save_model(tiny_model("gemma3", vocab_size=257), tmp_path / "gemma", byte_tokenizer())
    config = json.loads((folder / "config.json").read_text())
    rope = config["rope_parameters"]
    assert config["rope_theta"] == rope["full_attention"]["rope_theta"] != rope["sliding_attention"]["rope_theta"]
    assert config["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"] and config["rope_scaling"] is None


def test_the_chat_template_is_where_transformers_4_before_4_50_reads_it(tmp_path):
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    folder = save_model(tiny_model("llama", vocab_size=257), tmp_path / "chat", tokenizer)
    assert (folder / "chat_template.jinja").read_text() == tokenizer.chat_template  # 5.x and 4.50+
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False) == "hi<eos>"


def test_every_exported_file_is_readable_by_others(tmp_path):
    previous = os.umask(0o022)
    try:
        _, folder = export(tmp_path, "llama-default")
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_the_name_is_the_models_never_a_local_path(tmp_path):
    family, overrides, *_ = CASES["llama-default"]
    model = tiny_model(family, vocab_size=257, **overrides)
    local = str(tmp_path / "cache" / "teachers" / "smollm2-135m-747cb1f01955")
    model.config._name_or_path = local  # what a teacher loaded from the GGUF cache carries
    model.config._model_name_or_path = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # the GGUF's general.name
    folder = save_model(model, tmp_path / "export", byte_tokenizer(), {"name": "tiny-minitron-0M"})
    config = json.loads((folder / "config.json").read_text())
    assert config["_name_or_path"] == "tiny-minitron-0M" and "_model_name_or_path" not in config
    for path in folder.glob("*.json"):
        assert str(tmp_path) not in path.read_text(), path.name


def test_the_card_names_the_teacher_the_recipe_and_the_scores():
    provenance = {
        "teacher": "smollm2-135m",
        "teacher_fingerprint": "abc123",
        "architecture": {"hidden_size": 48, "num_hidden_layers": 3},
        "teacher_architecture": {"hidden_size": 64, "num_hidden_layers": 4},
        "parameters": {"total": 40000, "non_embedding": 30000},
        "teacher_parameters": {"total": 60000, "non_embedding": 45000},
        "rankings": {"data": "wikitext2/valid.txt", "samples": 32, "seq_len": 256, "aggregation": {"batch": "l2", "seq": "mean"}},
        "budget": {"parameters": 40000},
        "search": {"metric": "heldout_kld", "score": 0.25, "score_stderr": 0.01, "trial": 7, "search_tokens": 24576},
        "distill_tokens": 32768,
    }
    scores = {"teacher": {"heldout": {"loss": 2.5}}, "student": {"heldout": {"loss": 3.125}}}
    card = model_card("tiny-minitron", provenance, scores)
    assert "**smollm2-135m**" in card and "abc123" in card and "rank -> search -> distill" in card
    assert "32 x 256 tokens of `wikitext2/valid.txt`" in card
    assert "24,576 training tokens" in card and "(trial 7) scored heldout_kld = 0.2500 +/- 0.0100" in card
    assert "on 32,768 tokens" in card
    assert "2.5000" in card and "3.1250" in card


def test_the_card_of_a_mixture_of_experts_model_lists_its_experts_and_active_parameters():
    provenance = {
        "teacher": "tiny-qwen2-moe",
        "architecture": {"hidden_size": 48, "num_hidden_layers": 3, "num_experts": 3, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24},
        "teacher_architecture": {
            "hidden_size": 48,
            "num_hidden_layers": 4,
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 40,
        },
        "parameters": {"total": 70000, "non_embedding": 60000, "active": 50000},
        "teacher_parameters": {"total": 129200, "non_embedding": 123056, "active": 92336},
    }
    card = model_card("tiny-moe-minitron", provenance, {})
    for row in ("| num_experts | 3 | 4 |", "| moe_intermediate_size | 16 | 32 |", "| shared_expert_intermediate_size | 24 | 40 |"):
        assert row in card
    assert "| active parameters (per token) | 50,000 | 92,336 |" in card
    dense = model_card("tiny", {**provenance, "architecture": {"hidden_size": 48}, "parameters": {"total": 1, "non_embedding": 1}}, {})
    assert "num_experts | None" not in dense and "active parameters" not in dense


# --------------------------------------------------------------------------- transformers 4.x itself
TRANSFORMERS_4 = ("transformers==4.57.3", "tokenizers==0.22.1", "huggingface_hub==0.36.0")
LOAD_WITH_4 = (
    "import json, sys, torch, transformers\n"
    "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
    "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
    "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
    "with torch.no_grad():\n"
    "    torch.save(model(input_ids=torch.arange(40).view(2, 20)).logits, sys.argv[2])\n"
    "print(json.dumps({'version': transformers.__version__, 'rope_theta': model.config.rope_theta,\n"
    "    'rope_scaling': model.config.rope_scaling, 'tokenizer': type(tokenizer).__name__, 'ids': tokenizer(sys.argv[3]).input_ids}))\n"
)


@pytest.fixture(scope="session")
def transformers_4() -> Path:
    """transformers 4.57 in a folder of its own (pip's cache makes it seconds); skipped without the index."""
    target = cache_root() / "transformers-4.57"
    if not (target / "transformers").is_dir():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *TRANSFORMERS_4],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            pytest.skip(f"transformers 4.57 could not be installed with pip: {done.stderr.strip().splitlines()[-1:]}")
    return target


@pytest.mark.parametrize("case", ["llama-default", "llama-linear"])
def test_transformers_4_loads_the_export_with_the_same_logits(tmp_path, transformers_4, case):
    model, folder = export(tmp_path, case)
    env = {**os.environ, "PYTHONPATH": str(transformers_4)}
    done = subprocess.run([sys.executable, "-c", LOAD_WITH_4, str(folder), str(tmp_path / "logits.pt"), TEXT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["version"].startswith("4.57") and seen["tokenizer"] == "PreTrainedTokenizerFast"
    assert seen["rope_theta"] == CASES[case][2] and seen["ids"] == byte_tokenizer()(TEXT).input_ids
    if CASES[case][3] is not None:
        assert seen["rope_scaling"]["factor"] == CASES[case][3]["factor"]
    with torch.no_grad():
        expected = model(input_ids=INPUT).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-5)
