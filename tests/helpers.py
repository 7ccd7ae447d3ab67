"""Helpers the tests share: tiny random-init models of every supported family (from configs,
no downloads), random token blocks and rankings, a byte-level tokenizer, parameter counts and the
one-line-error checks; and, for the hybrid Mamba/attention families (NemotronH, Bamba), logits on
shared ids, layers by type, the gated-off Mamba mixer, memory against a real cache and a
fresh-process reload.

A module, not fixtures: parametrize lists and the subprocess workers need them at import
time. Fixtures (shared data, a PostgreSQL server) are in conftest.py.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from minitron_nas.config.space import Budget
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.saving import save_model
from minitron_nas.prune.ranking import Rankings
from minitron_nas.search.candidates import memory_gb

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

_COMMON = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)

TINY_CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **kw}),
    "llama-untied-bias": lambda **kw: LlamaConfig(**{**_COMMON, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**_COMMON, "sliding_window": 16, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**_COMMON, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2, **kw}),
    "qwen3": lambda **kw: Qwen3Config(**{**_COMMON, "tie_word_embeddings": True, **kw}),
    "gemma3": lambda **kw: Gemma3TextConfig(
        **{**_COMMON, "sliding_window": 16, "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"], **kw}
    ),
    # Mixture of experts: 4 experts, each token routed to 2. Mixtral and OLMoE size their
    # experts by intermediate_size (96); the Qwen MoEs by moe_intermediate_size (32), and
    # Qwen2-MoE adds a shared expert (40) behind a sigmoid gate. Mixtral always renormalises
    # the top-2 router weights, Qwen3-MoE here too (as Qwen3-30B-A3B), Qwen2-MoE and OLMoE
    # do not. OLMoE's q norm spans hidden_size: hidden = heads x head_dim (48 = 6 x 8).
    "mixtral": lambda **kw: MixtralConfig(**{**_COMMON, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16, **kw}),
    "qwen2_moe": lambda **kw: Qwen2MoeConfig(
        **{
            **_COMMON,
            **dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40, norm_topk_prob=False),
            **dict(use_sliding_window=True, sliding_window=16, max_window_layers=2, tie_word_embeddings=True),
            **kw,
        }
    ),
    "qwen3_moe": lambda **kw: Qwen3MoeConfig(
        **{**_COMMON, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True, **kw}
    ),
    "olmoe": lambda **kw: OlmoeConfig(**{**_COMMON, "eos_token_id": None, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": False, **kw}),
}
FAMILY_NAMES = sorted(TINY_CONFIGS)
MOE_FAMILY_NAMES = [name for name in FAMILY_NAMES if name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")]


def random_model(config, seed: int = 0, **from_config):
    """A random-init model of `config`, seeded, in eval mode; `from_config` goes to AutoModelForCausalLM.from_config."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **from_config)
    with torch.no_grad():  # norms start at exactly 1 (or 0); randomise them so slicing errors show
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def tiny_model(name: str, seed: int = 0, **overrides):
    return random_model(TINY_CONFIGS[name](**overrides), seed)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied matrix once


def is_moe(name: str) -> bool:
    return name in MOE_FAMILY_NAMES


def expert_width(arch: Architecture) -> int | None:
    """Each expert's FFN width: moe_intermediate_size (Qwen MoEs), else intermediate_size (Mixtral, OLMoE); None if dense."""
    if arch.num_experts is None:
        return None
    return arch.moe_intermediate_size if arch.moe_intermediate_size is not None else arch.intermediate_size


def random_rankings(teacher: Architecture, seed: int = 0) -> Rankings:
    """Random importances of the right shapes for `teacher`: a pruning that follows no real ranking.

    An MoE teacher (num_experts set) gets what `compute_rankings` gives one: expert scores
    (REAP and activation), each expert's neuron scores and the shared expert's, no dense neurons."""
    g = torch.Generator().manual_seed(seed)
    layers = teacher.num_hidden_layers
    rankings = Rankings(
        heads=torch.rand(layers, teacher.num_attention_heads, generator=g),
        neurons=torch.rand(layers, teacher.intermediate_size, generator=g),
        channels=torch.rand(teacher.hidden_size, generator=g),
        block_importance=torch.rand(layers, generator=g),
    )
    if teacher.num_experts is not None:
        rankings.neurons = None
        rankings.experts = torch.rand(layers, teacher.num_experts, generator=g)
        rankings.expert_activation = torch.rand(layers, teacher.num_experts, generator=g)
        rankings.expert_neurons = torch.rand(layers, teacher.num_experts, expert_width(teacher), generator=g)
        if teacher.shared_expert_intermediate_size is not None:
            rankings.shared_neurons = torch.rand(layers, teacher.shared_expert_intermediate_size, generator=g)
    return rankings


