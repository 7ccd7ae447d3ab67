"""The config room reads and checks a space file without torch or transformers; its name lists
agree with the rooms that give them meaning."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from minitron_nas.config.space import DTYPE_NAMES, SAMPLER_NAMES
from minitron_nas.model.devices import DTYPES
from minitron_nas.search.samplers import SAMPLERS

REPO = Path(__file__).resolve().parents[2]


def test_reading_every_shipped_space_imports_no_torch():
    spaces = sorted(str(p) for p in (REPO / "search_spaces").glob("*.yaml"))
    assert spaces, "no shipped spaces found"
    code = (
        "import sys\n"
        "from minitron_nas.config.loader import read_space\n"
        "for path in sys.argv[1:]:\n"
        "    read_space(path)\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval', 'optuna') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *spaces], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"reading a space imported {done.stdout.strip()}"


def test_name_lists_match_the_rooms_that_use_them():
    assert tuple(SAMPLERS) == SAMPLER_NAMES
    assert tuple(DTYPES) == DTYPE_NAMES
