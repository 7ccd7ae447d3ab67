"""GGUF files for llama.cpp: the metadata it reads, and transformers' GGUF reader as an
independent oracle (it undoes llama.cpp's q/k permutation itself) giving back the logits."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import gguf
import pytest
import torch
from helpers import MOE_FAMILY_NAMES, byte_tokenizer, random_rankings, tiny_model
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.gguf import check_gguf, compare, gguf_path, transformers_logits, write_gguf
from minitron_nas.model.saving import save_model
from minitron_nas.prune.pruning import prune

# Tiny Llama: hidden 48, FFN 96, 6 heads of 8 in 2 KV groups, 4 layers.
CUTS = {
    # width: hidden 40 is not heads x head_dim (4 x 8), so key_length must come from head_dim
    "width": {"hidden_size": 40, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
    "depth": {"layers": [0, 2, 3]},
    "none": {},
}
BLOCKS = torch.randint(0, 257, (3, 24), generator=torch.Generator().manual_seed(0))


def pruned(family: str, cut: str, vocab_size: int = 257):
    model = tiny_model(family, vocab_size=vocab_size)
    teacher = Architecture.from_config(model.config)
    return prune(model, random_rankings(teacher, seed=1), Architecture.from_dict(CUTS[cut], teacher)).eval()


def tokenizer_with_a_merge(gpt2_regex: bool = False) -> PreTrainedTokenizerFast:
    """The byte tokenizer plus one merge (two spaces -> id 257): llama.cpp refuses a BPE
    vocabulary without merges, and a GGUF array cannot be empty. `gpt2_regex`: split words
    as GPT-2 does first (the pre-tokenizer llama.cpp calls gpt-2)."""
    spec = json.loads(byte_tokenizer().backend_tokenizer.to_str())
    spec["pre_tokenizer"]["use_regex"] = gpt2_regex
    spec["model"]["vocab"]["\u0120\u0120"] = 257
    spec["model"]["merges"] = [["\u0120", "\u0120"]]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<eos>")


def fields(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    values = {key: field.contents() for key, field in reader.fields.items() if key not in ("tokenizer.ggml.merges",)}
    return {**values, "tensors": {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}}


@pytest.mark.parametrize("family", ["llama", "llama-untied-bias"])
@pytest.mark.parametrize("cut", ["width", "depth"])
def test_metadata_is_what_llama_cpp_reads(tmp_path, family, cut):
    model = pruned(family, cut)
    config = model.config
    folder = save_model(model, tmp_path / "export", byte_tokenizer())
    path = write_gguf(folder, gguf_type="q8_0", name="tiny-minitron")
    assert path == gguf_path(folder, "q8_0") == tmp_path / "export-q8_0.gguf"
    seen = fields(path)
    assert seen["general.architecture"] == "llama" and seen["general.name"] == "tiny-minitron"
    assert seen["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expected = {
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.attention.key_length": 8,
        "llama.attention.value_length": 8,
        "llama.rope.dimension_count": 8,
        "llama.rope.freq_base": config.rope_parameters["rope_theta"],
        "llama.context_length": 128,
        "llama.vocab_size": 257,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.eos_token_id": 256,
    }
    assert {key: seen[key] for key in expected} == expected
    assert seen["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert len(seen["tokenizer.ggml.tokens"]) == len(seen["tokenizer.ggml.token_type"]) == 257
    assert seen["tokenizer.ggml.tokens"][256] == "<eos>" and seen["tokenizer.ggml.token_type"][256] == gguf.TokenType.CONTROL
    tensors = seen["tensors"]
    last = config.num_hidden_layers - 1
    assert f"blk.{last}.attn_q.weight" in tensors and f"blk.{last + 1}.attn_q.weight" not in tensors
    assert ("output.weight" in tensors) is (not config.tie_word_embeddings)
    assert tensors["blk.0.attn_norm.weight"] == "F32"
    assert tensors["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 96 or 64: whole blocks of 32
    rows_of_hidden = "F16" if config.hidden_size % 32 else "Q8_0"  # rows of 40 are not whole blocks
    assert tensors["token_embd.weight"] == tensors["blk.0.attn_k.weight"] == rows_of_hidden
    assert all(name.endswith((".weight", ".bias")) for name in tensors)


@pytest.mark.parametrize("family", ["llama", "llama-untied-bias"])
@pytest.mark.parametrize("cut", ["none", "width", "depth"])
def test_transformers_reads_the_f16_gguf_back_with_the_same_logits(tmp_path, family, cut):
    model = pruned(family, cut)
    folder = save_model(model, tmp_path / "export", byte_tokenizer())
    path = write_gguf(folder, gguf_type="f16")
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    assert reloaded.config.tie_word_embeddings is model.config.tie_word_embeddings
    seen = compare(transformers_logits(model), transformers_logits(reloaded), BLOCKS)
    assert seen.max_abs_logit_diff < 5e-3, seen  # f16 rounding of the weights, nothing more
    assert abs(seen.nll_diff) < 1e-3, seen


@pytest.mark.parametrize("gguf_type, tolerance", [("bf16", 2e-2), ("q8_0", 1e-2)])
def test_bf16_and_q8_0_dequantise_to_the_same_model(tmp_path, gguf_type, tolerance):
    model = pruned("llama", "none")
    folder = save_model(model, tmp_path / "export", byte_tokenizer())
    path = write_gguf(folder, gguf_type=gguf_type)
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    seen = compare(transformers_logits(model), transformers_logits(reloaded), BLOCKS)
    assert seen.max_abs_logit_diff < tolerance, seen


def test_a_failed_write_replaces_nothing(tmp_path):
    folder = save_model(pruned("llama", "none"), tmp_path / "export", byte_tokenizer())
    path = write_gguf(folder)
    before = path.read_bytes()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(MinitronError, match="has no tokenizer.json"):
        write_gguf(folder)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export-f16.gguf"]


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: tiny_model("qwen3", vocab_size=257), "is a qwen3 model: --gguf writes Llama models only"),
        (lambda: tiny_model("llama", vocab_size=257, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "uses linear rope scaling"),
    ],
)
def test_what_gguf_cannot_hold_is_refused_in_one_line(tmp_path, make, fragment):
    folder = save_model(make(), tmp_path / "export", byte_tokenizer())
    with pytest.raises(MinitronError, match=fragment) as err:
        write_gguf(folder)
    assert "\n" not in str(err.value) and "export without --gguf" in str(err.value)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_mixture_of_experts_models_are_not_written(tmp_path, family):
    """GGUF export of MoE models is not supported: each MoE family is skipped here with the refusal checked."""
    folder = save_model(pruned(family, "depth"), tmp_path / "export", byte_tokenizer())
    with pytest.raises(MinitronError, match=f"is a mixture-of-experts model \\({family}\\): --gguf does not write mixture-of-experts models") as err:
        write_gguf(folder)
    assert "\n" not in str(err.value) and str(err.value).endswith("export without --gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_the_check_says_in_one_line_why_it_is_skipped(tmp_path, monkeypatch):
    model = pruned("llama", "none")
    path = write_gguf(save_model(model, tmp_path / "export", byte_tokenizer()))
    for binding in ("llama_cpp", "ik_llama_cpp"):
        monkeypatch.setitem(sys.modules, binding, None)  # as if neither binding were installed
    note = check_gguf(path, model, BLOCKS)
    assert note.startswith("GGUF check skipped: llama.cpp is not installed") and "\n" not in note


@pytest.mark.parametrize("cut, pre", [("width", "default"), ("depth", "gpt-2")])
def test_the_check_in_llama_cpp_agrees_with_transformers(tmp_path, cut, pre):
    """llama.cpp, an independent implementation, loads the tool's f16 GGUF (under each
    pre-tokenizer name written) and computes the same next-token NLL as transformers."""
    if all(importlib.util.find_spec(binding) is None for binding in ("llama_cpp", "ik_llama_cpp")):
        pytest.skip("neither llama-cpp-python nor ik-llama-cpp-python is installed")
    cpuinfo = Path("/proc/cpuinfo")
    if importlib.util.find_spec("llama_cpp") is None and cpuinfo.is_file() and " avx2" not in cpuinfo.read_text():
        pytest.skip("ik-llama-cpp-python's prebuilt wheel needs a CPU with AVX2")
    model = pruned("llama", cut, vocab_size=258)
    path = write_gguf(save_model(model, tmp_path / "export", tokenizer_with_a_merge(gpt2_regex=pre == "gpt-2")))
    assert fields(path)["tokenizer.ggml.pre"] == pre
    note = check_gguf(path, model, BLOCKS)
    assert "in llama.cpp (" in note, note
    difference = float(note.split("(difference ")[1].split(")")[0])
    assert abs(difference) < 1e-2, note


@pytest.mark.teacher
def test_the_teachers_gguf_says_what_llama_cpps_own_converter_said(tmp_path):
    """The embedded teacher GGUF was written by llama.cpp's convert_hf_to_gguf.py: the tool's
    GGUF of the same model carries the same architecture and tokenizer metadata."""
    from minitron_nas.model.teachers import DEFAULT_TEACHER, embedded_gguf, load_teacher

    teacher = load_teacher(DEFAULT_TEACHER, "cpu", "float32")
    folder = save_model(teacher.model, tmp_path / "export", teacher.tokenizer, {"name": "smollm2-135m"})
    ours, upstream = fields(write_gguf(folder, gguf_type="q8_0")), fields(embedded_gguf(DEFAULT_TEACHER))
    same = [key for key in upstream if key.startswith(("llama.", "tokenizer.")) and key != "tokenizer.ggml.add_space_prefix"]
    assert "tokenizer.ggml.tokens" in same and "llama.rope.freq_base" in same
    differing = {key: (ours.get(key), upstream[key]) for key in same if ours.get(key) != upstream[key]}
    # upstream's SmolLM2 pre-tokenizer splits digits one by one; the teacher's tokenizer.json as
    # transformers rebuilt it from the GGUF is plain byte-level BPE, which llama.cpp calls gpt-2
    assert differing == {"tokenizer.ggml.pre": ("gpt-2", "smollm")}
    assert ours["general.name"] == "smollm2-135m" and sorted(ours["tensors"]) == sorted(upstream["tensors"])