def random_blocks(n: int = 8, seq_len: int = 32, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))


EOS = 256  # byte_tokenizer: ids 0..255 are UTF-8 bytes, 256 is <eos>


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what ByteLevel pre-tokenizes to)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A local byte-level tokenizer (no downloads): token id == UTF-8 byte value, <eos> = 256."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab["<eos>"] = EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def assert_one_line_error(result, *fragments: str, alone: bool = True) -> str:
    """Exit 2, no traceback, exactly one `error: ` line (the last), naming problem and fix.

    `alone`: the failure came before any work, so that line is the whole output; otherwise
    progress bars of the work done before it (loading the teacher's weights) may precede it.
    """
    output = result.output if hasattr(result, "output") else result.stdout + result.stderr
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, f"exit {code}: {output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output[-3000:]
    if alone:
        assert lines == errors, output[-3000:]
    problem, _, fix = errors[0][len("error: ") :].partition(": ")
    assert problem and fix, errors[0]  # `<problem>: <fix>`
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def one_line(err: pytest.ExceptionInfo) -> str:
    """The message of an error `pytest.raises` caught, checked to be one line."""
    message = str(err.value)
    assert "\n" not in message, message
    return message


def write_space(path: Path, teacher: Path, corpus: str, **extra) -> Path:
    """A small space on a tiny teacher: a grid of nine, 4 retraining steps, 8 distillation steps (a checkpoint every 4)."""
    path.write_text(
        yaml.safe_dump(
            {
                "teacher": str(teacher),
                "axes": {
                    "hidden_size": [32, 48],
                    "intermediate_size": [48, 96],
                    "heads_per_group": [1, 3],
                    "num_key_value_heads": [2],
                    "num_hidden_layers": [2, 3, 4],
                },
                "budget": {"parameters": 40000, "tolerance": 0.2},
                "ranking": {"data": corpus, "samples": 8, "seq_len": 32},
                "retrain": {"tokens": 4 * 4 * 32, "batch_size": 4, "seq_len": 32, "lr": 0.003, "top_k": 32, "data": corpus, "eval_every": 2},
                "scoring": {"metric": "heldout_loss", "heldout_samples": 4, "seq_len": 32},
                "distill": {
                    "tokens": 8 * 4 * 32,
                    "batch_size": 4,
                    "seq_len": 32,
                    "lr": 0.001,
                    "data": corpus,
                    "eval_every": 4,
                    "checkpoint_every": 4,
                    "heldout_samples": 4,
                },
                "sampler": "grid",
                **extra,
            }
        )
    )
    return path


# --- hybrids: Mamba and attention layers (NemotronH, Bamba) -------------------------------------

HYBRID_IDS = random_blocks(2, 20, seed=1)  # 20 tokens: NemotronH's torch scan pads them to its chunk, Bamba's (16) makes two, one padded


@torch.no_grad()
def logits(model, ids: torch.Tensor = HYBRID_IDS) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def layers_of_types(counts: dict[str, int], types: list[str]) -> list[int]:
    """The first counts[t] teacher layers of each type t: what student_config slices the layer types by."""
    return sorted(i for kind, n in counts.items() for i in [j for j, t in enumerate(types) if t == kind][:n])


def best_subset(scores: torch.Tensor, types: list[str], kind: str, n: int) -> set[int]:
    """Brute force: the n layers of this type whose block importances sum highest."""
    own = [i for i, t in enumerate(types) if t == kind]
    return set(max(itertools.combinations(own, n), key=lambda s: sum(scores[i].item() for i in s)))


