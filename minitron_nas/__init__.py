"""minitron_nas: smaller, accurate models from one trained causal LM (Minitron recipe).

The Python API mirrors the CLI stages:

    teacher = load_teacher("smollm2-135m")
    blocks = token_blocks("shakespeare", teacher.tokenizer, seq_len=256, max_blocks=64)
    rankings = compute_rankings(teacher.model, blocks)
    arch = Architecture.from_dict({"intermediate_size": 768}, Architecture.from_config(teacher.model.config))
    student = prune(teacher.model, rankings, arch)

One function per command: `rank`, `run_search`, `distill_winner`, `export_stage` and `run`
(all of them in order). Names are imported on first use (PEP 562), so `import minitron_nas` and `minitron-nas --help`
do not pay for torch and transformers.
"""

from importlib import import_module

_WHERE = {
    "Aggregation": "prune.ranking",
    "Architecture": "model.architecture",
    "MinitronError": "errors",
    "ParamCount": "model.architecture",
    "ParamCounter": "model.architecture",
    "Rankings": "prune.ranking",
    "Teacher": "model.teachers",
    "compute_rankings": "prune.ranking",
    "distill_winner": "recipes.distill",
    "export_stage": "recipes.export",
    "layer_drop_losses": "prune.ranking",
    "lm_loss": "evaluate.heldout",
    "load_config": "model.teachers",
    "load_space": "config.space",
    "load_teacher": "model.teachers",
    "prune": "prune.pruning",
    "rank": "prune.ranking",
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
    "Rankings",
    "Teacher",
    "compute_rankings",
    "distill_winner",
    "export_stage",
    "layer_drop_losses",
    "lm_loss",
    "load_config",
    "load_space",
    "load_teacher",
    "prune",
    "rank",
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
