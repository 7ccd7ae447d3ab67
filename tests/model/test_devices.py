"""One device and dtype for every stage, checked without a GPU.

Two stand-ins for a GPU: the `lazy` device of torch's TorchScript backend (a real second
device on a CPU-only build: an op mixing a host tensor and a lazy tensor raises, exactly as
CPU and CUDA tensors do), and a mocked `torch.cuda` for the loading path.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import byte_tokenizer, random_blocks, tiny_model
from typer.testing import CliRunner

from minitron_nas.cli.app import app
from minitron_nas.config.settings import RankSettings, RetrainSettings
from minitron_nas.config.space import DeviceSettings
from minitron_nas.distill.signals import CachedTopK
from minitron_nas.distill.teacher_cache import TeacherLogitCache
from minitron_nas.distill.trainer import _evaluate, make_accelerator
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.model import devices, teachers
from minitron_nas.model.architecture import Architecture
from minitron_nas.model.devices import Placement, check_fits, placement, to_model_device
from minitron_nas.model.saving import save_model
from minitron_nas.prune.pruning import prune
from minitron_nas.prune.ranking import compute_rankings, rank
from minitron_nas.recipes.distill import heldout_metrics
from minitron_nas.recipes.prune import prune_to
from minitron_nas.search.candidates import load_space

REPO = Path(__file__).resolve().parents[2]
GIB = 2**30


@pytest.fixture(scope="module")
def lazy():
    """torch's lazy device: tensors live apart from the host's, so a missing move raises."""
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy")


def fake_gpu(monkeypatch, count: int = 2, free: int = 80 * GIB, bf16: bool = True) -> None:
    """A machine that reports `count` CUDA GPUs with `free` bytes free each."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 2 * free))
    monkeypatch.delenv("LOCAL_RANK", raising=False)


# --------------------------------------------------------------------------- the choice


def test_defaults_are_cpu_float32_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement() == Placement(torch.device("cpu"), torch.float32)
    assert placement("cpu", "bf16") == Placement(torch.device("cpu"), torch.bfloat16)


def test_defaults_are_cuda_bfloat16_with_a_gpu(monkeypatch):
    fake_gpu(monkeypatch)
    assert placement() == Placement(torch.device("cuda", 0), torch.bfloat16)
    assert placement("cuda:1", "float32") == Placement(torch.device("cuda", 1), torch.float32)
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process of `accelerate launch` takes its own GPU
    assert placement().device == torch.device("cuda", 1)
    fake_gpu(monkeypatch, bf16=False)
    assert placement().dtype == torch.float16


@pytest.mark.parametrize(
    ("device", "dtype", "fragment"),
    [("gpu", "auto", "device 'gpu' is not understood"), ("cpu", "float8", "dtype 'float8' is not understood"), ("cuda:2", "auto", "cuda:0..cuda:1")],
)
def test_bad_choices_are_refused_in_one_line(monkeypatch, device, dtype, fragment):
    fake_gpu(monkeypatch)
    with pytest.raises(MinitronError, match=fragment) as err:
        placement(device, dtype)
    assert "\n" not in str(err.value)


def test_asking_for_cuda_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MinitronError, match="sees no CUDA GPU: use --device cpu"):
        placement("cuda:0")


def test_space_file_device_section(tmp_path):
    base = {"teacher": "smollm2-135m", "axes": {"intermediate_size": [768]}, "budget": {"parameters": 1e8}}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({**base, "device": {"device": "cpu", "dtype": "bfloat16"}}))
    assert load_space(path).device == DeviceSettings("cpu", "bfloat16")
    path.write_text(yaml.safe_dump(base))
    assert load_space(path).device == DeviceSettings()
    path.write_text(yaml.safe_dump({**base, "device": {"gpu": 0}}))
    with pytest.raises(MinitronError, match="unknown key 'device.gpu'"):
        load_space(path)
    path.write_text(yaml.safe_dump({**base, "device": {"dtype": "half-ish"}}))
    with pytest.raises(MinitronError, match="dtype 'half-ish'"):
        load_space(path)


