"""One process of a 2-process CPU (gloo) distillation, as `accelerate launch` would start it.

Usage: python ddp_worker.py OUT_FOLDER (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set by the
caller; WORLD_SIZE=1 runs the same distillation alone). Writes OUT_FOLDER/rank<R>.pt with the
projection and student weights and the curves.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import random_blocks, tiny_model

from minitron_nas.config.settings import DistillSettings
from minitron_nas.distill.losses import IntermediateStates
from minitron_nas.distill.trainer import make_accelerator, retrain
from minitron_nas.model.architecture import Architecture
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import compute_rankings


def main(out: Path) -> None:
    teacher = tiny_model("llama")
    blocks = random_blocks(16, 16)
    rankings = compute_rankings(teacher, blocks, progress=False)
    arch = Architecture(24, 48, 6, 2, 2)  # narrower and shallower: the projection is learned
    chosen = select(rankings, arch, Architecture.from_config(teacher.config))
    student = prune(teacher, rankings, arch)
    intermediate = IntermediateStates(chosen.layers, 24, 48, chosen.channels)
    initial = intermediate.project.weight.detach().clone()
    settings = DistillSettings(steps=3, batch_size=2, lr=1e-3, warmup_steps=0, top_k=None, eval_every=1, intermediate="on")
    accelerator = make_accelerator("cpu")
    result = retrain(
        student,
        blocks,
        None,
        settings,
        heldout_blocks=random_blocks(6, 16, seed=1),
        teacher=teacher,
        accelerator=accelerator,
        progress=False,
        intermediate=intermediate,
    )
    torch.save(
        {
            "processes": accelerator.num_processes,
            "projection": intermediate.project.weight.detach().clone(),
            "initial_projection": initial,
            "student": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "eval_curve": result.eval_curve,
            "curve": result.curve,
        },
        out / f"rank{int(os.environ.get('RANK', 0))}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
