"""lm-evaluation-harness tasks on local upstream files, with lm-eval's own prompts and metrics.

For each supported task (`converters.TASKS`) the upstream files of a data folder are
converted into the field layout of the dataset lm-eval's built-in task reads, written as
JSON lines into a cache folder, beside a task YAML that `include`s the built-in YAML of the
installed lm_eval package and overrides only the dataset location and the split names.
Prompts, targets, choices and metrics therefore stay lm-eval's own, so scores are
comparable to published lm-eval numbers. Few-shot examples come from the split lm-eval
takes them from (the training split, LAMBADA's test split); a task scored few-shot needs
its upstream training file in the data folder.

Any other task or group is resolved by lm-eval's own `TaskManager` (built-in tasks, plus the
folders or files of `include_path`) and loaded the way lm-eval loads it.

The cache folder of a task is keyed by a hash of its source files' contents, written
atomically, and reused while the sources are unchanged:
`cache_root()/lm_eval_data/<task>-<key>/{<split>.jsonl, <task>.yaml, source.json}`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path

import yaml

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.converters import CONVERTER_VERSION, SUPPORTED, TASKS, Record, TaskSpec
from minitron_nas.evaluate.quiet import quiet_lm_eval
from minitron_nas.files import write_text_atomic
from minitron_nas.model.teachers import cache_root

__all__ = [
    "PreparedTask",
    "TaskPlan",
    "builtin_metrics",
    "default_cache_dir",
    "fewshot_of",
    "lm_eval_tasks_dir",
    "parse_tasks",
    "plan_tasks",
    "prepare_task",
    "prepare_tasks",
    "task_manager",
]


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """'arc_easy,piqa' or a list -> de-duplicated task names in order (not yet checked)."""
    if not isinstance(tasks, (str, list, tuple)) or not all(isinstance(t, str) for t in ([] if isinstance(tasks, str) else tasks)):
        raise MinitronError(f"tasks must be lm-eval task names, got {tasks!r}: give e.g. [arc_easy, piqa]")
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t and t.strip()]
    if not names:
        raise MinitronError("no task given: name one or more lm-eval tasks, e.g. arc_easy,piqa")
    return list(dict.fromkeys(names))


def lm_eval_tasks_dir() -> Path:
    """The built-in task folder of the installed lm_eval package (found without importing it)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MinitronError("lm-evaluation-harness is not installed: run `pip install lm-eval`")
    return Path(spec.submodule_search_locations[0]) / "tasks"


def default_cache_dir() -> Path:
    return cache_root() / "lm_eval_data"


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class PreparedTask:
    name: str
    folder: Path  # holds <split>.jsonl, <name>.yaml, source.json
    yaml: Path
    data_files: dict[str, Path]
    eval_split: str


def _all_splits(spec: TaskSpec) -> dict[str, tuple[tuple[str, ...], Callable[..., Iterable[Record]]]]:
    return {**spec.splits, **({"train": spec.train} if spec.train else {})}


def _sources(spec: TaskSpec, data_dir: Path, fewshot: bool = False) -> dict[str, list[Path]]:
    """The source files of every split; the training split only when its files are all there.

    `fewshot`: the task is scored with few-shot examples, so the split lm-eval draws them
    from must be present (lm-eval would otherwise silently take them from another split).
    """
    if not data_dir.is_dir():
        raise MinitronError(f"data folder '{data_dir}' not found: pass the folder holding the upstream benchmark files (e.g. ../shared/data)")
    out = {}
    for split, (files, _) in spec.splits.items():
        paths = [data_dir / f for f in files]
        for path in paths:
            if not path.is_file():
                raise MinitronError(f"task {spec.name} needs '{path}', which is missing: put the upstream file there or pass another data folder")
        out[split] = paths
    if spec.train and all((data_dir / f).is_file() for f in spec.train[0]):
        out["train"] = [data_dir / f for f in spec.train[0]]
    if fewshot and spec.fewshot_split not in out:
        where = " and ".join(f"'{data_dir / f}'" for f in spec.train[0]) if spec.train else "no local file"
        raise MinitronError(
            f"{spec.name} draws its few-shot examples from its {spec.fewshot_split} split ({where}), which is missing: "
            f"put the upstream file there, score {spec.name} zero-shot, or drop data_dir to load it from the Hugging Face Hub"
        )
    return out


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _yaml_text(spec: TaskSpec, builtin: Path, data_files: dict[str, Path], hf_cache: Path, data_dir: Path) -> str:
    split_of = lambda s: s if s in data_files else None
    config = {
        "include": str(builtin),
        "task": spec.name,
        # Tags group built-in tasks (ai2_arc, lambada); one folder per task would register
        # them once per folder, with warnings. Tasks are loaded by name, so drop them.
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: str(p) for s, p in data_files.items()}, "cache_dir": str(hf_cache)},
        "training_split": split_of("train"),
        "validation_split": split_of("validation"),
        "test_split": split_of("test"),
    }
    header = f"# Generated by minitron_nas.evaluate.tasks from {data_dir}: lm-eval's built-in {spec.name} on local files.\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def _write_if_changed(path: Path, text: str) -> None:
    """Write `text` atomically unless the file already holds it."""
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        write_text_atomic(path, text)


