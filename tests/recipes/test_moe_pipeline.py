"""One tiny mixture-of-experts teacher through the stages by hand: rank -> prune (experts, their
width, the shared expert's) -> a few steps of KD -> export, loaded back by plain transformers.

Qwen2-MoE here (a shared expert, un-renormalised top-2, tied embeddings); the whole `run` on a
Mixtral teacher is tests/recipes/test_run_families.py. Also what an MoE student does with the
router's load-balancing loss: it is off (the student's config says so even when the teacher's
does not), and the distillation loss is the KD loss alone, which trains the routers.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import assert_one_line_error, byte_tokenizer, tiny_model, write_space
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.config.settings import DistillSettings
from minitron_nas.data import token_blocks
from minitron_nas.distill.losses import kd_loss
from minitron_nas.distill.signals import LiveFull
from minitron_nas.distill.stage import distill
from minitron_nas.distill.trainer import batch_loss
from minitron_nas.files import RunFolder
from minitron_nas.model.architecture import Architecture, ParamCounter
from minitron_nas.model.saving import export_winner, save_model
from minitron_nas.prune.ranking import Rankings

runner = CliRunner()
ARCH = {"num_experts": 3, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_hidden_layers": 3}
SETTINGS = DistillSettings(steps=6, batch_size=4, seq_len=32, lr=3e-4, warmup_steps=1, top_k=None, eval_every=3, checkpoint_every=3, intermediate="off")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Qwen2-MoE whose config asks for router logits (and so a load-balancing loss)."""
    folder = tmp_path_factory.mktemp("moe") / "teacher"
    save_model(tiny_model("qwen2_moe", vocab_size=257, output_router_logits=True), folder, byte_tokenizer())
    return folder


@pytest.fixture(scope="module")
def pruned(teacher, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-stages")
    result = invoke("rank", "--model", teacher, "--data", corpus, "--out", root / "rankings", "--samples", "8", "--seq-len", "32", "--batch-size", "4")
    assert result.exit_code == 0, result.output
    result = invoke("prune", "--model", teacher, "--rankings", root / "rankings", "--arch", json.dumps(ARCH), "--out", root / "pruned")
    assert result.exit_code == 0, result.output
    return root


def test_rank_scores_experts_and_prune_slices_them(teacher, pruned):
    rankings = Rankings.load(pruned / "rankings")
    assert rankings.neurons is None
    assert rankings.experts.shape == rankings.expert_activation.shape == (4, 4)
    assert rankings.expert_neurons.shape == (4, 4, 32) and rankings.shared_neurons.shape == (4, 40)
    student = AutoModelForCausalLM.from_pretrained(str(pruned / "pruned"))
    config = AutoModelForCausalLM.from_pretrained(str(teacher)).config
    arch = Architecture.from_dict(ARCH, Architecture.from_config(config))
    assert Architecture.from_config(student.config) == arch
    count = ParamCounter(config).count(arch)
    provenance = json.loads((pruned / "pruned" / "minitron.json").read_text())
    assert provenance["parameters"] == {"total": count.total, "non_embedding": count.non_embedding, "active": count.active}
    assert provenance["expert_criterion"] == "reap"
    assert sum(p.numel() for p in student.parameters()) == count.total > count.active
    assert student.config.output_router_logits is False  # the teacher's config asked for them: the student's does not


def test_kd_trains_the_routers_with_no_load_balancing_loss_and_the_export_loads_with_the_same_logits(teacher, pruned, corpus, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(pruned / "pruned"))
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    train = token_blocks(corpus, tokenizer, 32, SETTINGS.steps * SETTINGS.batch_size, "train")
    heldout = token_blocks(corpus, tokenizer, 32, 4, "heldout")

    # the loss a training step takes: the KD loss alone, no router term, whatever the config asks
    ids = train[:4]
    with torch.no_grad():
        want = kd_loss(student(input_ids=ids, use_cache=False).logits, teacher_model(input_ids=ids, use_cache=False).logits)
    student.train()
    out = student(input_ids=ids, use_cache=False)
    assert out.aux_loss is None and out.router_logits is None  # no load-balancing loss is even computed
    total, kd = batch_loss(student, ids, SETTINGS, LiveFull(teacher_model))
    assert torch.allclose(total, want, rtol=1e-5) and torch.equal(total.detach(), kd)
    asked = replace_config(student, output_router_logits=True)  # even a student asking for router logits
    assert asked(input_ids=ids, use_cache=False).aux_loss > 0  # ... computes the load-balancing loss
    total_asked, _ = batch_loss(asked, ids, SETTINGS, LiveFull(teacher_model))
    assert torch.allclose(total_asked, want, rtol=1e-5)  # ... but the distillation loss leaves it out (no labels)
    student.eval()

    result = distill(student, teacher_model, train, SETTINGS, tmp_path / "distill", heldout, progress=False)
    losses = [loss for _, loss in result.curve] + [loss for _, loss in result.eval_curve]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.eval_metric == "kd" and result.eval_curve[-1][1] < 0.9 * result.eval_curve[0][1], result.eval_curve
    for layer in range(3):  # KD reached every router, expert and shared expert
        for part in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_expert.up_proj.weight"):
            name = f"model.layers.{layer}.{part}"
            assert not torch.equal(dict(student.named_parameters())[name], before[name]), name

    student.eval()
    config = teacher_model.config
    counter, teacher_arch = ParamCounter(config), Architecture.from_config(config)
    arch = Architecture.from_dict(ARCH, teacher_arch)
    n, t = counter.count(arch), counter.count(teacher_arch)
    provenance = {
        "name": "tiny-moe-minitron",
        "teacher": str(teacher),
        "teacher_architecture": teacher_arch.to_dict(),
        "teacher_parameters": {"total": t.total, "non_embedding": t.non_embedding, "active": t.active},
        "architecture": arch.to_dict(),
        "parameters": {"total": n.total, "non_embedding": n.non_embedding, "active": n.active},
    }
    folder = export_winner(student, tokenizer, tmp_path / "export", provenance, {})
    card = (folder / "README.md").read_text()
    assert "| num_experts | 3 | 4 |" in card and f"| active parameters (per token) | {n.active:,} | {t.active:,} |" in card
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[2]).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(input_ids=torch.load(sys.argv[3]), use_cache=False).logits, sys.argv[4])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(torch.get_num_threads()), str(folder), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        want = student(input_ids=ids, use_cache=False).logits
    assert torch.equal(torch.load(tmp_path / "logits.pt"), want)


def replace_config(model, **changes):
    """A copy of `model` (same weights, same mode) whose config has `changes`."""
    copy = AutoModelForCausalLM.from_config(type(model.config).from_dict({**model.config.to_dict(), **changes}))
    copy.load_state_dict(model.state_dict())
    return copy.train(model.training)


def test_export_gguf_refuses_a_mixture_of_experts_teacher_in_one_line(teacher, corpus, tmp_path):
    space = write_space(tmp_path / "space.yaml", teacher, corpus)
    run = tmp_path / "run"
    RunFolder(run).distilled_model.mkdir(parents=True)  # as if distilled: the refusal comes before any export
    result = invoke("export", space, "--out", run, "--gguf", "f16")
    assert_one_line_error(result, "is a mixture-of-experts model (qwen2_moe)", "--gguf does not write mixture-of-experts models", alone=False)
    assert not list(tmp_path.rglob("*.gguf")) and not RunFolder(run).export.exists()
