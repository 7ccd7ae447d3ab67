"""lm-eval as its users know it: any task by name, their own task YAMLs, few-shot, objectives, a quiet console."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import byte_tokenizer, tiny_model
from typer.testing import CliRunner

from minitron_nas.config.space import ScoringSettings
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.harness import Scores, check_lm_eval, lm_eval_evaluate
from minitron_nas.evaluate.objective import lm_eval_higher_is_better, lm_eval_objective
from minitron_nas.search.candidates import load_space

REPO = Path(__file__).resolve().parents[2]

# a multiple-choice task none of our converters knows: its data exists only in this file
CAPITALS = [
    ("France", "Paris", ["Paris", "Lyon", "Nice"]),
    ("Italy", "Rome", ["Milan", "Rome", "Turin"]),
    ("Spain", "Madrid", ["Seville", "Valencia", "Madrid"]),
    ("Japan", "Tokyo", ["Tokyo", "Osaka", "Kyoto"]),
    ("Canada", "Ottawa", ["Toronto", "Ottawa", "Montreal"]),
    ("Kenya", "Nairobi", ["Mombasa", "Kisumu", "Nairobi"]),
    ("Peru", "Lima", ["Lima", "Cusco", "Arequipa"]),
    ("Egypt", "Cairo", ["Giza", "Cairo", "Luxor"]),
]


def user_tasks(folder: Path, shared_data: Path) -> Path:
    """Two task YAMLs in lm-eval's own format over local files: multiple choice, and rolling perplexity."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps({"country": c, "choices": ch, "answer": ch.index(a)}) + "\n" for c, a, ch in CAPITALS))
    (folder / "capitals.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "my_capitals",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "test_split": "test",
                "output_type": "multiple_choice",
                "doc_to_text": "The capital of {{country}} is",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "{{answer}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    (folder / "bard.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "my_bard",
                "dataset_path": "text",
                "dataset_kwargs": {"data_files": {"test": str(shared_data / "tinyshakespeare" / "input.txt")}},
                "test_split": "test",
                "output_type": "loglikelihood_rolling",
                "doc_to_text": "",
                "doc_to_target": "{{text}}",
                "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
            }
        )
    )
    return folder


def byte_model(seed: int = 0):
    return tiny_model("llama", seed=seed, vocab_size=257, max_position_embeddings=512)


