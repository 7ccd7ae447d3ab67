"""lm-evaluation-harness on local upstream files: conversion, the generated task YAMLs, and the real teacher."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.converters import SUPPORTED
from minitron_nas.evaluate.quiet import offline
from minitron_nas.evaluate.tasks import (
    lm_eval_tasks_dir,
    prepare_task,
    prepare_tasks,
    task_manager,
)

# (task, split) -> records: the whole upstream files (see ../shared/data/MANIFEST.md)
COUNTS = {
    ("arc_easy", "test"): 2376,
    ("arc_easy", "validation"): 570,
    ("arc_challenge", "test"): 1172,
    ("arc_challenge", "validation"): 299,
    ("piqa", "validation"): 1838,
    ("winogrande", "validation"): 1267,
    ("lambada_openai", "test"): 5153,
    ("boolq", "validation"): 3270,
    ("wikitext", "test"): 62,  # articles of the WikiText-2 test split, as EleutherAI/wikitext_document_level
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lm_eval_cache")
    return {p.name: p for p in prepare_tasks(list(SUPPORTED), shared_data, cache_dir=cache)}


@pytest.fixture(scope="module")
def records(prepared):
    return {(name, split): read_jsonl(path) for name, p in prepared.items() for split, path in p.data_files.items()}


@pytest.fixture(scope="module")
def lm_eval_tasks(prepared):
    """lm-eval's own Task objects built from the generated YAMLs (no model)."""
    with offline():
        return task_manager(list(prepared.values())).load(list(SUPPORTED))["tasks"]


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_record_counts(records, task, split):
    assert len(records[task, split]) == COUNTS[task, split]


def test_arc_numeric_labels_keep_their_gold_answer(records, shared_data):
    test = records["arc_easy", "test"]
    numeric = [r for r in test if r["choices"]["label"][0] == "1"]
    assert len(numeric) == 97  # MANIFEST: 97 items labelled "1".."5" in ARC-Easy test
    by_id = {r["id"]: r for r in test + records["arc_challenge", "test"]}
    spot = {  # id -> (gold answer text, number of choices), read from the upstream files by hand
        "NYSEDREGENTS_2015_8_28": ("elements", 4),  # labels "1".."4", answerKey "2"
        "NYSEDREGENTS_2008_8_11": ("dead organisms", 4),  # Challenge, answerKey "4"
        "TIMSS_2003_4_pg35": ("oxygen", 5),  # five choices A..E
        "NYSEDREGENTS_2008_4_6": ("increase", 3),  # three choices
        "Mercury_417466": ("Sunlight is the source of energy for nearly all ecosystems.", 4),
    }
    for item_id, (answer, n) in spot.items():
        r = by_id[item_id]
        assert isinstance(r["question"], str) and len(r["choices"]["text"]) == n
        # lm-eval's arc_easy.yaml: doc_to_target "{{choices.label.index(answerKey)}}", doc_to_choice "{{choices.text}}"
        assert r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])] == answer
    upstream = [json.loads(line) for line in (shared_data / "arc" / "ARC-Easy-Test.jsonl").open()]
    for up, conv in zip(upstream, test):
        gold = [c["text"] for c in up["question"]["choices"] if c["label"] == up["answerKey"]]
        assert conv["choices"]["text"][conv["choices"]["label"].index(conv["answerKey"])] == gold[0]


def test_piqa_labels_come_from_the_labels_file(records, shared_data):
    piqa = records["piqa", "validation"]
    labels = (shared_data / "piqa" / "valid-labels.lst").read_text().split()
    assert [r["label"] for r in piqa] == [int(x) for x in labels]
    assert [r["label"] for r in piqa[:5]] == [0, 1, 1, 1, 0]
    assert piqa[0]["goal"] == "How do I ready a guinea pig cage for it's new occupants?"
    assert "ripped paper strips" in piqa[0]["sol1"] and set(piqa[0]) == {"goal", "sol1", "sol2", "label"}


