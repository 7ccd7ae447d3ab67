"""What every benchmark report shares: the command that made it, the machine, the date.

Each script builds its own table and calls `write_report`, which heads it with the exact
command (so every figure can be regenerated), the machine and the load on it.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / "reports" / "benchmarks"


def command_line() -> str:
    """The command as it was typed, as near as Python can tell."""
    python = Path(sys.executable)
    try:
        python_text = str(python.relative_to(Path.cwd()))
    except ValueError:  # a venv elsewhere: name it as the README does, never by this machine's path
        parts = python.parts
        python_text = str(Path(*parts[parts.index(".venv") :])) if ".venv" in parts else python.name
    command = shlex.join([python_text, *sys.argv])
    if Path.cwd().resolve() != REPO:
        command = f"cd {shlex.quote(str(Path.cwd()))} && {command}"
    return command


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def busy_warning() -> list[str]:
    """A note for the report when other work competed for the CPUs during the run."""
    try:
        recent = os.getloadavg()[1]  # 5-minute average
    except OSError:
        return []
    cores = usable_cores()
    if recent <= cores:
        return []
    return [
        "",
        f"**Note:** the machine was busy (5-minute load average {recent:.1f} on {cores} cores at the end): other "
        "processes competed for the CPUs, so wall-clock times are longer than on an idle machine; ratios "
        "measured side by side are less affected.",
    ]


class Run:
    """Started when a benchmark starts; `write_report` closes it with the header filled in."""

    def __init__(self) -> None:
        self.command = command_line()
        self.started = dt.datetime.now().astimezone()
        self.load_before = load_average()

    def header(self, title: str, details: list[str]) -> list[str]:
        finished = dt.datetime.now().astimezone()
        gpu = f"- GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}" if torch.cuda.is_available() else "- GPU: none"
        return [
            f"# {title}",
            "",
            "Produced by (from the repository root):",
            "",
            "```",
            self.command,
            "```",
            "",
            f"- Date: {self.started.isoformat(timespec='seconds')} (took {(finished - self.started).total_seconds():.0f} s)",
            f"- CPU: {cpu_model()}, {os.cpu_count()} cores ({usable_cores()} usable)",
            gpu,
            f"- torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, Python {platform.python_version()}",
            f"- Load average (1/5/15 min) at start: {self.load_before}; at end: {load_average()}",
            *details,
            *busy_warning(),
            "",
        ]

    def write_report(self, out: Path, title: str, details: list[str], body: list[str]) -> None:
        """Print the body and write header + body to `out` (replaced whole, never half-written)."""
        text = "\n".join([*self.header(title, details), *body, ""])
        print("\n".join(body))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"\nwrote {out}")


def require_at_least(parser, args, names: tuple[str, ...], low: int = 1) -> None:
    """Refuse (parser.error) the first of the options `names` that is below `low`."""
    for name in names:
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be at least {low}")


def require_file(parser, path, option: str = "--data") -> None:
    """Refuse (parser.error) an option naming no file."""
    if not Path(path).is_file():
        parser.error(f"{option} '{path}' is not a file (paths are relative to the current directory)")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        f"| {' | '.join(header)} |",
        f"|{'|'.join('---' for _ in header)}|",
        *(f"| {' | '.join(str(c) for c in row)} |" for row in rows),
    ]