def assert_layers_are_the_teachers(student, teacher, layers: list[int]) -> None:
    """The weights of each student layer are those of its teacher layer, layers[position]."""
    for position, layer in enumerate(layers):
        own, theirs = student.model.layers[position].state_dict(), teacher.model.layers[layer].state_dict()
        assert own.keys() == theirs.keys()
        assert all(torch.equal(own[k], theirs[k]) for k in own)


@torch.no_grad()
def gate_off(mixer, heads: torch.Tensor, dims: torch.Tensor) -> None:
    """Make the teacher mixer (NemotronH's or Bamba's) compute what the pruned one does, without slicing anything.

    A zero gate z gives silu(0) = 0: the norm's input, its output and out_proj's input are
    exactly zero on every dropped channel. Scan, conv and gate act per channel, so kept
    channels are untouched. Each group's RMS then sums the kept squares S over n_t teacher
    channels where the student divides by its n_s: with r = n_s / n_t the same in every
    group, eps*r and a gain times sqrt(r) turn w*y/sqrt(S/n_t + eps*r) into w*y/sqrt(S/n_s + eps).
    """
    keep = torch.zeros(mixer.num_heads, mixer.head_dim, dtype=torch.bool)
    keep[heads[:, None], dims] = True
    dropped = ~keep.reshape(-1)  # [I] z rows come first in in_proj
    mixer.in_proj.weight[: dropped.numel()][dropped] = 0
    if mixer.in_proj.bias is not None:
        mixer.in_proj.bias[: dropped.numel()][dropped] = 0
    ratio = keep.sum().item() / keep.numel()
    mixer.norm.weight.mul_(ratio**0.5)
    mixer.norm.variance_epsilon *= ratio


def cache_values(model, batch: int, context: int) -> int:
    """Every value of the cache a real forward fills: attention keys and values, Mamba conv and SSM states."""
    with torch.no_grad():
        cache = model(input_ids=random_blocks(batch, context), use_cache=True).cache

    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple, dict)):
            for item in value.values() if isinstance(value, dict) else value:
                yield from tensors(item)

    return sum(t.numel() for layer in cache.layers for t in tensors(list(vars(layer).values())) if t.dim() > 0)  # not the step counters


def assert_memory_is_the_weights_and_the_cache(teacher_config, arch: Architecture, student) -> None:
    """memory_gb of `arch` is the student's weights and the cache a forward of 3 x 20 tokens fills, 4 bytes a value."""
    budget = Budget(parameters=1, context=20, batch=3, bytes_per_value=4)
    expected = (n_params(student) + cache_values(student, batch=3, context=20)) * 4 / 2**30
    assert memory_gb(teacher_config, arch, n_params(student), budget) == pytest.approx(expected, rel=1e-12)


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(int(sys.argv[1]))  # same kernels' partitioning as the parent: bitwise equal
ids = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[3]).eval()
with torch.no_grad():
    out = model(input_ids=ids, use_cache=False).logits
    generated = model.generate(ids[:, :8], max_new_tokens=3, do_sample=False)  # through the cache
config = {key: getattr(model.config, key) for key in sys.argv[5:]}
torch.save({"logits": out, "class": type(model).__name__, "config": config, "generated": generated}, sys.argv[4])
"""


def reload_in_fresh_process(student, family: str, directory: Path, *config_keys: str, ids: torch.Tensor = HYBRID_IDS) -> dict:
    """Save `student` under `directory`, reload it with plain transformers in a fresh process and check
    its logits and its greedy tokens through the cache are the student's, bitwise. Returns what the
    reloaded model is: its "class" name and, under "config", its config values of `config_keys`."""
    save_model(student, directory / "student", metadata={"family": family})
    torch.save(ids, directory / "ids.pt")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _RELOAD,
            str(torch.get_num_threads()),
            str(directory / "ids.pt"),
            str(directory / "student"),
            str(directory / "out.pt"),
            *config_keys,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = torch.load(directory / "out.pt")
    assert torch.equal(reloaded["logits"], logits(student, ids))
    with torch.no_grad():
        assert torch.equal(reloaded["generated"], student.generate(ids[:, :8], max_new_tokens=3, do_sample=False))
    return reloaded