def test_winogrande_answers_match_the_dev_labels(records, shared_data):
    wino = records["winogrande", "validation"]
    labels = (shared_data / "winogrande" / "dev-labels.lst").read_text().split()
    assert [r["answer"] for r in wino] == labels  # strings "1"/"2", as allenai/winogrande
    assert wino[0]["sentence"].startswith("Sarah was a much better surgeon than Maria so _") and wino[0]["answer"] == "2"
    assert set(wino[0]) == {"sentence", "option1", "option2", "answer"}


def test_boolq_labels_are_ints(records):
    boolq = records["boolq", "validation"]
    assert sorted({r["label"] for r in boolq}) == [0, 1]
    assert sum(r["label"] for r in boolq) == 2033  # 'true' items of SuperGLUE BoolQ validation
    assert boolq[0]["question"] == "does ethanol take more energy make that produces" and boolq[0]["label"] == 0
    assert boolq[1]["question"] == "is house tax and property tax are same" and boolq[1]["label"] == 1


def test_lambada_text_is_unchanged(records, shared_data):
    upstream = [json.loads(line)["text"] for line in (shared_data / "lambada" / "lambada_test.jsonl").open()]
    assert [r["text"] for r in records["lambada_openai", "test"]] == upstream


def test_wikitext_pages_restore_the_original_layout(records, shared_data):
    pages = [r["page"] for r in records["wikitext", "test"]]
    assert pages[0].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film")
    assert pages[1].startswith(" = Du Fu = \n")
    assert not any("\r" in p for p in pages)
    # every raw line, in order, and the tokenized file's line layout (blank lines included)
    raw = [line for line in (shared_data / "wikitext2_raw" / "wiki.test.raw").read_bytes().decode().splitlines() if line.strip()]
    text = "\n".join(pages)
    assert [line for line in text.split("\n") if line.strip()] == raw
    layout = (shared_data / "wikitext2" / "test.txt").read_text().split("\n")
    assert [not line.strip() for line in text.split("\n")] == [not line.strip() for line in layout[1:]]
    assert sum(len(p.split()) for p in pages) == 245569 - 4358  # MANIFEST's tokens less one <eos> per line


# --------------------------------------------------------------------------- generated YAMLs, read by lm-eval itself


def test_yaml_includes_the_builtin_task(prepared):
    p = prepared["arc_challenge"]
    text = p.yaml.read_text()
    assert f"include: {lm_eval_tasks_dir() / 'arc' / 'arc_challenge.yaml'}" in text
    for line in ("task: arc_challenge", "dataset_path: json", "dataset_name: null", "test_split: test", "training_split: null"):
        assert line in text.splitlines(), text
    assert "doc_to_text" not in text  # prompts stay lm-eval's


# the split lm-eval's published numbers use; ARC's validation split only feeds few-shot examples
EVAL_SPLIT = {
    "arc_easy": "test",
    "arc_challenge": "test",
    "piqa": "validation",
    "winogrande": "validation",
    "lambada_openai": "test",
    "boolq": "validation",
    "wikitext": "test",
}


@pytest.mark.parametrize("task", SUPPORTED)
def test_lm_eval_scores_the_right_split(lm_eval_tasks, prepared, task):
    assert prepared[task].eval_split == EVAL_SPLIT[task]
    assert len(lm_eval_tasks[task].eval_docs) == COUNTS[task, EVAL_SPLIT[task]]


