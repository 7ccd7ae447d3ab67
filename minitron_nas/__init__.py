"""minitron_nas: smaller, accurate models from one trained causal LM (Minitron recipe).

The Python API mirrors the CLI stages:

    teacher = load_teacher("smollm2-135m")
    blocks = token_blocks("shakespeare", teacher.tokenizer, seq_len=256, max_blocks=64)
    rankings = compute_rankings(teacher.model, blocks)
    arch = Architecture.from_dict({"intermediate_size": 768}, Architecture.from_config(teacher.model.config))
    student = prune(teacher.model, rankings, arch)

Each command of `minitron-nas` is one function here, with the command's options as its
arguments: rank -> `rank_model`, count -> `count_parameters`, prune -> `prune_model`,
loss -> `model_loss`, evaluate -> `evaluate_model`, enumerate -> `feasible_candidates`,
search -> `run_search`, distill -> `distill_winner`, export -> `export_stage`,
dashboard -> `report_stage`, and run -> `run` (all stages in order). Names are imported on
first use (PEP 562), so `import minitron_nas` and `minitron-nas --help` do not pay for torch
and transformers.
"""

from importlib import import_module

_WHERE = {
    "Aggregation": "config.settings",
    "Architecture": "model.architecture",
    "MinitronError": "errors",
    "ParamCount": "model.architecture",
    "ParamCounter": "model.architecture",
    "RankSettings": "config.settings",
    "Rankings": "prune.ranking",
    "Teacher": "model.teachers",
    "compute_rankings": "prune.ranking",
    "count_parameters": "recipes.prune",
    "distill_winner": "recipes.distill",
    "evaluate_model": "recipes.evaluate",
    "export_stage": "recipes.export",
    "feasible_candidates": "recipes.search",
    "layer_drop_losses": "prune.ranking",
    "lm_loss": "evaluate.heldout",
    "load_config": "model.teachers",
    "load_space": "search.candidates",
    "load_teacher": "model.teachers",
    "model_loss": "recipes.prune",
    "prune": "prune.pruning",
    "prune_model": "recipes.prune",
    "rank": "prune.ranking",
    "rank_model": "recipes.prune",
    "report_stage": "recipes.report",
    "retrain": "distill.trainer",
    "run": "recipes.run",
    "run_search": "search.runner",
    "save_model": "model.saving",
    "select": "prune.pruning",
    "token_blocks": "data",
}

__all__ = [
    "Aggregation",
    "Architecture",
    "MinitronError",
    "ParamCount",
    "ParamCounter",
    "RankSettings",
    "Rankings",
    "Teacher",
    "compute_rankings",
    "count_parameters",
    "distill_winner",
    "evaluate_model",
    "export_stage",
    "feasible_candidates",
    "layer_drop_losses",
    "lm_loss",
    "load_config",
    "load_space",
    "load_teacher",
    "model_loss",
    "prune",
    "prune_model",
    "rank",
    "rank_model",
    "report_stage",
    "retrain",
    "run",
    "run_search",
    "save_model",
    "select",
    "token_blocks",
]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'minitron_nas' has no attribute '{name}'")
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