@torch.no_grad()
def choice_loglikelihood(model, context: str, continuation: str) -> float:
    """log p(continuation | context) by hand: with the byte tokenizer a token is a UTF-8 byte."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    ids = torch.tensor([ctx + cont])
    logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.float(), -1)[0]
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


# --------------------------------------------------------------------------- a user's own task files


def test_user_task_yaml_in_include_path_gets_lm_eval_s_number(tmp_path, shared_data):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = user_tasks(tmp_path / "my_tasks", shared_data)
    tokenizer, model = byte_tokenizer(), byte_model()
    spec = ScoringSettings(
        metric="lm_eval", tasks=("my_capitals", "my_bard"), include_path=(str(folder),), limit={"my_bard": 6}, batch_size=4, objective="my_bard/bits_per_byte"
    )
    assert check_lm_eval(spec) is spec
    scores, output = lm_eval_evaluate(model, tokenizer, spec)

    # oracle 1: lm-eval called directly on the same model (its default bootstrap_iters: real stderrs)
    direct = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=["my_capitals"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
    )["results"]["my_capitals"]
    assert scores["my_capitals"]["acc"] == pytest.approx(direct["acc,none"])
    assert scores["my_capitals"]["acc_stderr"] == pytest.approx(direct["acc_stderr,none"])
    bard = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
        tasks=["my_bard"],
        limit=6,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
    )["results"]["my_bard"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert scores["my_bard"][metric] == pytest.approx(bard[f"{metric},none"]) and scores["my_bard"][f"{metric}_stderr"] is None

    # oracle 2: the accuracy recomputed by hand from the model's log-probabilities
    right = []
    for country, answer, choices in CAPITALS:
        lls = [choice_loglikelihood(model, f"The capital of {country} is", " " + c) for c in choices]
        right.append(float(choices[max(range(len(choices)), key=lls.__getitem__)] == answer))
    assert [s["acc"] for s in output["samples"]["my_capitals"]] == right
    assert scores["my_capitals"]["acc"] == pytest.approx(sum(right) / len(right))
    n, p = len(right), sum(right) / len(right)
    assert scores["my_capitals"]["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))

    # the objective: the task's own direction (bits per byte: lower is better)
    assert lm_eval_objective(scores, spec) == (scores["my_bard"]["bits_per_byte"], None, False)
    assert len(output["samples"]["my_bard"]) == 6  # per-task limit; my_capitals scored whole
    assert len(output["samples"]["my_capitals"]) == len(CAPITALS)


def test_user_group_and_tag_aggregate_as_lm_eval_does(tmp_path, shared_data):
    """A group's row and its stderr (pooled over members by lm-eval's Group.aggregate); a tag expands to its members."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = user_tasks(tmp_path / "my_tasks", shared_data)
    capitals = yaml.safe_load((folder / "capitals.yaml").read_text())
    (folder / "capitals_q.yaml").write_text(
        yaml.safe_dump({**capitals, "task": "my_capitals_q", "tag": ["my_tag"], "doc_to_text": "Q: What is the capital of {{country}}?\nA:"})
    )
    (folder / "capitals.yaml").write_text(yaml.safe_dump({**capitals, "tag": ["my_tag"]}))
    (folder / "group.yaml").write_text(
        yaml.safe_dump(
            {
                "group": "my_group",
                "task": ["my_capitals", "my_capitals_q"],
                "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
            }
        )
    )
    tokenizer, model = byte_tokenizer(), byte_model(seed=1)
    group = ScoringSettings(metric="lm_eval", tasks=("my_group",), include_path=(str(folder),), limit={"my_group": 6})
    scores = lm_eval_evaluate(model, tokenizer, group)[0]
    assert list(scores) == ["my_group", "my_capitals", "my_capitals_q"] and scores.members == {"my_group": ["my_capitals", "my_capitals_q"]}
    direct = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer),
        tasks=["my_group"],
        limit=6,
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
    )["results"]
    for name in scores:
        assert scores[name]["acc"] == pytest.approx(direct[name]["acc,none"])
        assert scores[name]["acc_stderr"] == pytest.approx(direct[name]["acc_stderr,none"])
    assert lm_eval_objective(scores, group)[:2] == (pytest.approx(scores["my_group"]["acc"]), pytest.approx(scores["my_group"]["acc_stderr"]))

    tag = ScoringSettings(metric="lm_eval", tasks=("my_tag",), include_path=(str(folder),), limit=6)
    by_tag = lm_eval_evaluate(model, tokenizer, tag)[0]
    assert set(by_tag) == {"my_capitals", "my_capitals_q"}
    value, se, up = lm_eval_objective(by_tag, tag)  # the mean over the tag's members
    assert value == pytest.approx((scores["my_capitals"]["acc"] + scores["my_capitals_q"]["acc"]) / 2) and up


def test_a_hub_task_not_in_the_cache_fails_in_one_line_when_offline(tmp_path, monkeypatch):
    import datasets.config

    from minitron_nas.evaluate.quiet import offline

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")  # whatever this machine has cached
    with offline(), pytest.raises(MinitronError) as err:
        lm_eval_evaluate(byte_model(), byte_tokenizer(), ScoringSettings(metric="lm_eval", tasks=("hellaswag",), limit=2))
    message = str(err.value)
    assert message.startswith("lm-eval could not load task 'hellaswag' (") and "\n" not in message
    assert "Hugging Face Hub or in the local cache" in message


def test_include_path_must_exist(tmp_path):
    with pytest.raises(MinitronError, match=r"include_path '.*nowhere' not found: give a folder or YAML file"):
        check_lm_eval(ScoringSettings(metric="lm_eval", tasks=("my_task",), include_path=(str(tmp_path / "nowhere"),)))


# --------------------------------------------------------------------------- few-shot


