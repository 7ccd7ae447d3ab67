"""The evaluate recipe: lm-evaluation-harness scores of one model, and the objective a search would rank it on.

Every name, folder and file is checked before the weights load; the scores are lm-eval's own
(its prompts, metrics and standard errors).
"""

from __future__ import annotations

from pathlib import Path

from minitron_nas.config.space import ScoringSettings
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.harness import check_lm_eval, lm_eval_scores
from minitron_nas.evaluate.objective import lm_eval_objective
from minitron_nas.model.teachers import load_teacher

__all__ = ["evaluate_model"]


def evaluate_model(
    model: str,
    tasks: str | list[str],
    data_dir: Path | None = None,
    include_path: list[Path] | None = None,
    limit: int | dict[str, int] | None = None,
    batch_size: int = ScoringSettings.batch_size,
    num_fewshot: int | dict[str, int] | None = None,
    objective: str | None = None,
    verbose: bool | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> dict:
    """`minitron-nas evaluate`: {model, limit, num_fewshot, scores: {task: {metric: value}}, objective}.

    `objective` is the space's scoring objective ('task/metric'); without one, the mean acc_norm
    (else acc) over the tasks, or None when no task has an accuracy (e.g. wikitext alone).
    Settings are named as the command's options (--limit) in errors.
    """
    spec = ScoringSettings(
        metric="lm_eval",
        tasks=tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()),
        data_dir=None if data_dir is None else str(data_dir),
        include_path=tuple(str(p) for p in include_path or ()),
        limit=limit,
        num_fewshot=num_fewshot,
        objective=objective,
        batch_size=batch_size,
    )
    check_lm_eval(spec, where="--")  # bad names, folders or files fail before the model loads
    teacher = load_teacher(model, device, dtype)
    scores = lm_eval_scores(teacher.model, teacher.tokenizer, spec, verbose=verbose)
    summary = None
    try:
        value, stderr, higher = lm_eval_objective(scores, spec)
        summary = {"name": objective or "mean acc_norm (else acc)", "value": value, "stderr": stderr, "higher_is_better": higher}
    except MinitronError:
        if objective:
            raise
        # no accuracy among the tasks (e.g. wikitext alone) and none asked for: scores only
    return {"model": teacher.name, "limit": spec.limit, "num_fewshot": spec.num_fewshot, "scores": scores, "objective": summary}
