"""The full distillation stage: intermediate states when depth is cut, and exact resume."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import random_blocks, tiny_model

from minitron_nas.config.settings import DistillSettings
from minitron_nas.distill.checkpoint import Checkpoint
from minitron_nas.distill.losses import IntermediateStates
from minitron_nas.distill.stage import distill
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture
from minitron_nas.prune.pruning import prune, select
from minitron_nas.prune.ranking import compute_rankings

SETTINGS = DistillSettings(steps=6, batch_size=4, lr=1e-3, warmup_steps=1, top_k=None, eval_every=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def setup():
    teacher = tiny_model("llama")
    rankings = compute_rankings(teacher, random_blocks(8, 32), progress=False)
    arch = Architecture(36, 64, 6, 2, 2)  # half the layers: intermediate states switch on
    chosen = select(rankings, arch, Architecture.from_config(teacher.config))
    return teacher, rankings, arch, chosen


def run(setup, folder, settings=SETTINGS):
    teacher, rankings, arch, chosen = setup
    student = prune(teacher, rankings, arch)
    result = distill(
        student, teacher, random_blocks(16, 32, seed=3), settings, folder, random_blocks(4, 32, seed=4), chosen.layers, chosen.channels, progress=False
    )
    return student, result


def test_projection_starts_as_the_channel_selection(setup):
    teacher, rankings, arch, chosen = setup
    student = prune(teacher, rankings, arch)
    states = IntermediateStates(chosen.layers, arch.hidden_size, teacher.config.hidden_size, chosen.channels)
    ids = random_blocks(2, 16)
    s_out = student(input_ids=ids, output_hidden_states=True)
    t_out = teacher(input_ids=ids, output_hidden_states=True)
    projected = states.project(s_out.hidden_states[0])
    assert torch.allclose(projected[..., chosen.channels], t_out.hidden_states[0][..., chosen.channels])
    assert states.loss(s_out.hidden_states, t_out.hidden_states) > 0


def test_auto_turns_intermediate_states_on_only_for_deep_cuts():
    assert SETTINGS.uses_intermediate(2, 4) and not SETTINGS.uses_intermediate(4, 4)
    assert not replace(SETTINGS, intermediate="off").uses_intermediate(2, 4)
    assert replace(SETTINGS, intermediate="on").uses_intermediate(4, 4)
    with pytest.raises(MinitronError, match="intermediate"):
        replace(SETTINGS, intermediate="sometimes")


def test_distillation_lowers_heldout_kd_and_writes_curve(setup, tmp_path):
    _, result = run(setup, tmp_path / "d")
    assert result.settings["intermediate_active"] is True
    assert result.eval_curve[-1][1] < result.eval_curve[0][1]
    assert (tmp_path / "d" / "curve.json").is_file() and (tmp_path / "d" / "checkpoint" / "made_from.json").is_file()


def test_interrupted_run_resumes_on_the_same_trajectory(setup, tmp_path, monkeypatch):
    straight, reference = run(setup, tmp_path / "straight")
    original = Checkpoint.save

    def crash_after_step_4(self, step, *args):
        original(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt  # the process dies right after its step-4 checkpoint

    monkeypatch.setattr(Checkpoint, "save", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(setup, tmp_path / "resumed")
    monkeypatch.setattr(Checkpoint, "save", original)
    resumed_model, resumed = run(setup, tmp_path / "resumed")
    assert [s for s, _ in resumed.curve] == list(range(1, 7))
    assert resumed.eval_curve[-1][1] == pytest.approx(reference.eval_curve[-1][1], rel=1e-4)
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name
    assert resumed_model.lm_head.weight.data_ptr() == resumed_model.model.embed_tokens.weight.data_ptr()  # still tied


def test_checkpoints_of_a_tied_student_log_no_warning(setup, tmp_path, caplog):
    """The tied lm_head that accelerate drops from the safetensors is not announced into the bar."""
    assert setup[0].config.tie_word_embeddings
    with caplog.at_level("WARNING"):
        run(setup, tmp_path / "d")
    assert "shared tensor" not in caplog.text


def test_checkpoint_of_other_settings_is_refused(setup, tmp_path):
    run(setup, tmp_path / "d")
    with pytest.raises(MinitronError, match=r"other inputs \(settings\.lr was 0\.001, now 0\.0005\)"):
        run(setup, tmp_path / "d", replace(SETTINGS, lr=5e-4))


def test_checkpoint_of_other_data_teacher_or_student_is_refused(setup, tmp_path):
    """Settings alike, inputs not: each of the three is named, and nothing is trained."""
    teacher, rankings, arch, chosen = setup
    run(setup, tmp_path / "d")
    saved = (tmp_path / "d" / "checkpoint" / "made_from.json").read_bytes()
    other_teacher = tiny_model("llama", seed=5)
    cases = [
        ("training data", prune(teacher, rankings, arch), teacher, random_blocks(16, 32, seed=9), arch),
        ("teacher", prune(other_teacher, rankings, arch), other_teacher, random_blocks(16, 32, seed=3), arch),
        ("student architecture", *(lambda a: (prune(teacher, rankings, a), teacher, random_blocks(16, 32, seed=3), a))(Architecture(36, 48, 6, 2, 2))),
    ]
    for what, student, model, blocks, target in cases:
        picked = select(rankings, target, Architecture.from_config(teacher.config))
        with pytest.raises(MinitronError, match=rf"made from other inputs \({what}"):
            distill(student, model, blocks, SETTINGS, tmp_path / "d", random_blocks(4, 32, seed=4), picked.layers, picked.channels, progress=False)
    assert (tmp_path / "d" / "checkpoint" / "made_from.json").read_bytes() == saved