def arc_data_with_training_file(shared_data: Path, root: Path) -> tuple[Path, list[dict]]:
    """ARC-Easy's test and dev files, and real ARC records (the Challenge dev set) standing in for its training file."""
    arc = root / "arc"
    arc.mkdir(parents=True)
    for name in ("ARC-Easy-Test.jsonl", "ARC-Easy-Dev.jsonl"):
        (arc / name).symlink_to(shared_data / "arc" / name)
    train = shared_data / "arc" / "ARC-Challenge-Dev.jsonl"
    (arc / "ARC-Easy-Train.jsonl").write_bytes(train.read_bytes())
    return root, [json.loads(line) for line in train.read_text().splitlines() if line.strip()]


def test_five_shot_arc_easy_prompts_hold_five_training_examples(shared_data, tmp_path):
    data, train = arc_data_with_training_file(shared_data, tmp_path / "data")
    gold = {r["question"]["stem"]: next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"]) for r in train}
    easy_dev = {json.loads(line)["question"]["stem"] for line in (shared_data / "arc" / "ARC-Easy-Dev.jsonl").open()}
    spec = ScoringSettings(metric="lm_eval", tasks=("arc_easy",), data_dir=str(data), num_fewshot=5, limit=3, batch_size=8)
    scores, output = lm_eval_evaluate(byte_model(), byte_tokenizer(), spec)
    samples = output["samples"]["arc_easy"]
    assert len(samples) == 3 and output["configs"]["arc_easy"]["num_fewshot"] == 5
    for sample in samples:
        contexts = {context for context, _ in sample["arguments"]}
        assert len(contexts) == 1  # one prompt, scored against every choice
        blocks = contexts.pop().split("\n\n")  # lm-eval's few-shot delimiter
        assert len(blocks) == 6 and blocks[-1] == f"Question: {sample['doc']['question']}\nAnswer:"
        for block in blocks[:5]:
            question, answer = block.removeprefix("Question: ").split("\nAnswer: ")
            assert gold[question] == answer  # from the training file, with its gold answer
            assert question not in easy_dev  # not from the validation split
    assert 0 <= scores["arc_easy"]["acc"] <= 1


def test_few_shot_without_the_training_file_is_refused_before_scoring(shared_data):
    for shots in (5, {"arc_easy": 2}):
        with pytest.raises(MinitronError) as err:
            check_lm_eval(ScoringSettings(metric="lm_eval", tasks=("arc_easy", "piqa"), data_dir=str(shared_data), num_fewshot=shots))
        message = str(err.value)
        assert "arc_easy draws its few-shot examples from its train split" in message and "ARC-Easy-Train.jsonl" in message
        assert "\n" not in message
    # zero-shot, and LAMBADA (few-shot from its test split), need nothing more
    spec = ScoringSettings(metric="lm_eval", tasks=("arc_easy", "lambada_openai"), data_dir=str(shared_data), num_fewshot={"lambada_openai": 3})
    assert check_lm_eval(spec) is spec


# --------------------------------------------------------------------------- names and spaces refused before weights load


@pytest.fixture
def no_teacher(monkeypatch):
    """Loading any teacher fails the test: errors must come first."""
    import minitron_nas.model.teachers

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the error")

    monkeypatch.setattr(minitron_nas.model.teachers, "load_teacher", refuse)


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_unknown_task_names_fail_in_one_line_with_suggestions(no_teacher):
    from minitron_nas.cli.app import app

    line = one_error_line(CliRunner().invoke(app, ["evaluate", "--tasks", "arc_easy,hellaswg", "--limit", "2"]))
    assert "unknown lm-eval task 'hellaswg'" in line and "did you mean hellaswag" in line and line.endswith("with --include-path")
    line = one_error_line(CliRunner().invoke(app, ["evaluate", "--tasks", "mmlu_astronomyy"]))
    assert "did you mean mmlu_astronomy" in line
    # a real lm-eval task outside our converters is accepted by name (it is loaded from the Hub or the cache)
    spec = ScoringSettings(metric="lm_eval", tasks=("hellaswag", "mmlu_astronomy"))
    assert check_lm_eval(spec) is spec


def write_space(tmp_path: Path, scoring: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({"teacher": "smollm2-135m", "axes": {"num_hidden_layers": [20, 24]}, "budget": {"parameters": 100_000_000}, "scoring": scoring})
    )
    return path


@pytest.mark.parametrize(
    "scoring, fragments",
    [
        (
            {"metric": "lm_eval", "tasks": ["arc_easy"], "data_dir": "/no/such/data"},
            ("scoring.data_dir '/no/such/data' not found", "drop scoring.data_dir", "scoring.tasks_optional: true"),
        ),
        ({"metric": "lm_eval", "tasks": ["arc_easy", "pica"], "data_dir": "SHARED"}, ("unknown lm-eval task 'pica' (did you mean", " piqa,")),
        ({"metric": "lm_eval", "tasks": ["arc_easy"], "num_fewshot": {"piqa": 2}}, ("scoring.num_fewshot names 'piqa'",)),
        ({"metric": "lm_eval", "tasks": ["arc_easy"], "limit": 0}, ("scoring.limit is 0: give a positive whole number",)),
        ({"metric": "lm_eval", "tasks": ["arc_easy"], "objective": "arc_easy"}, ("is not 'task/metric'",)),
        (
            {"metric": "lm_eval", "tasks": ["arc_easy"], "objective": "arc_easy/accuracy"},
            ("scoring.objective names metric 'accuracy' of arc_easy, which reports acc, acc_norm",),
        ),
        ({"metric": "lm_eval", "tasks": ["arc_easy"], "objective": "piqa/acc"}, ("scoring.objective names task 'piqa', which is not in tasks",)),
        (
            {"metric": "lm_eval", "tasks": ["arc_easy", "wikitext"], "objective": {"arc_easy/acc": 1, "wikitext/word_perplexity": 1}},
            ("mixes metrics that improve upwards and downwards",),
        ),
    ],
)
def test_spaces_whose_scoring_cannot_work_are_refused_before_the_teacher_loads(tmp_path, shared_data, no_teacher, scoring, fragments):
    from minitron_nas.cli.app import app

    if scoring.get("data_dir") == "SHARED":
        scoring["data_dir"] = str(shared_data)
    path = write_space(tmp_path, scoring)
    with pytest.raises(MinitronError) as err:
        load_space(path)
    for fragment in fragments:
        assert fragment in str(err.value)
    line = one_error_line(CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "run")]))
    assert all(fragment in line for fragment in fragments)
    assert not (tmp_path / "run").exists()


