"""The whole run (rank -> search -> distill -> export -> report) on tiny hybrid Mamba/attention
teachers (NemotronH, Bamba) and a tiny mixture-of-experts teacher, their own axes searched: KD
and the search work unchanged on these students, and the export loads with plain transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import byte_tokenizer, write_space
from transformers import AutoModelForCausalLM, BambaConfig, MixtralConfig, NemotronHConfig

from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.saving import save_model
from minitron_nas.recipes.run import STAGES, finished_stages, run
from minitron_nas.report.labels import FAMILY_LABELS
from minitron_nas.search.candidates import enumerate_candidates, load_space

SMALL = dict(vocab_size=257, hidden_size=48, intermediate_size=64, num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
TEACHERS = {
    # "M-M*-M": 3 Mamba layers (8 heads of 6 in 2 groups), 1 attention, 2 MLP layers; a 16-token chunk
    # keeps the CPU scan short. Candidates: 4 or 8 Mamba heads in 2 or 3 Mamba layers, 54k to 71k
    # parameters; the budget admits the three below the teacher.
    "nemotron_h": (
        lambda: NemotronHConfig(
            **SMALL,
            **dict(mamba_num_heads=8, mamba_head_dim=6, n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=16),
            **dict(hybrid_override_pattern="M-M*-M", eos_token_id=256, bos_token_id=256, pad_token_id=256),
        ),
        {"mamba_num_heads": [4, 8], "num_mamba_layers": [2, 3]},
        {"parameters": 58_000, "tolerance": 0.1},
        ("mamba_num_heads", "mamba_head_dim", "num_mamba_layers", "num_attention_layers", "num_mlp_layers"),
    ),
    # 3 layers, the middle one attention, each with its MLP; 8 Mamba heads of 12 in 2 groups (96 =
    # mamba_expand 2 x hidden 48), so the Mamba width follows the hidden size. Candidates: hidden
    # 32, 40 or 48 with head_dim 8, 10 or 12 to match, in 1 or 2 Mamba layers, 41k to 92k parameters;
    # the budget admits three below the teacher.
    "bamba": (
        lambda: BambaConfig(
            **SMALL,
            **dict(num_hidden_layers=3, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=12, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=16),
            **dict(eos_token_id=256, bos_token_id=256, pad_token_id=256),
        ),
        {"hidden_size": [32, 40, 48], "mamba_head_dim": [8, 10, 12], "num_mamba_layers": [1, 2]},
        {"parameters": 55_000, "tolerance": 0.25},
        ("mamba_num_heads", "mamba_head_dim", "num_mamba_layers", "num_attention_layers"),
    ),
    # 2 layers of 4 experts (width 32), top-2. Candidates: 2 or 4 experts in 1 or 2 layers, 40k to 74k
    # parameters; the budget admits the three below the teacher.
    "mixtral": (
        lambda: MixtralConfig(**{**SMALL, "intermediate_size": 32, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
        {"num_experts": [2, 4], "num_hidden_layers": [1, 2]},
        {"parameters": 48_000, "tolerance": 0.25},
        ("num_experts",),
    ),
}


def family_teacher(folder: Path, name: str) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TEACHERS[name][0](), dtype=torch.float32)
    with torch.no_grad():  # as helpers.tiny_model: norms away from exactly 1
        for pname, param in model.named_parameters():
            if "norm" in pname:
                param.add_(torch.randn_like(param) * 0.1)
    save_model(model.eval(), folder, byte_tokenizer())
    return folder


@pytest.mark.parametrize("name", TEACHERS)
def test_run_on_a_family_teacher_searches_its_axes_and_exports_a_loadable_model(name, corpus, tmp_path):
    _, axes, budget, family_keys = TEACHERS[name]
    teacher = family_teacher(tmp_path / f"tiny-{name}", name)
    space = load_space(write_space(tmp_path / "space.yaml", teacher, corpus, axes=axes, budget=budget))
    config = AutoModelForCausalLM.from_pretrained(str(teacher)).config
    feasible, _ = enumerate_candidates(space, config)
    assert len(feasible) >= 3 and Architecture.from_config(config) not in {c.arch for c in feasible}  # a real choice, the teacher excluded

    exported = run(space, tmp_path / "run")
    assert list(finished_stages(tmp_path / "run")) == list(STAGES)
    best = json.loads((tmp_path / "run" / "best_arch.json").read_text())
    arch = best["architecture"]
    assert all(arch[key] is not None for key in family_keys), arch
    assert {axis: arch[axis] for axis in axes} in [{axis: getattr(c.arch, axis) for axis in axes} for c in feasible]
    summary = json.loads((tmp_path / "run" / "distill" / "summary.json").read_text())
    assert summary["after"]["kld"] < summary["before"]["kld"]  # distillation trained the student
    trials = pd.read_csv(tmp_path / "run" / "trials.csv")
    assert all(trials[axis].notna().all() for axis in axes)  # the family's axes are columns of the trials table
    assert all(f"{FAMILY_LABELS[axis]} " in (tmp_path / "run" / "dashboard.html").read_text() for axis in axes if axis in FAMILY_LABELS)
    header = next(line for line in (tmp_path / "run" / "report.md").read_text().splitlines() if line.startswith("|") and "last rung" in line)
    assert all(f" {FAMILY_LABELS[axis]} |" in header for axis in axes if axis in FAMILY_LABELS)  # and of report.md's candidates

    model = AutoModelForCausalLM.from_pretrained(str(exported)).eval()  # plain transformers, no project code
    assert type(model).__name__ == type(AutoModelForCausalLM.from_config(config)).__name__
    assert Architecture.from_config(model.config).to_dict() == arch
    assert sum(p.numel() for p in model.parameters()) == ParamCounter(config).count(Architecture.from_dict(arch, Architecture.from_config(config))).total
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(40).view(2, 20)).logits).all()
