"""The distill recipe: the search's winner (or any front member, for `export --front`), sliced
and continued from its last search state, fully distilled from the live teacher into
RUN/distill (checkpointed; a rerun resumes)."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from minitron_nas.data import token_blocks
from minitron_nas.distill.checkpoint import Checkpoint
from minitron_nas.distill.signals import LiveFull
from minitron_nas.distill.stage import distill
from minitron_nas.errors import add_resume_hint
from minitron_nas.evaluate.metrics import HeldoutKLD, HeldoutLoss
from minitron_nas.files import RunFolder, write_json_atomic
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.devices import is_main_process, process_count, wait_for_everyone
from minitron_nas.model.saving import save_model
from minitron_nas.model.teachers import Teacher
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import Rankings
from minitron_nas.recipes.search import best_arch
from minitron_nas.search.rung_states import read_state
from minitron_nas.search.trials import arch_key

__all__ = ["distill_candidate", "distill_winner", "heldout_metrics"]


@torch.no_grad()
def heldout_metrics(model, teacher_model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """Held-out LM loss and KL divergence to the teacher (full vocabulary), in nats, each with
    its standard error over the blocks. Student and teacher may live on different devices."""
    loss = HeldoutLoss(blocks, batch_size).measure(model)
    kld = HeldoutKLD(blocks, LiveFull(teacher_model), batch_size).measure(model)
    return {"heldout_loss": loss.value, "heldout_loss_stderr": loss.stderr, "kld": kld.value, "kld_stderr": kld.stderr}


def distill_winner(space, out: Path, teacher: Teacher) -> dict:
    """Full KD of the search's winner into out/distill (checkpointed; a rerun resumes).

    Under `accelerate launch` with N processes, `distill.tokens` stays the total: each
    optimizer step takes N x batch_size blocks, so there are N times fewer steps.
    """
    best = best_arch(out)
    return distill_candidate(space, out, teacher, best["architecture"], best.get("state"), RunFolder(out))


def distill_candidate(space, out: Path, teacher: Teacher, architecture: dict, state: str | None, into: RunFolder) -> dict:
    """Full KD of one searched architecture, continued from its rung `state` (None: from the
    slice), into `into.distill` (checkpointed; a rerun resumes): the winner's into the run
    folder itself, a front member's into its own folder (`export --front`)."""
    folder = into.distill
    try:
        return _distill(space, out, teacher, architecture, state, into)
    except KeyboardInterrupt as err:
        step, steps = Checkpoint.saved_step(folder), space.distill.total_steps
        if step is None:
            add_resume_hint(
                err,
                f"no checkpoint yet (the first comes at step {min(space.distill.checkpoint_every, steps)} of {steps}); rerun the same command to start the distillation again",
            )
        else:
            add_resume_hint(err, f"checkpoint at step {step} of {steps} kept in '{folder}'; rerun the same command to resume from it")
        raise


def _distill(space, out: Path, teacher: Teacher, architecture: dict, state: str | None, into: RunFolder) -> dict:
    teacher_arch = Architecture.from_config(teacher.model.config)
    arch = Architecture.from_dict(architecture, teacher_arch)
    rankings = Rankings.load(RunFolder(out).rankings, teacher.fingerprint)
    chosen = select(rankings, arch, teacher_arch, config=teacher.model.config)
    student = prune(teacher.model, rankings, arch)
    continued = _continue_from_search(student, arch, state)
    spec = space.distill
    settings = replace(spec, seed=space.seed)
    processes = process_count()
    if processes > 1:
        settings = replace(settings, steps=max(1, settings.total_steps // processes))
    train = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, settings.total_steps * spec.batch_size * spec.grad_accum * processes, "train")
    heldout = token_blocks(spec.data, teacher.tokenizer, spec.seq_len, spec.heldout_samples, "heldout")
    before = heldout_metrics(student, teacher.model, heldout)
    result = distill(student, teacher.model, train, settings, into.distill, heldout, chosen.layers, chosen.channels)
    after = heldout_metrics(student, teacher.model, heldout)
    summary = {
        "architecture": arch.to_dict(),
        "teacher": heldout_metrics(teacher.model, teacher.model, heldout),
        "before": before,
        "after": after,
        "heldout_loss_after": after["heldout_loss"],
        "tokens": result.tokens_seen,
        "seconds": round(result.seconds, 1),
        "intermediate": result.settings.get("intermediate_active"),
        "continued_from_search_steps": continued,
    }
    if is_main_process():  # under `accelerate launch` every process holds the same student
        save_model(student, into.distilled_model, teacher.tokenizer, {"architecture": arch.to_dict()}, overwrite=True)
        write_json_atomic(into.distill_summary, summary)
    wait_for_everyone()
    return summary


def _continue_from_search(student, arch: Architecture, state: str | None) -> int:
    """Start from the candidate's last stable state in the search (the steps it already trained,
    before its rung's decay), so no search token is wasted; returns those steps (0: from the slice).

    Only the weights carry over: AdamW starts afresh with the distillation's own warm-up,
    since its batch, sequence length, teacher signal and losses may differ from the rungs'.
    """
    saved = read_state(Path(state)) if state else None
    sizes = lambda a: {k: v for k, v in a.items() if k != "layers"}
    if saved is None or sizes(saved["architecture"]) != sizes(arch.to_dict()):
        return 0  # none kept, or made for another architecture than the one asked for now
    student.load_state_dict(saved["model"])
    print(
        f"distill: continuing {arch_key(arch)}'s search run from its step {saved['step']} (the state before its last rung's decay)", file=sys.stderr, flush=True
    )
    return int(saved["step"])
