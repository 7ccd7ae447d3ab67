"""The one rule for reusing what was saved: the first difference is named, nothing else passes."""

from __future__ import annotations

import pytest

from minitron_nas.errors import MinitronError
from minitron_nas.provenance import data_signature, file_sha256, first_difference, refuse_if_changed


def test_first_difference_names_the_first_changed_leaf_in_key_order():
    old = {"retrain": {"lr": 0.003, "steps": 4}, "budget": {"parameters": 10}}
    new = {"retrain": {"lr": 0.001, "steps": 8}, "budget": {"parameters": 10}}
    assert first_difference(old, new) == "retrain.lr was 0.003, now 0.001"  # lr sorts before steps
    assert first_difference(old, old) is None
    assert first_difference({"a": 1}, {"a": 1, "b": None}) is None  # an absent key reads as None
    assert first_difference({"a": [1, 2]}, {"a": (1, 2)}) is None  # JSON's view: a tuple is a list
    assert first_difference({"x": 0.1 + 0.2}, {"x": 0.3}) is None  # floats through JSON and back
    assert first_difference({"x": 1}, {"x": 2}) == "x was 1, now 2"


def test_refuse_if_changed_names_the_change_and_the_fix_and_skips_unknowns():
    saved = {"teacher": "abc", "settings": {"k": 1}, "old_only": 5}
    refuse_if_changed("the cache", saved, {"teacher": "abc", "settings": {"k": 1}, "new_only": 7}, "rebuild it")
    refuse_if_changed("the cache", saved, {"teacher": None, "settings": {"k": 1}}, "rebuild it")  # not known yet: not compared
    with pytest.raises(MinitronError, match=r"^the cache was made from other inputs \(settings\.k was 1, now 2\): rebuild it$"):
        refuse_if_changed("the cache", saved, {"teacher": "abc", "settings": {"k": 2}}, "rebuild it")
    refuse_if_changed("the cache", saved, {"teacher": "xyz"}, "rebuild it", keys=())  # only the keys asked for


def test_signatures_follow_content(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("hello")
    first = data_signature(str(a))
    assert first == data_signature(str(a))
    a.write_text("hellp")  # same size, other content
    assert data_signature(str(a)) != first
    assert data_signature("shakespeare") == "shakespeare"  # a name, not a path
    assert file_sha256(a) == "fdd7585e08c4e2afd71dcabdb4636c89d557a3f42db9e2040c8bbd1708aa4ce7"  # sha256 of b"hellp", computed elsewhere
