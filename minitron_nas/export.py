"""Write a model folder that plain `transformers` loads: weights, config, tokenizer, provenance."""

from __future__ import annotations

import json
from pathlib import Path

from .files import atomic_dir


def save_model(model, out: Path, tokenizer=None, metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Save atomically: a failed save leaves no folder that looks complete."""
    with atomic_dir(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "minitron.json").write_text(json.dumps(metadata or {}, indent=2))
    return Path(out)
