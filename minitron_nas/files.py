"""Where a run's outputs live, and how they are written: whole or not at all.

`RunFolder` names every path inside a run folder (`--out`) once. Every output is written
to a temporary sibling, then renamed over the old one (`atomic_dir` for folders,
`write_text_atomic` / `write_json_atomic` for files), so a killed or failed run leaves
the previous version in place. Text inputs are read with `decode_utf8`, which refuses
binary, UTF-16 or Latin-1 bytes in one line naming the file and the byte's offset.
"""

from __future__ import annotations

import datetime as dt
import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import filelock

from minitron_nas.errors import MinitronError

__all__ = [
    "WRITE_ERRNOS",
    "RunFolder",
    "atomic_dir",
    "check_writable",
    "decode_utf8",
    "file_mode",
    "key_slug",
    "make_dir",
    "read_stage_file",
    "run_lock",
    "write_atomic",
    "write_failure",
    "write_json_atomic",
    "write_text_atomic",
]


@dataclass(frozen=True)
class RunFolder:
    """The layout of a run folder; each stage writes its part and reads the earlier ones."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # written before anything else, checked by every later stage
    run_file = property(lambda self: self.root / "run.json")  # what the run was made from
    stages = property(lambda self: self.root / "stages.json")  # the stages finished so far
    # rank
    rankings = property(lambda self: self.root / "rankings")
    # search
    study_db = property(lambda self: self.root / "study.db")
    teacher_logits = property(lambda self: self.root / "teacher_logits")  # top-k over the retraining blocks
    rung_states = property(lambda self: self.root / "rung_states")  # retrained candidates' stable states, continued at the next rung
    trials_csv = property(lambda self: self.root / "trials.csv")
    candidates_csv = property(lambda self: self.root / "candidates.csv")
    best_arch = property(lambda self: self.root / "best_arch.json")
    # distill
    distill = property(lambda self: self.root / "distill")  # checkpoint/ and curve.json while training
    distill_curve = property(lambda self: self.root / "distill" / "curve.json")
    distilled_model = property(lambda self: self.root / "distill" / "model")
    distill_summary = property(lambda self: self.root / "distill" / "summary.json")
    # export
    export = property(lambda self: self.root / "export")
    teacher_scores = property(lambda self: self.root / "teacher_scores.json")
    # export --front: one run-like folder per Pareto front member (its distill/ and export/), and their index
    family = property(lambda self: self.root / "family")
    family_index_csv = property(lambda self: self.root / "family" / "index.csv")
    family_index_md = property(lambda self: self.root / "family" / "index.md")
    # report
    dashboard = property(lambda self: self.root / "dashboard.html")
    report = property(lambda self: self.root / "report.md")
    # held while a stage writes (run_lock)
    lock = property(lambda self: self.root / ".minitron.lock")
    lock_holder = property(lambda self: self.root / ".minitron.lock.json")  # pid, host, since, stage

    def family_member(self, key: str) -> RunFolder:
        """The folder of one front member: its own distill/ and export/, laid out as in a run folder."""
        return RunFolder(self.family / key_slug(key))


def key_slug(key: str) -> str:
    """An architecture key (hidden/ffn/heads:kv/layers) as a file name that every filesystem accepts."""
    return key.replace("/", "_").replace(":", "-")


@contextmanager
def run_lock(out: Path, stage: str):
    """Hold the run folder while `stage` writes it: a second process is refused in one line
    naming the holder (pid, host, since when) and the fix.

    filelock's OS lock (flock) ends with its process, so a killed holder never blocks a rerun;
    its record is then taken over with a warning. Where the OS lock falls back to a plain file
    (some network filesystems), a holder whose pid is gone on this host is taken over too.
    """
    folder = RunFolder(make_dir(out))
    for attempt in range(2):
        lock = filelock.FileLock(folder.lock, timeout=0)
        try:
            lock.acquire()
            break
        except filelock.Timeout:
            holder = _lock_holder(folder)
            gone = holder is not None and holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0)))
            if attempt or not gone:
                who = f"`{holder.get('stage')}` (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')})" if holder else "another process"
                raise MinitronError(
                    f"run folder '{out}' is in use by {who}: wait for it to finish, or delete '{folder.lock}' if that process is gone"
                ) from None
            folder.lock.unlink(missing_ok=True)
    try:
        holder = _lock_holder(folder)
        if holder is not None and int(holder.get("pid", 0)) != os.getpid():
            print(
                f"warning: took over the lock of run folder '{out}' from `{holder.get('stage')}` (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('since')}), which is gone",
                file=sys.stderr,
                flush=True,
            )
        since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(folder.lock_holder, {"pid": os.getpid(), "host": socket.gethostname(), "since": since, "stage": stage})
        yield
    finally:
        folder.lock_holder.unlink(missing_ok=True)
        folder.lock.unlink(missing_ok=True)  # while still held: a later process makes a fresh one
        lock.release()


def _lock_holder(folder: RunFolder) -> dict | None:
    try:
        holder = json.loads(folder.lock_holder.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


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


_RUST_IO_ERROR = re.compile(r"\bOs \{ code: (\d+)")  # safetensors: `IoError(Os { code: 28, kind: StorageFull, ... })`
_TORCH_WRITE_FAILED = "PytorchStreamWriter failed writing"  # torch.save: the errno is lost
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)  # a write that failed, whoever wrote


def _write_cause(err: BaseException | None) -> tuple[int | None, str, str | None] | None:
    """(errno or None, reason, the file if known) of the failed write behind `err`, or None if it is none.

    Libraries wrap the OSError: safetensors raises SafetensorError naming the errno only in
    its text, torch.save a RuntimeError without it. A MinitronError is its own message.
    """
    seen = set()
    while err is not None and not isinstance(err, MinitronError) and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError):
            return err.errno, err.strerror or str(err), err.filename
        found = _RUST_IO_ERROR.search(str(err))
        if found:
            return int(found.group(1)), os.strerror(int(found.group(1))), None
        if _TORCH_WRITE_FAILED in str(err):
            return None, "file write failed", None
        err = err.__cause__ if err.__suppress_context__ else (err.__cause__ or err.__context__)
    return None


def write_failure(out: Path | str | None, err: BaseException, errors: tuple[int, ...] | None = None) -> str | None:
    """One line for a write under `out` (default: the file the error names) that failed: disk
    full, read-only disk, permissions. None if `err` is no write error (or, given `errors`,
    not one of those errnos)."""
    cause = _write_cause(err)
    if cause is None or (errors is not None and cause[0] not in errors):
        return None
    code, reason, filename = cause
    out = out or filename or "a file"
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing '{out}' (nothing was replaced): free disk space, then rerun"
    if code == errno.EROFS:
        return f"'{out}' is on a read-only file system (nothing was replaced): remount it read-write or choose another --out, then rerun"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied while writing '{out}' (nothing was replaced): fix the folder's permissions or choose another --out, then rerun"
    return f"could not write '{out}' ({reason}; nothing was replaced): free disk space or fix the folder's permissions, then rerun"


def file_mode() -> int:
    """The mode `open()` gives a new file under this process's umask: 0644 under the usual 022."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary folder; on success it replaces `out`, on failure it is removed.

    Every file in it gets `file_mode()` before the rename: libraries that write through
    `mkstemp` (transformers' `model.safetensors`) would otherwise leave 0600, which other
    users and containers cannot read. A failed write (ENOSPC above all, also when a library
    wraps the OSError) becomes a one-line MinitronError naming `out`.
    """
    out = Path(out)
    check_writable(out, overwrite)
    _remove_orphans(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        mode = file_mode()
        for path in tmp.rglob("*"):
            if path.is_file() and not path.is_symlink():
                path.chmod(mode)
    except BaseException as err:  # disk full, quota, permissions: the previous `out` stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(out, err) if isinstance(err, Exception) else None
        if failure is None:
            raise
        raise MinitronError(failure) from None
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
        kind, _, rest = path.name[len(out.name) + 2 :].partition("-")
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
    """Replace the file `path` by `text` whole: written beside it, then renamed over it.

    The temporary name is unique, so several workers may write into one run folder.
    """
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Replace the file `path` by what `write(tmp)` writes to a temporary path beside it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        failure = write_failure(path, err) if isinstance(err, Exception) else None
        if failure is None:
            raise
        raise MinitronError(failure) from None
    return path


def write_json_atomic(path: Path, value, indent: int | None = 2) -> Path:
    """`write_text_atomic` of `value` as JSON."""
    return write_text_atomic(path, json.dumps(value, indent=indent))


def read_stage_file(path: Path, fix: str, keys: tuple[str, ...] = (), missing: str | None = None) -> dict:
    """The JSON object a stage wrote to `path`, or one line naming it and `fix`.

    A file cut short or overwritten must never pass for a finished stage: it must parse, be
    an object and hold `keys`. `missing` is the fix when the file is absent (else `fix`).
    """
    path = Path(path)
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MinitronError(f"'{path}' is missing: {missing or fix}") from None
    except ValueError as err:  # cut mid-write, or other bytes written over it
        reason = f"invalid JSON at line {err.lineno}; cut short?" if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise MinitronError(f"'{path}' is corrupt ({reason}): {fix}") from None
    if not isinstance(value, dict):
        raise MinitronError(f"'{path}' is corrupt (not a JSON object): {fix}")
    lacks = [key for key in keys if key not in value]
    if lacks:
        raise MinitronError(f"'{path}' is corrupt (no '{lacks[0]}'): {fix}")
    return value


def decode_utf8(raw: bytes, path: Path | str, offset: int = 0) -> str:
    """`raw` (read from `path`, starting at byte `offset`) as text, or a one-line MinitronError.

    A NUL byte marks binary data or UTF-16 text, which would otherwise be read as garbage;
    any byte that is not UTF-8 (Latin-1 accents, say) is refused at its offset in the file.
    """
    nul = raw.find(b"\0")
    if nul >= 0:
        raise MinitronError(f"'{path}' is not UTF-8 text (a NUL byte at offset {offset + nul}; binary data or UTF-16?): convert it to UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise MinitronError(f"'{path}' is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {offset + err.start}): convert it to UTF-8") from None