def test_lm_eval_reads_prompts_and_gold_answers(lm_eval_tasks):
    def gold(task, doc):
        t = lm_eval_tasks[task]
        return t.doc_to_choice(doc)[t.doc_to_target(doc)]

    arc = lm_eval_tasks["arc_easy"]
    doc = next(d for d in arc.eval_docs if d["id"] == "NYSEDREGENTS_2015_8_28")
    assert arc.doc_to_text(doc) == "Question: All living and nonliving material is composed of\nAnswer:"
    assert gold("arc_easy", doc) == "elements"
    assert gold("arc_challenge", lm_eval_tasks["arc_challenge"].eval_docs[0]) == "Planetary days will become shorter."

    piqa = lm_eval_tasks["piqa"].eval_docs
    assert "ripped paper strips" in gold("piqa", piqa[0]) and gold("piqa", piqa[1]) == piqa[1]["sol2"]  # labels 0, 1
    boolq = lm_eval_tasks["boolq"]
    assert [gold("boolq", boolq.eval_docs[i]) for i in range(2)] == ["no", "yes"]
    assert boolq.doc_to_text(boolq.eval_docs[0]).endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    wino = lm_eval_tasks["winogrande"]
    doc = wino.eval_docs[0]
    assert wino.doc_to_choice(doc)[wino.doc_to_text(doc)] == "Sarah was a much better surgeon than Maria so Maria"

    lamb = lm_eval_tasks["lambada_openai"]
    doc = lamb.eval_docs[0]
    assert (lamb.doc_to_text(doc) + lamb.doc_to_target(doc)).split() == doc["text"].split()
    wiki = lm_eval_tasks["wikitext"]
    assert wiki.doc_to_target(wiki.eval_docs[0]).startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")


# --------------------------------------------------------------------------- cache and errors


def test_cache_is_reused_and_keyed_by_content(shared_data, tmp_path):
    data = tmp_path / "data" / "piqa"
    data.mkdir(parents=True)
    for name in ("valid.jsonl", "valid-labels.lst"):
        shutil.copy(shared_data / "piqa" / name, data / name)
    cache = tmp_path / "cache"
    first = prepare_task("piqa", data.parent, cache)
    stamp = first.data_files["validation"].stat().st_mtime_ns
    again = prepare_task("piqa", data.parent, cache)
    assert again.folder == first.folder and again.data_files["validation"].stat().st_mtime_ns == stamp
    labels = data / "valid-labels.lst"
    labels.write_text("1\n" + labels.read_text().split("\n", 1)[1])  # flip the first gold label
    changed = prepare_task("piqa", data.parent, cache)
    assert changed.folder != first.folder
    assert read_jsonl(changed.data_files["validation"])[0]["label"] == 1
    assert read_jsonl(first.data_files["validation"])[0]["label"] == 0
    assert not any(".partial-" in p.name for p in cache.iterdir())


def test_unknown_task_is_one_line_error(shared_data, tmp_path):
    with pytest.raises(MinitronError) as err:
        prepare_tasks(["arc_easy", "hellaswag"], shared_data, tmp_path)
    message = str(err.value)
    assert "'hellaswag'" in message and "\n" not in message
    for name in SUPPORTED:
        assert name in message


