"""Outputs appear whole or not at all, and what a killed writer left behind is cleared."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minitron_nas.files import atomic_dir


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_failed_write_leaves_the_previous_output_and_no_temporary_folder(tmp_path):
    out = tmp_path / "rankings"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError("killed halfway")
    assert (out / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rankings"]


def test_leftovers_of_a_killed_writer_are_removed_and_a_live_writers_are_kept(tmp_path):
    out = tmp_path / "model"
    dead, live = dead_pid(), os.getpid()
    orphans = [tmp_path / f".model.partial-{dead}-0a1b2c3d", tmp_path / f".model.old-{dead}-0a1b2c3d"]
    busy = tmp_path / f".model.partial-{live}-4e5f6a7b"
    unrelated = tmp_path / f".modelx.partial-{dead}-0a1b2c3d"
    for folder in (*orphans, busy, unrelated):
        folder.mkdir()
        (folder / "weights").write_text("half")
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text("whole")
    assert (out / "weights").read_text() == "whole"
    assert not any(p.exists() for p in orphans)
    assert busy.exists() and unrelated.exists()
