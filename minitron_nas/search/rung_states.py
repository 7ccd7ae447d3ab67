"""A retrained candidate's stable state after a rung, kept for its promotion and then forgotten.

A promoted candidate continues its warmup-stable-decay run from the state before its last
rung's decay (halving.py); the winner's final distillation starts from its last one. A
state nothing will continue is deleted, so the run folder holds at most two rungs of them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minitron_nas.distill.trainer import TrainState
from minitron_nas.errors import MinitronError
from minitron_nas.files import RunFolder, key_slug, write_atomic

__all__ = ["forget_states", "load_state", "read_state", "save_state", "state_file"]


def state_file(out: Path, rung: int, key: str) -> Path:
    """A retrained candidate's stable state after `rung` (weights and AdamW state)."""
    return RunFolder(out).rung_states / f"rung{rung}-{key_slug(key)}.pt"


def read_state(path: Path) -> dict | None:
    """A saved rung state ({architecture, step, model, optimizer}); None when there is none."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise MinitronError(
            f"the rung state '{path}' is unreadable ({type(err).__name__}): delete it and rerun (the candidate is then trained from the teacher's slice)"
        ) from None


def load_state(out: Path, rung: int, key: str) -> TrainState | None:
    """The candidate's stable state after `rung`; None (retrain from the slice) when it is gone."""
    saved = read_state(state_file(out, rung, key))
    return None if saved is None else TrainState(int(saved["step"]), saved["model"], saved["optimizer"])


def save_state(out: Path, rung: int, attrs: dict, state: TrainState) -> None:
    """Replace the candidate's state after `rung` atomically: a kill never leaves half of one."""
    path = state_file(out, rung, attrs["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"architecture": attrs["architecture"], "step": state.step, "model": state.model, "optimizer": state.optimizer}
    write_atomic(path, lambda tmp: torch.save(saved, tmp))


def forget_states(out: Path, rung: int, keep: set[str]) -> None:
    """Delete the rung's states of candidates not in `keep` (nothing will continue them)."""
    wanted = {state_file(out, rung, k) for k in keep}
    for path in RunFolder(out).rung_states.glob(f"rung{rung}-*.pt"):
        if path not in wanted:
            path.unlink(missing_ok=True)