def test_optional_tasks_fall_back_to_kld_in_one_line(tmp_path, shared_data, caplog):
    missing = {"metric": "lm_eval", "tasks": ["arc_easy", "piqa"], "limit": 40, "data_dir": str(tmp_path / "absent"), "tasks_optional": True}
    with caplog.at_level(logging.WARNING, logger="minitron_nas"):
        space = load_space(write_space(tmp_path, missing))
    assert space.scoring.metric == "kld" and space.scoring.tasks == ("arc_easy", "piqa")
    notes = [r.getMessage() for r in caplog.records if r.name == "minitron_nas"]
    assert len(notes) == 1 and "scoring on held-out KL divergence" in notes[0] and str(tmp_path / "absent") in notes[0]
    caplog.clear()
    present = load_space(write_space(tmp_path, {**missing, "data_dir": str(shared_data)}))
    assert present.scoring.metric == "lm_eval" and not caplog.records


# --------------------------------------------------------------------------- objectives


def scores(**rows) -> Scores:
    return Scores(rows, higher_is_better={t: {m: not m.endswith("perplexity") for m in r if not m.endswith("_stderr")} for t, r in rows.items()})


def test_objective_weighted_mean_and_its_standard_error():
    results = scores(
        arc_easy={"acc": 0.6, "acc_stderr": 0.03, "acc_norm": 0.5, "acc_norm_stderr": 0.04},
        piqa={"acc": 0.7, "acc_stderr": 0.02, "acc_norm": 0.65, "acc_norm_stderr": 0.01},
        wikitext={"word_perplexity": 30.0, "word_perplexity_stderr": None},
    )
    default = ScoringSettings(metric="lm_eval", tasks=("arc_easy", "piqa"))
    value, se, up = lm_eval_objective(results, default)
    assert (value, up) == (pytest.approx(0.575), True) and se == pytest.approx(math.sqrt(0.04**2 + 0.01**2) / 2)
    weighted = ScoringSettings(metric="lm_eval", tasks=("arc_easy", "piqa"), objective={"arc_easy/acc": 3, "piqa/acc_norm": 1})
    value, se, up = lm_eval_objective(results, weighted)
    assert value == pytest.approx((3 * 0.6 + 0.65) / 4) and se == pytest.approx(math.sqrt(9 * 0.03**2 + 0.01**2) / 4) and up
    ppl = ScoringSettings(metric="lm_eval", tasks=("wikitext",), objective="wikitext/word_perplexity")
    assert lm_eval_objective(results, ppl) == (30.0, None, False) and lm_eval_higher_is_better(ppl) is False
    with pytest.raises(MinitronError, match="metric 'acc_nrm' of arc_easy, which reports acc, acc_norm"):
        lm_eval_objective(results, ScoringSettings(metric="lm_eval", tasks=("arc_easy",), objective="arc_easy/acc_nrm"))
    with pytest.raises(MinitronError, match="report no acc or acc_norm"):
        lm_eval_objective(results, ScoringSettings(metric="lm_eval", tasks=("wikitext",)))