def _convert(spec: TaskSpec, sources: dict[str, list[Path]], folder: Path, provenance: dict) -> None:
    """Write the converted splits into a temporary sibling, then rename it into place.

    A folder that appeared meanwhile (another process, same sources) is kept and ours dropped:
    unlike `files.atomic_dir`, which replaces, the first whole folder wins, so a worker
    reading it never sees it change under it.
    """
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as err:
        raise MinitronError(f"cannot write the lm-eval cache '{folder.parent}' ({err.strerror}): set MINITRON_NAS_CACHE to a writable folder") from None
    try:
        counts = {}
        for split, paths in sources.items():
            _, convert = _all_splits(spec)[split]
            with (tmp / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
                counts[split] = 0
                for record in convert(*paths):
                    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                    counts[split] += 1
        provenance = {**provenance, "records": counts, "converter_version": CONVERTER_VERSION}
        (tmp / "source.json").write_text(json.dumps(provenance, indent=1))  # written last: marks a whole folder
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_task(name: str, data_dir: str | Path, cache_dir: str | Path | None = None, fewshot: bool = False) -> PreparedTask:
    """Convert one task's upstream files (once per content) and write its task YAML."""
    if name not in TASKS:
        raise MinitronError(f"no local converter for task '{name}': the converted tasks are {', '.join(SUPPORTED)}")
    spec = TASKS[name]
    data_dir = Path(data_dir).expanduser()
    sources = _sources(spec, data_dir, fewshot)
    builtin = lm_eval_tasks_dir() / spec.builtin_yaml
    if not builtin.is_file():
        raise MinitronError(f"the installed lm-eval has no '{spec.builtin_yaml}': install lm-eval>=0.4.8")

    hashes = {f"{split}:{p.relative_to(data_dir)}": _file_hash(p) for split, paths in sources.items() for p in paths}
    key = hashlib.sha256(json.dumps([CONVERTER_VERSION, name, hashes], sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = folder.resolve() / f"{name}-{key}"
    data_files = {split: folder / f"{split}.jsonl" for split in sources}

    if not (folder / "source.json").is_file():
        _convert(spec, sources, folder, {"task": name, "data_dir": str(data_dir.resolve()), "sha256": hashes})

    yaml_path = folder / f"{name}.yaml"
    # Rewritten when it differs (e.g. lm_eval moved): it names the installed package's YAML.
    _write_if_changed(yaml_path, _yaml_text(spec, builtin, data_files, folder / "hf_datasets", data_dir.resolve()))
    return PreparedTask(name, folder, yaml_path, data_files, spec.eval_split)


def prepare_tasks(tasks: str | Sequence[str], data_dir: str | Path, cache_dir: str | Path | None = None, fewshot: Sequence[str] = ()) -> list[PreparedTask]:
    """Check every name and file first, then convert; `tasks` as 'a,b' or a list.

    `fewshot`: the tasks scored with few-shot examples (their few-shot split must be there).
    """
    names = parse_tasks(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise MinitronError(f"no local converter for task {', '.join(map(repr, unknown))}: the converted tasks are {', '.join(SUPPORTED)}")
    for name in names:
        _sources(TASKS[name], Path(data_dir).expanduser(), name in fewshot)
    return [prepare_task(name, data_dir, cache_dir, name in fewshot) for name in names]


def task_manager(prepared: Sequence[PreparedTask]):
    """An lm_eval TaskManager that knows only the prepared tasks (fast: built-in YAMLs are not indexed)."""
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import: only when tasks are resolved

    return TaskManager(include_path=[str(p.folder) for p in prepared], include_defaults=False)


# --------------------------------------------------------------------------- any lm-eval task


def fewshot_of(num_fewshot: int | dict | None, name: str) -> int | None:
    """The few-shot count for one requested task: one number for all, or {task: n} (None: the task's default)."""
    return num_fewshot.get(name) if isinstance(num_fewshot, dict) else num_fewshot


@dataclass(frozen=True)
class TaskPlan:
    """Where each requested task comes from, settled before any model loads."""

    names: tuple[str, ...]  # as requested: tasks, groups or tags
    local: tuple[PreparedTask, ...]  # fed from converted upstream files
    include_path: tuple[str, ...]  # the user's task folders and files
    defaults: bool  # lm-eval's built-in tasks are needed

    @property
    def offline(self) -> bool:
        """Every task is one of ours on local files: nothing may reach the network."""
        return len(self.local) == len(self.names)

    def manager(self):
        """lm-eval's TaskManager for the plan (built once per process for the same paths)."""
        return _manager(self.include_path, self.defaults)

    def load_spec(self, name: str) -> str:
        """What to hand TaskManager.load: a converted task's own YAML file, else the name."""
        local = {p.name: p for p in self.local}
        return str(local[name].yaml) if name in local else name


@lru_cache(maxsize=8)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager  # lm-eval takes seconds to import: only when tasks are resolved

    with quiet_lm_eval():  # indexing warns about every task a later folder overrides
        return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _include_paths(include_path, key: str = "include_path") -> tuple[str, ...]:
    paths = (include_path,) if isinstance(include_path, str) else tuple(include_path or ())
    out = []
    for entry in paths:
        path = Path(str(entry)).expanduser()
        if not path.exists():
            raise MinitronError(f"{key} '{entry}' not found: give a folder or YAML file of lm-eval task configs")
        out.append(str(path.resolve()))
    return tuple(out)


def _unknown_task(name: str, known: Sequence[str], include: Sequence[str], key: str) -> MinitronError:
    close = get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "no known task is close"
    where = f"lm-eval's {len(known)} tasks, groups and tags" + (f" and {', '.join(include)}" if include else "")
    return MinitronError(
        f"unknown lm-eval task '{name}' ({hint}): give a name from {where} (`lm-eval ls tasks` lists them), or add your task YAML folder with {key}"
    )


def plan_tasks(
    tasks: str | Sequence[str],
    data_dir: str | Path | None = None,
    include_path: str | Sequence[str] = (),
    num_fewshot: int | dict | None = None,
    cache_dir: str | Path | None = None,
    include_key: str = "include_path",
) -> TaskPlan:
    """Check every name, folder and file, convert what comes from `data_dir`; nothing loads a model.

    Our converted tasks come from `data_dir` when it is given; every other name must be known
    to lm-eval's TaskManager (built-in, or defined under `include_path`). `include_key`: the
    setting's name in messages (scoring.include_path, --include-path).
    """
    names = parse_tasks(tasks)
    include = _include_paths(include_path, include_key)
    local = [n for n in names if n in TASKS] if data_dir is not None else []
    fewshot = [n for n in local if (fewshot_of(num_fewshot, n) or 0) > 0]
    prepared = prepare_tasks(local, data_dir, cache_dir, fewshot) if local else []
    others = [n for n in names if n not in local]
    defaults = False
    if others:
        found = set(_manager(include, False).all_tasks) if include else set()
        builtin = [n for n in others if n not in found]
        if builtin:
            defaults = True
            # our seven exist in every supported lm-eval: no need to index its thousands of YAMLs to know that
            if not all(n in TASKS and (lm_eval_tasks_dir() / TASKS[n].builtin_yaml).is_file() for n in builtin):
                known = _manager(include, True).all_tasks  # the one scoring reuses
                for n in builtin:
                    if n not in known:
                        raise _unknown_task(n, known, include, include_key)
    return TaskPlan(tuple(names), tuple(prepared), include, defaults)


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing the functions their !function tags name."""


_TolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def builtin_metrics(name: str) -> list[str] | None:
    """The metric names one of our converted tasks reports, from the installed lm-eval's YAML (None: unknown)."""
    if name not in TASKS:
        return None
    path = lm_eval_tasks_dir() / TASKS[name].builtin_yaml
    for _ in range(4):  # follow `include:` (arc_challenge includes arc_easy)
        if not path.is_file():
            return None
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader) or {}
        if "metric_list" in config:
            return [m["metric"] for m in config["metric_list"] if isinstance(m, dict) and "metric" in m]
        if "include" not in config:
            return None
        path = path.parent / config["include"]
    return None
