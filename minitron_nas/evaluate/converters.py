"""Upstream benchmark files -> the records lm-eval's built-in tasks read, one converter per task.

lm-eval's built-in task configs read Hugging Face dataset repos, which are unreachable
offline and use other schemas than the upstream files. Each converter here yields the
records of one upstream file (or file pair) in the exact field layout of the dataset the
built-in task reads; `TASKS` says which files feed which split of which task. The upstream
formats differ, so there is one short converter per task.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from minitron_nas.errors import MinitronError

__all__ = ["CONVERTER_VERSION", "SUPPORTED", "TASKS", "Record", "TaskSpec", "wikitext_pages"]

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


def _task(name: str, yaml: str, convert: Callable, splits: dict[str, tuple[str, ...]], eval_split: str, train: tuple[str, ...] = (), **kw) -> TaskSpec:
    """A TaskSpec whose splits (and training split, when given) are all read by `convert`."""
    return TaskSpec(name, yaml, {split: (files, convert) for split, files in splits.items()}, eval_split, train=(train, convert) if train else None, **kw)


def _arc_task(level: str) -> TaskSpec:
    files = {split: (f"arc/ARC-{level}-{part}.jsonl",) for split, part in (("test", "Test"), ("validation", "Dev"), ("train", "Train"))}
    train = files.pop("train")
    return _task(f"arc_{level.lower()}", f"arc/arc_{level.lower()}.yaml", _arc, files, "test", train)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _arc_task("Easy"),
        _arc_task("Challenge"),
        _task(
            "piqa",
            "piqa/piqa.yaml",
            _piqa,
            {"validation": ("piqa/valid.jsonl", "piqa/valid-labels.lst")},
            "validation",
            ("piqa/train.jsonl", "piqa/train-labels.lst"),
        ),
        _task("winogrande", "winogrande/default.yaml", _winogrande, {"validation": ("winogrande/dev.jsonl",)}, "validation", ("winogrande/train_xl.jsonl",)),
        # lm-eval's LAMBADA has no training split: its few-shot examples come from the test split
        _task("lambada_openai", "lambada/lambada_openai.yaml", _lambada, {"test": ("lambada/lambada_test.jsonl",)}, "test", fewshot_split="test"),
        _task("boolq", "super_glue/boolq/default.yaml", _boolq, {"validation": ("boolq/superglue_val.jsonl",)}, "validation", ("boolq/superglue_train.jsonl",)),
        _task("wikitext", "wikitext/wikitext.yaml", _wikitext, {"test": ("wikitext2_raw/wiki.test.raw", "wikitext2/test.txt")}, "test"),
    )
}
SUPPORTED = tuple(TASKS)
