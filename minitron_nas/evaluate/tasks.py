"""lm-evaluation-harness tasks on local upstream files, with lm-eval's own prompts and metrics.

lm-eval's built-in task configs read Hugging Face dataset repos, which are unreachable
offline and use other schemas than the upstream files. For each supported task this module
converts the upstream files of a data folder into the exact field layout of the dataset the
built-in task reads, writes them as JSON lines into a cache folder, and writes a task YAML
that `include`s the built-in YAML of the installed lm_eval package and overrides only the
dataset location and the split names. Prompts, targets, choices and metrics therefore stay
lm-eval's own, so scores are comparable to published lm-eval numbers. Few-shot examples come
from the split lm-eval takes them from (the training split, LAMBADA's test split); a task
scored few-shot needs its upstream training file in the data folder.

Any other task or group is resolved by lm-eval's own `TaskManager` (built-in tasks, plus the
folders or files of `include_path`) and loaded the way lm-eval loads it.

The cache folder of a task is keyed by a hash of its source files' contents, written
atomically, and reused while the sources are unchanged:
`cache_root()/lm_eval_data/<task>-<key>/{<split>.jsonl, <task>.yaml, source.json}`.

Long (about 600 lines) because it holds one converter per supported task (the upstream file
formats differ); each converter is a short function, and the rest is the task registry and
lm-eval's quiet mode.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from difflib import get_close_matches
from functools import lru_cache
from pathlib import Path

import yaml

from minitron_nas.errors import MinitronError
from minitron_nas.files import write_text_atomic
from minitron_nas.model.teachers import cache_root

# Bump when a converter's output changes, so old cache folders are not reused.
CONVERTER_VERSION = 1

Record = dict


@dataclass(frozen=True)
class TaskSpec:
    """How one lm-eval task is fed from upstream files."""

    name: str
    builtin_yaml: str  # relative to lm_eval/tasks/
    splits: dict[str, tuple[tuple[str, ...], Callable[..., Iterable[Record]]]]  # split -> (source files, converter)
    eval_split: str  # the split lm-eval scores on (its published numbers use this one)
    fewshot_split: str = "train"  # the split lm-eval draws few-shot examples from
    train: tuple[tuple[str, ...], Callable[..., Iterable[Record]]] | None = None  # optional: present when its files are


# --------------------------------------------------------------------------- readers


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise MinitronError(f"'{path}' line {number} is not JSON ({err.msg}): give the upstream file unmodified") from None


def _field(record: dict, key: str, path: Path):
    try:
        return record[key]
    except (KeyError, TypeError):
        raise MinitronError(f"'{path}' has a record without '{key}': give the upstream file unmodified") from None


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- converters
# Each yields records in the schema of the Hugging Face dataset that lm-eval's built-in task reads.


def _arc(path: Path) -> Iterator[Record]:
    """AI2 upstream -> allenai/ai2_arc: question is the stem, choices a dict of parallel lists."""
    for record in _jsonl(path):
        question = _field(record, "question", path)
        choices = _field(question, "choices", path)
        labels = [str(c["label"]) for c in choices]
        answer = str(_field(record, "answerKey", path))
        if answer not in labels:
            raise MinitronError(f"'{path}': item {record.get('id')} has answerKey {answer!r} not among its labels {labels}: give the upstream file unmodified")
        yield {
            "id": record.get("id"),
            "question": _field(question, "stem", path),
            "choices": {"text": [c["text"] for c in choices], "label": labels},
            "answerKey": answer,
        }


def _piqa(path: Path, labels_path: Path) -> Iterator[Record]:
    """Upstream PIQA + labels file -> baber/piqa: goal, sol1, sol2, label (int)."""
    records = list(_jsonl(path))
    labels = _labels(labels_path)
    if len(labels) != len(records):
        raise MinitronError(f"'{labels_path}' has {len(labels)} labels for {len(records)} records in '{path}': give matching upstream files")
    for record, label in zip(records, labels):
        if label not in ("0", "1"):
            raise MinitronError(f"'{labels_path}' has label {label!r}: expected 0 or 1")
        yield {"goal": _field(record, "goal", path), "sol1": _field(record, "sol1", path), "sol2": _field(record, "sol2", path), "label": int(label)}


def _winogrande(path: Path) -> Iterator[Record]:
    """Upstream WinoGrande -> allenai/winogrande: answer stays the string "1" or "2"."""
    for record in _jsonl(path):
        answer = str(_field(record, "answer", path))
        if answer not in ("1", "2"):
            raise MinitronError(f'\'{path}\': item {record.get("qID")} has answer {answer!r}: expected "1" or "2" (dev split, not test)')
        yield {
            "sentence": _field(record, "sentence", path),
            "option1": _field(record, "option1", path),
            "option2": _field(record, "option2", path),
            "answer": answer,
        }


def _lambada(path: Path) -> Iterator[Record]:
    for record in _jsonl(path):
        yield {"text": _field(record, "text", path)}


_BOOL = {"true": 1, "false": 0, True: 1, False: 0}


def _boolq(path: Path) -> Iterator[Record]:
    """SuperGLUE upstream -> aps/super_glue boolq: label is 1 for true, 0 for false (choices no/yes)."""
    for record in _jsonl(path):
        raw = _field(record, "label", path)
        key = raw.lower() if isinstance(raw, str) else raw
        if key not in _BOOL:
            raise MinitronError(f"'{path}': item {record.get('idx')} has label {raw!r}: expected true or false (validation split, not test)")
        yield {"question": _field(record, "question", path), "passage": _field(record, "passage", path), "idx": record.get("idx"), "label": _BOOL[key]}


def wikitext_pages(raw_path: Path, layout_path: Path) -> list[str]:
    """WikiText-2 raw test -> EleutherAI/wikitext_document_level pages.

    That dataset splits the original `wiki.test.raw` (4358 lines, blank lines included) into
    articles at each top-level heading and joins the lines with "\\n". The raw file here has
    its blank lines dropped and CRLF endings; the tokenized `test.txt` of the same split has
    the original line layout, so the raw lines are put back into that layout first (line i
    of the raw file is the i-th non-blank line; both are checked to have the same words).
    """
    raw = [line for line in raw_path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    layout = layout_path.read_text(encoding="utf-8").split("\n")
    slots = [i for i, line in enumerate(layout) if line.strip()]
    if len(slots) != len(raw):
        raise MinitronError(
            f"'{raw_path}' has {len(raw)} text lines but '{layout_path}' has {len(slots)}: give the WikiText-2 test split in both (raw and tokenized)"
        )
    for i, line in zip(slots, raw):
        if len(line.split()) != len(layout[i].split()):
            raise MinitronError(f"'{raw_path}' and '{layout_path}' differ at line {i + 1}: give the WikiText-2 test split in both")
        layout[i] = line
    # The dataset script's own page splitting, verbatim in behaviour.
    pages, current = [], []
    for line in "\n".join(layout).split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def _wikitext(raw_path: Path, layout_path: Path) -> Iterator[Record]:
    for page in wikitext_pages(raw_path, layout_path):
        yield {"page": page}


# --------------------------------------------------------------------------- the tasks

_ARC_E = (("arc/ARC-Easy-Test.jsonl",), _arc)
_ARC_C = (("arc/ARC-Challenge-Test.jsonl",), _arc)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "arc_easy",
            "arc/arc_easy.yaml",
            {"test": _ARC_E, "validation": (("arc/ARC-Easy-Dev.jsonl",), _arc)},
            "test",
            train=(("arc/ARC-Easy-Train.jsonl",), _arc),
        ),
        TaskSpec(
            "arc_challenge",
            "arc/arc_challenge.yaml",
            {"test": _ARC_C, "validation": (("arc/ARC-Challenge-Dev.jsonl",), _arc)},
            "test",
            train=(("arc/ARC-Challenge-Train.jsonl",), _arc),
        ),
        TaskSpec(
            "piqa",
            "piqa/piqa.yaml",
            {"validation": (("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa)},
            "validation",
            train=(("piqa/train.jsonl", "piqa/train-labels.lst"), _piqa),
        ),
        TaskSpec(
            "winogrande",
            "winogrande/default.yaml",
            {"validation": (("winogrande/dev.jsonl",), _winogrande)},
            "validation",
            train=(("winogrande/train_xl.jsonl",), _winogrande),
        ),
        # lm-eval's LAMBADA has no training split: its few-shot examples come from the test split
        TaskSpec("lambada_openai", "lambada/lambada_openai.yaml", {"test": (("lambada/lambada_test.jsonl",), _lambada)}, "test", fewshot_split="test"),
        TaskSpec(
            "boolq",
            "super_glue/boolq/default.yaml",
            {"validation": (("boolq/superglue_val.jsonl",), _boolq)},
            "validation",
            train=(("boolq/superglue_train.jsonl",), _boolq),
        ),
        TaskSpec("wikitext", "wikitext/wikitext.yaml", {"test": (("wikitext2_raw/wiki.test.raw", "wikitext2/test.txt"), _wikitext)}, "test"),
    )
}
SUPPORTED = tuple(TASKS)


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


@contextmanager
def quiet_lm_eval(verbose: bool = False):
    """lm-eval, datasets and transformers quiet for the duration: no warnings, logs or per-request bars.

    Their bars and printed warnings go to stderr, which is redirected; the real stderr is
    yielded for the caller's own progress line. `verbose` leaves everything as it is.
    """
    if verbose:
        yield sys.stderr
        return
    real = sys.stderr
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "huggingface_hub", "evaluate", "accelerate")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield real
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- running offline


@contextmanager
def offline():
    """Hugging Face hub and datasets offline for the duration, restored afterwards.

    The libraries read the environment at import, so their module flags are patched too.
    """
    modules = {"huggingface_hub.constants": ("HF_HUB_OFFLINE",), "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched = []
    for module_name, attrs in modules.items():
        try:
            module = importlib.import_module(module_name)  # import before the environment changes
        except ImportError:
            continue
        patched += [(module, attr, getattr(module, attr)) for attr in attrs if hasattr(module, attr)]
    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    try:
        for k in env_keys:
            os.environ[k] = "1"
        for module, attr, _ in patched:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, old in patched:
            setattr(module, attr, old)
        for k, old in saved_env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
