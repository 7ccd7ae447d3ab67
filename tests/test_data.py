"""Corpora -> paragraphs -> packed token blocks, with a local byte-level tokenizer."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from helpers import EOS, byte_tokenizer

from minitron_nas.data import HELDOUT_EVERY, paragraphs, token_blocks
from minitron_nas.errors import MinitronError


@pytest.fixture(scope="module")
def tokenizer():
    """Token id == UTF-8 byte value, plus <eos> = 256: the expected ids are just the bytes."""
    wrapped = byte_tokenizer()
    assert wrapped.eos_token_id == EOS
    assert wrapped("é a\n", add_special_tokens=False)["input_ids"] == list("é a\n".encode())
    return wrapped


def stream(paras: list[str]) -> list[int]:
    ids: list[int] = []
    for para in paras:
        ids += list(para.encode("utf-8")) + [EOS]
    return ids


# 25 paragraphs, some spanning several lines, with stray whitespace and extra blank lines.
PARAS = [f"Paragraph {i} says héllo" + ("\nand goes on" if i % 4 == 0 else "") for i in range(25)]
TXT = "\n\n".join(("  " + p + " ") if i % 3 == 0 else p for i, p in enumerate(PARAS)) + "\n\n\n"
EXPECTED = [p.strip() + "\n" for p in PARAS]


def _split(paras, held):
    return [p for i, p in enumerate(paras) if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == held]


@pytest.fixture
def txt(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TXT, encoding="utf-8")
    return path


def test_txt_paragraphs_and_split(txt):
    everything = list(paragraphs(str(txt)))
    assert everything == EXPECTED
    train = list(paragraphs(str(txt), "train"))
    heldout = list(paragraphs(str(txt), "heldout"))
    assert heldout == [EXPECTED[9], EXPECTED[19]]
    assert train == _split(EXPECTED, held=False)
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(everything)


def test_line_per_article_file(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text(" \n = Title = \n \n first article line\nsecond article\n")
    assert list(paragraphs(str(path))) == ["= Title =\n", "first article line\n", "second article\n"]


def _docs():
    return ["doc one\n\ndoc one, second part", "doc two", "doc three\nwith a line break", "ünïcode doc"]


def _doc_paras():
    return ["doc one\n", "doc one, second part\n", "doc two\n", "doc three\n", "with a line break\n", "ünïcode doc\n"]


def test_jsonl_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": i, "text": d, "body": d.upper()}, ensure_ascii=False) for i, d in enumerate(_docs())]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n", encoding="utf-8")
    assert list(paragraphs(str(path))) == _doc_paras()
    assert list(paragraphs(str(path), text_field="body")) == [p.upper() for p in _doc_paras()]


def test_parquet_text_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"id": range(4), "text": _docs()}).to_parquet(path)
    assert list(paragraphs(str(path))) == _doc_paras()


def test_folder_reads_all_text_files_in_sorted_order(tmp_path, txt):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in _docs()))
    pd.DataFrame({"text": ["from parquet"]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "notes.csv").write_text("ignored,file\n")
    # sorted paths: c.parquet, corpus.txt, sub/b.jsonl
    want = ["from parquet\n", *EXPECTED, *_doc_paras()]
    assert list(paragraphs(str(tmp_path))) == want
    heldout = list(paragraphs(str(tmp_path), "heldout"))
    assert heldout == _split(want, held=True)
    assert len(heldout) == 3


def test_blocks_shape_and_content(txt, tokenizer):
    ids = stream(EXPECTED)
    blocks = token_blocks(str(txt), tokenizer, seq_len=16)
    assert blocks.dtype == torch.long
    assert blocks.shape == (len(ids) // 16, 16)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    capped = token_blocks(str(txt), tokenizer, seq_len=16, max_blocks=3)
    assert capped.shape == (3, 16)
    assert torch.equal(capped, blocks[:3])


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_split_blocks_pack_their_own_paragraphs(txt, tokenizer, split):
    ids = stream(_split(EXPECTED, held=split == "heldout"))
    blocks = token_blocks(str(txt), tokenizer, seq_len=8, split=split)
    assert blocks.shape == (len(ids) // 8, 8)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]


def test_blocks_are_deterministic(tmp_path, txt, tokenizer):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d}) for d in _docs() * 20))
    for source in (txt, jsonl, tmp_path):
        first = token_blocks(str(source), tokenizer, seq_len=12, max_blocks=10)
        second = token_blocks(str(source), tokenizer, seq_len=12, max_blocks=10)
        assert torch.equal(first, second)


def _one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(MinitronError, match=match) as info:
        result = fn(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            list(result)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_path(tmp_path, tokenizer):
    _one_line_error("not found", token_blocks, str(tmp_path / "nope.txt"), tokenizer)
    _one_line_error("not found", token_blocks, str(tmp_path / "no" / "folder"), tokenizer)


@pytest.mark.parametrize("content", ["", "\n\n  \n\t\n"])
def test_empty_file(tmp_path, tokenizer, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    _one_line_error("no block", token_blocks, str(path), tokenizer, seq_len=4)


def test_too_little_text_for_one_block(txt, tokenizer):
    message = _one_line_error("no block of 100000 tokens", token_blocks, str(txt), tokenizer, seq_len=100_000)
    assert "shorter --seq-len" in message


def test_wrong_suffix(tmp_path, tokenizer):
    path = tmp_path / "data.csv"
    path.write_text("text\nhello\n")
    _one_line_error("not .txt, .jsonl or .parquet", token_blocks, str(path), tokenizer)


def test_folder_without_text_files(tmp_path, tokenizer):
    (tmp_path / "a.csv").write_text("x\n")
    _one_line_error("holds no .txt", token_blocks, str(tmp_path), tokenizer)


def test_missing_jsonl_field(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "no text"}) + "\n")
    message = _one_line_error("has no 'text' field", token_blocks, str(path), tokenizer, seq_len=2)
    assert "docs.jsonl:2" in message


def test_missing_parquet_column(tmp_path, tokenizer):
    path = tmp_path / "docs.parquet"
    pd.DataFrame({"content": ["a b c"]}).to_parquet(path)
    _one_line_error("has no 'text' column", token_blocks, str(path), tokenizer, seq_len=2)


def test_bad_arguments(txt, tokenizer):
    _one_line_error("too short", token_blocks, str(txt), tokenizer, seq_len=1)
    _one_line_error("unknown split", paragraphs, str(txt), "test")


def test_wikitext2_valid(shared_data, tokenizer):
    path = shared_data / "wikitext2" / "valid.txt"
    blocks = token_blocks(str(path), tokenizer, seq_len=256, max_blocks=64)
    assert blocks.shape == (64, 256)
    assert int(blocks.max()) <= EOS and int(blocks.min()) >= 0
    first = b"= Homarus gammarus =\n"
    assert blocks[0, : len(first)].tolist() == list(first)
    assert blocks[0, len(first)].item() == EOS
    heldout = token_blocks(str(path), tokenizer, seq_len=256, max_blocks=64, split="heldout")
    assert heldout.shape == (64, 256)
    assert not torch.equal(heldout, blocks)
