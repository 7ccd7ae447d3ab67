"""Outputs appear whole or not at all: write to a temporary sibling, then rename."""

from __future__ import annotations

import errno
import glob
import os
import shutil
import signal
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import MinitronError


def check_writable(out: Path, overwrite: bool = False) -> None:
    """Fail before any work if `out` exists (and may not be replaced) or cannot be created."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MinitronError(f"output '{out}' already exists: choose another --out or pass --overwrite")
    _probe(out.parent)


def make_dir(out: Path) -> Path:
    """Create a run folder (and its parents) that outputs are added to, or fail with one line."""
    out = Path(out)
    _probe(out)
    return out


def _probe(folder: Path) -> None:
    """Create `folder` if needed and write a file into it: permissions fail here, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".minitron-probe-{uuid.uuid4().hex}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise MinitronError(f"cannot write to '{folder}' ({err.strerror}): choose a writable --out") from None


def _write_failed(out: Path, err: OSError) -> str:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing '{out}' (nothing was replaced): free disk space, then rerun"
    return f"could not write '{out}' ({err.strerror or err}; nothing was replaced): free disk space or fix the folder's permissions, then rerun"


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed.

    An OSError while writing (ENOSPC above all) becomes a one-line MinitronError naming `out`.
    """
    out = Path(out)
    check_writable(out, overwrite)
    _remove_orphans(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except OSError as err:  # disk full, quota, permissions: the previous `out` stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise MinitronError(_write_failed(out, err)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():  # Ctrl-C between the two renames would leave neither version
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
        else:
            old = None
            os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _signals_deferred():
    """Hold SIGINT and SIGTERM until the block is done; they are delivered right after."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove_orphans(out: Path) -> None:
    """Remove temporary siblings of `out` left by a writer that was killed (its pid is gone)."""
    for path in out.parent.glob(f".{glob.escape(out.name)}.*-*-*"):
        kind, _, rest = path.name[len(out.name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("partial", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def write_text_atomic(path: Path, text: str) -> Path:
    """Replace the file `path` by `text` whole: written beside it, then renamed over it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise MinitronError(_write_failed(path, err)) from None
    return path