def test_objective_direction_comes_from_the_task():
    # a task may declare its own direction for a metric; lm-eval's results carry it
    results = Scores({"t": {"acc": 0.2, "acc_stderr": 0.1}}, higher_is_better={"t": {"acc": False}})
    assert lm_eval_objective(results, ScoringSettings(metric="lm_eval", tasks=("t",), objective="t/acc"))[2] is False


# --------------------------------------------------------------------------- a quiet console


def saved_tiny_model(folder: Path) -> Path:
    model = byte_model()
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    env.pop("LMEVAL_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "minitron_nas.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def test_evaluate_console_holds_no_lm_eval_noise(shared_data, tmp_path):
    model = saved_tiny_model(tmp_path / "tiny")
    # LAMBADA few-shot (drawn from its test split) and a model object instead of a name both make lm-eval warn
    args = [
        "evaluate",
        "--model",
        str(model),
        "--tasks",
        "lambada_openai,arc_easy",
        "--data-dir",
        str(shared_data),
        "--limit",
        "2",
        "--num-fewshot",
        "lambada_openai=1",
    ]
    quiet = run_cli(*args)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = json.loads(quiet.stdout)
    assert list(out["scores"]) == ["lambada_openai", "arc_easy"] and out["num_fewshot"] == {"lambada_openai": 1}
    lines = [line for line in quiet.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(r"lm-eval lambada_openai \(1-shot\), arc_easy: [1-9]\d* forward passes in [\d.]+ s", lines[0]), quiet.stderr

    loud = run_cli("--verbose", *args)
    assert loud.returncode == 0, loud.stderr[-3000:]
    # what the quiet run folded away: lm-eval's warnings and its per-request bars
    assert "WARNING" in loud.stderr and "Running loglikelihood requests" in loud.stderr and len(loud.stderr.splitlines()) > 3
    assert json.loads(loud.stdout)["scores"] == out["scores"]


def test_evaluate_scores_a_user_task_from_include_path(shared_data, tmp_path):
    from minitron_nas.cli.app import app

    folder = user_tasks(tmp_path / "my_tasks", shared_data)
    model = saved_tiny_model(tmp_path / "tiny")
    args = [
        "evaluate",
        "--model",
        str(model),
        "--tasks",
        "my_capitals,my_bard",
        "--include-path",
        str(folder),
        "--limit",
        "my_bard=3",
        "--objective",
        "my_capitals/acc",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["limit"] == {"my_bard": 3} and set(out["scores"]) == {"my_capitals", "my_bard"}
    objective = out["objective"]
    assert objective["value"] == out["scores"]["my_capitals"]["acc"] and objective["stderr"] == out["scores"]["my_capitals"]["acc_stderr"]
    assert objective["higher_is_better"] is True and out["scores"]["my_bard"]["bits_per_byte"] > 0
    line = one_error_line(CliRunner().invoke(app, ["evaluate", "--tasks", "my_capitals", "--include-path", str(tmp_path / "none")]))
    assert f"--include-path '{tmp_path / 'none'}' not found" in line
