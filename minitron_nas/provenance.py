"""What a saved thing was made from, and the one rule for reusing it: only when nothing changed.

Run folders (`run.json`), studies, checkpoints, the teacher's logit cache and rankings each
record the inputs they were made from. Before one is reused, `refuse_if_changed` compares
the record with the inputs now and refuses in one line that names the first difference
and the fix; nothing already written is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from minitron_nas.errors import MinitronError

__all__ = ["data_signature", "file_sha256", "first_difference", "refuse_if_changed"]


def first_difference(old, new, key: str = "") -> str | None:
    """'key was X, now Y' for the first differing leaf (keys sorted), or None when equal.

    Nested dicts are walked; floats are compared with `math.isclose` (a value that went
    through JSON and back is the same value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new), key=str):
            found = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    if isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool) and math.isclose(old, new):
        return None
    if _plain(old) == _plain(new):
        return None
    return f"{key or 'it'} was {_shown(old)}, now {_shown(new)}"


def refuse_if_changed(what: str, saved: dict, now: dict, fix: str, keys=None) -> None:
    """Raise MinitronError naming the first of `keys` (default: all of `now`) that differs.

    A key missing from `saved` or None in `now` is not compared: older records lack it, or
    the caller does not know it yet (e.g. the teacher before it loads)."""
    for key in keys if keys is not None else now:
        have, want = saved.get(key), now.get(key)
        if have is None or want is None:
            continue
        change = first_difference(have, want, key)
        if change:
            raise MinitronError(f"{what} was made from other inputs ({change}): {fix}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_signature(spec: str) -> str:
    """A file or folder by name, size and sampled content (first and last MiB); other names as they are."""
    path = Path(spec)
    if not path.exists():
        return spec
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}:{size}".encode())
        with file.open("rb") as handle:
            digest.update(handle.read(2**20))
            handle.seek(max(0, size - 2**20))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def _plain(value):
    """JSON's view of a value: tuples are lists, keys are strings."""
    return json.loads(json.dumps(value, default=str))


def _shown(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."