def test_missing_data_is_one_line_error(shared_data, tmp_path):
    with pytest.raises(MinitronError, match="data folder .*nowhere.* not found"):
        prepare_tasks("piqa", tmp_path / "nowhere", tmp_path)
    partial = tmp_path / "partial"
    (partial / "piqa").mkdir(parents=True)
    shutil.copy(shared_data / "piqa" / "valid.jsonl", partial / "piqa" / "valid.jsonl")
    with pytest.raises(MinitronError) as err:
        prepare_tasks("piqa", partial, tmp_path)
    assert str(partial / "piqa" / "valid-labels.lst") in str(err.value) and "\n" not in str(err.value)
    (partial / "piqa" / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(MinitronError, match="2 labels for 1838 records"):
        prepare_tasks("piqa", partial, tmp_path)


def test_cli_evaluate_errors_are_one_line(shared_data, tmp_path):
    from typer.testing import CliRunner

    from minitron_nas.cli.app import app

    for args, fragment in (
        (["--tasks", "arc_easy,nope", "--data-dir", str(shared_data)], "unknown lm-eval task 'nope'"),
        (["--tasks", "piqa", "--data-dir", str(tmp_path / "missing")], "not found"),
        (["--tasks", "piqa", "--data-dir", str(shared_data), "--num-fewshot", "piqa=x"], "is not a number"),
        (["--tasks", "piqa", "--data-dir", str(shared_data), "--limit", "arc_easy=3"], "--limit names 'arc_easy'"),
    ):
        result = CliRunner().invoke(app, ["evaluate", *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output


def test_offline_sets_and_restores_the_flags(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.is_offline_mode() and datasets.config.HF_HUB_OFFLINE
    assert "HF_HUB_OFFLINE" not in os.environ
    assert not huggingface_hub.constants.is_offline_mode() and not datasets.config.HF_HUB_OFFLINE


def test_metric_names_keep_the_filter_only_where_a_metric_has_several():
    from minitron_nas.evaluate.harness import _clean

    row = {
        "alias": "gsm8k",
        "sample_len": 4,
        "exact_match,strict-match": 0.25,
        "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": 0.5,
        "exact_match_stderr,flexible-extract": "N/A",
        "acc,none": 0.5,
        "acc_stderr,none": 0.2,
    }
    metrics, base = _clean(row)
    assert metrics == {
        "exact_match,strict-match": 0.25,
        "exact_match,strict-match_stderr": 0.1,
        "exact_match,flexible-extract": 0.5,
        "exact_match,flexible-extract_stderr": None,
        "acc": 0.5,
        "acc_stderr": 0.2,
    }
    assert base["exact_match,strict-match"] == "exact_match" and base["acc"] == "acc"


# --------------------------------------------------------------------------- the real teacher


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open an internet connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    real_getaddrinfo = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host not in (None, "localhost", "127.0.0.1", "::1"):
            raise AssertionError(f"network lookup attempted: {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setattr(socket, "getaddrinfo", resolve)


def tiny_tokenizer(shared_data: Path):
    """A 512-token byte-level BPE trained on the spot: no download, no teacher files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text().split("\n")[:5000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"], initial_alphabet=alphabet, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def test_lm_eval_scores_on_an_in_memory_model(shared_data, no_network):
    """The whole path (HFLM around the live model, generated tasks, few-shot) on a tiny random model."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from minitron_nas.evaluate.harness import lm_eval_scores

    tokenizer = tiny_tokenizer(shared_data)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config).train()
    rng = torch.random.get_rng_state()
    # LAMBADA draws its few-shot examples from its test split, which is here; the others stay zero-shot
    scores = lm_eval_scores(model, tokenizer, ["piqa", "arc_easy", "lambada_openai", "wikitext"], shared_data, limit=3, num_fewshot={"lambada_openai": 2})
    assert model.training and torch.equal(rng, torch.random.get_rng_state())
    assert list(scores) == ["piqa", "arc_easy", "lambada_openai", "wikitext"]
    with_se = lambda *names: {n + s for n in names for s in ("", "_stderr")}
    assert set(scores["piqa"]) == with_se("acc", "acc_norm") and set(scores["lambada_openai"]) == with_se("acc", "perplexity")
    assert set(scores["wikitext"]) == with_se("word_perplexity", "byte_perplexity", "bits_per_byte")
    for metrics in scores.values():
        for name, value in metrics.items():
            if name.endswith("_stderr"):
                # closed form for accuracies (sample stddev / sqrt(n)); perplexities have none without a bootstrap
                acc = metrics[name[: -len("_stderr")]]
                assert (value is None) == ("perplexity" in name or "bits" in name)
                assert value is None or value == pytest.approx(math.sqrt(acc * (1 - acc) * 3 / 2 / 3))
            else:
                assert math.isfinite(value) and (not name.startswith("acc") or value in (0, 1 / 3, 2 / 3, 1))
    # random weights: hopeless at language modelling (the teacher: ~60 and ~0.84)
    assert scores["lambada_openai"]["perplexity"] > 1000 and scores["wikitext"]["bits_per_byte"] > 2


def test_cli_evaluate_prints_scores(shared_data, tmp_path, no_network):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from typer.testing import CliRunner

    from minitron_nas.cli.app import app

    tokenizer = tiny_tokenizer(shared_data)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    args = ["evaluate", "--model", str(tmp_path / "tiny"), "--tasks", "winogrande,boolq", "--data-dir", str(shared_data), "--limit", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["limit"] == 2 and list(out["scores"]) == ["winogrande", "boolq"]
    assert out["scores"]["winogrande"]["acc"] in (0, 0.5, 1) and out["scores"]["boolq"]["acc"] in (0, 0.5, 1)


def test_lm_eval_scores_refuses_bad_limits(shared_data):
    from minitron_nas.evaluate.harness import lm_eval_scores

    for limit in (0, 0.5, -3):
        with pytest.raises(MinitronError, match="limit must be a whole number >= 1"):
            lm_eval_scores(None, None, ["piqa"], shared_data, limit=limit)


MC_LIMIT = 40  # documents per multiple-choice task (the first ones of each file)
BOOLQ_LIMIT = 20  # long passages: the dearest task per document
WIKITEXT_LIMIT = 1  # one article (Robert Boulter, 1.4k tokens); the next one is 5.3k


def assert_accuracies(metrics: dict[str, float], limit: int) -> None:
    for name, value in metrics.items():
        if name.startswith("acc") and not name.endswith("_stderr"):  # a count of right answers out of `limit`
            assert 0.0 <= value <= 1.0 and value * limit == pytest.approx(round(value * limit)), (name, value)
            # lm-eval's closed-form standard error of a mean of 0/1 values: sqrt(p (1 - p) / (n - 1))
            assert metrics[name + "_stderr"] == pytest.approx(math.sqrt(value * (1 - value) / (limit - 1))), name


@pytest.mark.teacher
def test_teacher_scores(shared_data, no_network):
    from minitron_nas.evaluate.harness import lm_eval_scores
    from minitron_nas.model.teachers import load_teacher

    teacher = load_teacher("smollm2-135m")
    model, tokenizer = teacher.model, teacher.tokenizer
    model.train()  # lm-eval puts it in eval mode; lm_eval_scores must give it back as it was
    rng = torch.random.get_rng_state()

    scores = lm_eval_scores(model, tokenizer, ["arc_easy", "piqa", "winogrande", "lambada_openai"], shared_data, limit=MC_LIMIT)
    for metrics in scores.values():
        assert_accuracies(metrics, MC_LIMIT)
    scores |= lm_eval_scores(model, tokenizer, ["boolq"], shared_data, limit=BOOLQ_LIMIT)
    assert_accuracies(scores["boolq"], BOOLQ_LIMIT)
    scores |= lm_eval_scores(model, tokenizer, ["wikitext"], shared_data, limit=WIKITEXT_LIMIT)
    print(json.dumps(scores, indent=1))
    assert model.training and torch.equal(rng, torch.random.get_rng_state())

    assert set(scores["arc_easy"]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert set(scores["lambada_openai"]) == {"acc", "perplexity", "acc_stderr", "perplexity_stderr"}
    # The teacher beats chance by more than two of lm-eval's own standard errors (4 answers in ARC-Easy,
    # 2 in PIQA; a LAMBADA word is never right by chance). winogrande and boolq: 135M models score near
    # chance / below the majority class, so they have no such oracle.
    for task, chance in (("arc_easy", 0.25), ("piqa", 0.5), ("lambada_openai", 0.0)):
        assert scores[task]["acc"] - 2 * scores[task]["acc_stderr"] > chance, (task, scores[task])
    wiki = scores["wikitext"]
    # A measured range must stay for perplexities (no closed-form chance level short of the vocabulary):
    # measured lambada ppl 58.7, wikitext word ppl 20.8 / 0.844 bits per byte; random weights give thousands.
    assert scores["lambada_openai"]["perplexity"] < 100
    assert 10 < wiki["word_perplexity"] < 40 and 0.7 < wiki["bits_per_byte"] < 1.0
    assert wiki["byte_perplexity"] == pytest.approx(2 ** wiki["bits_per_byte"])