def test_cli_refuses_a_missing_gpu_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["loss", "--model", "smollm2-135m", "--device", "cuda", "--samples", "1"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "sees no CUDA GPU" in lines[0], result.output


# --------------------------------------------------------------------------- batches follow the model


def test_to_model_device_moves_nested_batches(lazy):
    model = torch.nn.Linear(2, 2).to(lazy)
    batch = {"ids": torch.zeros(2, 3, dtype=torch.long), "pair": (torch.ones(1), 7)}
    moved = to_model_device(batch, model)
    assert moved["ids"].device.type == "lazy" and moved["pair"][0].device.type == "lazy" and moved["pair"][1] == 7


def test_a_host_batch_fed_to_a_lazy_model_raises(lazy):
    """The stand-in is faithful: without the move, the forward fails as on a GPU."""
    model = tiny_model("llama").to(lazy)
    with pytest.raises(RuntimeError, match="lazy"):
        model(input_ids=random_blocks(2, 8), use_cache=False)


def test_every_stage_feeds_a_model_on_another_device(lazy):
    """Held-out metrics of the distill stage (student and teacher apart), LM loss, ranking,
    the teacher top-k cache, the trainer's evaluation and pruning, all on host blocks."""
    host = tiny_model("llama")
    blocks = random_blocks(4, 16)
    expected = heldout_metrics(host, host, blocks)
    expected_rankings = compute_rankings(host, blocks, progress=False)

    model = tiny_model("llama").to(lazy)
    got = heldout_metrics(model, host, blocks)  # student on the device, teacher on the host
    assert got["heldout_loss"] == pytest.approx(expected["heldout_loss"], rel=1e-4)
    assert got["kld"] == pytest.approx(0.0, abs=1e-5)
    assert lm_loss(model, blocks) == pytest.approx(expected["heldout_loss"], rel=1e-4)

    rankings = compute_rankings(model, blocks, progress=False)
    assert rankings.heads.device.type == "cpu" and rankings.heads.dtype == torch.float32
    torch.testing.assert_close(rankings.neurons, expected_rankings.neurons, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rankings.block_importance, expected_rankings.block_importance, rtol=1e-3, atol=1e-6)

    cache = TeacherLogitCache.compute(model, blocks, 8, meta={"teacher_fingerprint": "x"})
    assert cache.logprobs.shape == (4, 16, 8)

    settings = RetrainSettings(steps=1, batch_size=2, top_k=8)
    kd, lm = _evaluate(model, blocks, CachedTopK(cache), settings, make_accelerator("cpu"))
    assert lm == pytest.approx(expected["heldout_loss"], rel=1e-4) and kd == pytest.approx(0.0, abs=1e-3)

    student = prune(model, rankings, Architecture(48, 48, 6, 2, 3))
    assert next(student.parameters()).device.type == "lazy"
    assert lm_loss(student, blocks) > 0


# --------------------------------------------------------------------------- dtypes


def test_rankings_of_a_bf16_model_accumulate_in_full_precision():
    model = tiny_model("llama")
    blocks = random_blocks(8, 32)
    full = compute_rankings(model, blocks, progress=False)
    half = compute_rankings(tiny_model("llama").to(torch.bfloat16), blocks, progress=False)
    for name in ("heads", "neurons", "channels", "block_importance"):
        value = getattr(half, name)
        assert value.dtype == torch.float32, name
        # bf16 activations carry ~3 significant digits; the sums must not lose more
        torch.testing.assert_close(value, getattr(full, name), rtol=0.05, atol=0.02)


def test_pruning_keeps_the_teachers_dtype_and_device(lazy):
    rankings = compute_rankings(tiny_model("llama"), random_blocks(4, 16), progress=False)
    for teacher in (tiny_model("llama").to(torch.bfloat16), tiny_model("llama").to(lazy)):
        student = prune(teacher, rankings, Architecture(48, 48, 6, 2, 3))
        param = next(teacher.parameters())
        assert {(p.dtype, p.device) for p in student.parameters()} == {(param.dtype, param.device)}
        assert student.config.dtype == param.dtype


# --------------------------------------------------------------------------- loading


@pytest.fixture
def teacher_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny-llama"
    save_model(tiny_model("llama", vocab_size=257), folder, byte_tokenizer())  # float32 on disk
    return folder


def test_teacher_loads_in_the_asked_dtype_and_device(teacher_folder):
    teacher = teachers.load_teacher(str(teacher_folder), "cpu", "bfloat16")
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    assert teacher.model.config.dtype == torch.bfloat16


def test_no_stage_makes_a_float32_host_copy_of_a_bf16_gpu_teacher(monkeypatch, teacher_folder, shared_data, tmp_path):
    """With a GPU (mocked) and bf16 asked for, transformers is asked to load straight onto
    the GPU in bf16, and neither ranking, pruning nor the held-out metrics convert it."""
    fake_gpu(monkeypatch)
    real = teachers.AutoModelForCausalLM.from_pretrained
    asked = []

    def from_pretrained(path, **kwargs):
        asked.append(kwargs)
        # the "GPU" is the host here: load what was asked, minus the placement
        return real(path, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(teachers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    teacher = teachers.load_teacher(str(teacher_folder))
    assert [{k: a[k] for k in ("dtype", "device_map")} for a in asked] == [{"dtype": torch.bfloat16, "device_map": torch.device("cuda", 0)}]

    conversions = []
    for name in ("to", "float", "cpu"):
        original = getattr(teacher.model, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            host = any(str(a) == "cpu" for a in args) or str(kwargs.get("device")) == "cpu"
            if _name in ("float", "cpu") or host or torch.float32 in args or kwargs.get("dtype") == torch.float32:
                conversions.append((_name, args, kwargs))
            return _original(*args, **kwargs)

        monkeypatch.setattr(teacher.model, name, spy)
    pointers = {n: p.data_ptr() for n, p in teacher.model.named_parameters()}
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    rankings = rank(teacher, RankSettings(data=corpus, samples=4, seq_len=16, batch_size=4))
    student = prune_to(teacher, rankings, Architecture(48, 48, 6, 2, 3))
    heldout_metrics(student, teacher.model, random_blocks(2, 16, vocab=257))
    assert conversions == []
    assert {n: p.data_ptr() for n, p in teacher.model.named_parameters()} == pointers
    assert {p.dtype for p in teacher.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}


def _config_only_teacher(tmp_path: Path) -> Path:
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    shutil.copy(REPO / "search_spaces" / "configs" / "llama-3.1-8b.json", folder / "config.json")
    return folder


def test_a_teacher_that_does_not_fit_the_gpu_is_refused_before_loading(monkeypatch, tmp_path):
    fake_gpu(monkeypatch, free=10 * GIB)
    monkeypatch.setattr(teachers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(MinitronError) as err:
        teachers.load_teacher(str(_config_only_teacher(tmp_path)), "cuda:1", "bfloat16")
    message = str(err.value)
    # 8,030,261,248 parameters x 2 bytes = 14.96 GiB
    assert "needs 15.0 GiB" in message and "bfloat16 on cuda:1" in message and "10.0 GiB" in message
    assert "\n" not in message


def test_a_teacher_that_does_not_fit_the_host_is_refused(monkeypatch, tmp_path):
    import psutil

    class Memory:
        available = 20 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    config = teachers.load_config(str(_config_only_teacher(tmp_path)))
    with pytest.raises(MinitronError, match=r"needs 29\.9 GiB .* float32 on cpu .* 20\.0 GiB of available host memory"):
        check_fits(config, placement("cpu", "float32"))
    assert check_fits(config, placement("cpu", "bfloat16")) == 8_030_261_248 * 2  # fits in bf16


def test_weight_bytes_is_parameters_times_bytes_per_value():
    config = teachers.load_config(str(REPO / "search_spaces" / "configs" / "llama-3.1-8b.json"))
    assert devices.weight_bytes(config, torch.bfloat16) * 2 == devices.weight_bytes(config, torch.float32)
    assert json.loads((REPO / "search_spaces" / "configs" / "llama-3.1-8b.json").read_text())["hidden_size"] == 4096


def test_cli_dtype_reaches_the_teacher(teacher_folder, shared_data, tmp_path):
    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    out = tmp_path / "rankings"
    result = CliRunner().invoke(
        app,
        [
            "rank",
            "--model",
            str(teacher_folder),
            "--data",
            corpus,
            "--out",
            str(out),
            "--samples",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
        ],
    )
    assert result.exit_code == 0, result.output
    made_for = json.loads((out / "rankings.json").read_text())["teacher_fingerprint"]
    assert made_for == teachers.load_teacher(str(teacher_folder), "cpu", "bfloat16").fingerprint
    assert made_for != teachers.load_teacher(str(teacher_folder), "cpu", "float32").fingerprint


def test_rankings_made_in_another_dtype_are_refused_naming_it(teacher_folder, shared_data, tmp_path):
    from minitron_nas.prune.ranking import Rankings

    corpus = str(shared_data / "tinyshakespeare" / "input.txt")
    full = teachers.load_teacher(str(teacher_folder), "cpu", "float32")
    rank(full, RankSettings(data=corpus, samples=2, seq_len=16, batch_size=2), tmp_path / "rankings")
    half = teachers.load_teacher(str(teacher_folder), "cpu", "bfloat16")
    with pytest.raises(MinitronError, match=r"teacher_fingerprint was .*same --dtype \(these were ranked on .*, in float32\)"):
        Rankings.load(tmp_path / "rankings", half.fingerprint)
    assert Rankings.load(tmp_path / "rankings", full.fingerprint).meta["teacher_dtype"] == "float32"


def test_a_bf16_student_trains_with_float32_master_weights_and_returns_in_bf16(monkeypatch):
    from minitron_nas.distill import trainer

    teacher = tiny_model("llama").to(torch.bfloat16)
    blocks = random_blocks(4, 16)
    student = prune(teacher, compute_rankings(teacher, blocks, progress=False), Architecture(48, 48, 6, 2, 4))
    seen = []
    real = trainer.make_optimizer

    def make_optimizer(model, settings):
        seen.extend(p.dtype for p in model.parameters())
        return real(model, settings)

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    settings = RetrainSettings(steps=2, batch_size=2, warmup_steps=0, lr=1e-3, top_k=None)
    result = trainer.retrain(student, blocks, None, settings, teacher=teacher, progress=False, heldout_blocks=blocks[:2])
    assert seen and set(seen) == {torch.float32}
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.eval_curve)
