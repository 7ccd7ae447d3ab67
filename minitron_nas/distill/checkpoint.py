"""A resumable training state, on accelerate's state API, refused when its inputs changed.

`accelerator.save_state` writes what a resumed run needs to continue the same trajectory:
the prepared models (the student and, when it learns, the intermediate-state projection,
as safetensors), the optimizer, the RNG states and the objects registered for
checkpointing (the scheduler and the curves so far). The data position follows from the
step (the row order is a function of the seed). Beside it, `made_from.json` records the
step and what the trajectory was made from: the settings, a hash of the training blocks,
the teacher's fingerprint and the student's architecture. A rerun with any of them changed
is refused in one line naming the first difference, before anything is loaded or trained. The folder is replaced
whole at each save (`files.atomic_dir`), so a kill mid-save keeps the previous one.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from safetensors import safe_open

from minitron_nas.distill.teacher_cache import blocks_sha256
from minitron_nas.errors import MinitronError
from minitron_nas.files import atomic_dir
from minitron_nas.model.teachers import fingerprint
from minitron_nas.provenance import refuse_if_changed

__all__ = ["Checkpoint"]

MADE_FROM = "made_from.json"


class Progress:
    """The curves and token count of a `RetrainResult`, as an object accelerate can checkpoint."""

    def __init__(self, result):
        self.result = result

    def state_dict(self) -> dict:
        r = self.result
        return {"curve": r.curve, "eval_curve": r.eval_curve, "eval_lm_curve": r.eval_lm_curve, "tokens_seen": r.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self.result, key, [tuple(p) for p in value] if isinstance(value, list) else value)


@contextmanager
def _tied_weights_quiet():
    """accelerate drops a tied `lm_head.weight` (an alias of the embedding) from the safetensors
    it writes and logs a warning for it into the training bar at every save; the restored model
    keeps its own tie, so the line says nothing a user can act on."""
    log = logging.getLogger("accelerate.utils.other")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class Checkpoint:
    """`folder/checkpoint`: saved every `every` optimizer steps and after the last."""

    def __init__(self, folder: Path, settings, student=None, teacher=None, train_blocks=None, every: int = 25):
        self.folder = Path(folder) / "checkpoint"
        self.every = every
        self.made_from = {
            "settings": asdict(settings),
            "training data": None if train_blocks is None else blocks_sha256(train_blocks),
            "teacher": None if teacher is None else fingerprint(teacher),
            "student architecture": None if student is None else _architecture_of(student.config),
        }

    def exists(self) -> bool:
        return (self.folder / MADE_FROM).is_file()

    def due(self, step: int, last: int) -> bool:
        return step == last or step % self.every == 0

    @staticmethod
    def saved_step(folder: Path) -> int | None:
        """The step of the checkpoint kept in `folder` (a run's distill folder), without loading it."""
        try:
            return int(json.loads((Path(folder) / "checkpoint" / MADE_FROM).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, step: int, accelerator, result) -> None:
        """Main process only: accelerate writes the weights there, and the RNG state saved is its own."""
        with atomic_dir(self.folder, overwrite=True) as tmp, _tied_weights_quiet():
            accelerator.save_state(str(tmp))
            (tmp / MADE_FROM).write_text(json.dumps({"step": step, **self.made_from}, indent=2))

    def verify(self) -> None:
        """Refuse, before any training, a checkpoint that is unreadable or was made from other inputs."""
        if not self.exists():
            return
        try:
            saved = json.loads((self.folder / MADE_FROM).read_text())
            for weights in self.folder.glob("*.safetensors"):  # the header only: its offsets must cover the file
                with safe_open(str(weights), "pt") as handle:
                    list(handle.keys())
        except Exception as err:
            raise self._unreadable(err) from None
        refuse_if_changed(
            f"the checkpoint in '{self.folder}'",
            saved,
            self.made_from,
            "resume with the original inputs and settings, or delete the checkpoint to start over",
            keys=("training data", "teacher", "student architecture", "settings"),  # the inputs first: they name what changed
        )

    def restore(self, accelerator) -> int:
        """Load the state into the accelerator's prepared objects; returns the step it was saved at."""
        self.verify()
        try:
            accelerator.load_state(str(self.folder))
        except Exception as err:
            raise self._unreadable(err) from None
        return int(json.loads((self.folder / MADE_FROM).read_text())["step"])

    def _unreadable(self, err: BaseException) -> MinitronError:
        return MinitronError(f"the checkpoint in '{self.folder}' is unreadable ({type(err).__name__}): delete it to start the distillation over")


def _architecture_of(config) -> dict:
    keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "vocab_size")
    return {key: getattr(config, key, None) for key in keys}
