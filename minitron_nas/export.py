"""Write a model folder that plain `transformers` loads: weights, config, tokenizer, provenance.

`export_winner` adds what users ship: the best architecture with its provenance as JSON
and a model card (README.md) with architecture, parameter counts, training tokens and
evaluation results beside the teacher's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .files import atomic_dir


def save_model(
    model,
    out: Path,
    tokenizer=None,
    metadata: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save atomically: a failed save leaves no folder that looks complete."""
    with atomic_dir(Path(out), overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "minitron.json").write_text(json.dumps(metadata or {}, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def scores_table(scores: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """{model: {task: {metric: value}}} -> one row per task/metric, one column per model."""
    rows = {}
    for model, tasks in scores.items():
        for task, metrics in tasks.items():
            for metric, value in metrics.items():
                rows.setdefault((task, metric), {})[model] = value
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["task", "metric"])
    return table.reset_index()


def model_card(name: str, provenance: dict, scores: dict[str, dict[str, dict[str, float]]]) -> str:
    arch = provenance["architecture"]
    lines = [
        f"# {name}",
        "",
        f"Pruned from **{provenance['teacher']}** and distilled with minitron_nas "
        "(Minitron: structured pruning + knowledge distillation). Loads with plain transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "## Architecture",
        "",
        "| | student | teacher |",
        "|---|---|---|",
    ]
    teacher_arch = provenance.get("teacher_architecture", {})
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        lines.append(f"| {key} | {arch.get(key)} | {teacher_arch.get(key, '')} |")
    params = provenance["parameters"]
    teacher_params = provenance.get("teacher_parameters", {})
    lines += [
        f"| parameters | {params['total']:,} | {teacher_params.get('total', 0):,} |",
        f"| non-embedding parameters | {params['non_embedding']:,} | {teacher_params.get('non_embedding', 0):,} |",
        "",
        "## Training",
        "",
        f"- distillation tokens: {provenance.get('distill_tokens', 0):,}",
        f"- search: {(provenance.get('search') or {}).get('search_tokens') or 0:,} training tokens over every candidate and rung",
        f"- rankings: {json.dumps(provenance.get('rankings', {}))}",
        f"- budget: {json.dumps(provenance.get('budget', {}))}",
        "",
        "## Evaluation",
        "",
    ]
    if scores:
        lines.append(scores_table(scores).to_markdown(index=False, floatfmt=".4f"))
    else:
        lines.append("No evaluation was run.")
    return "\n".join(lines) + "\n"


def export_winner(model, tokenizer, out: Path, provenance: dict, scores: dict, overwrite: bool = True) -> Path:
    """The shipped folder: weights, tokenizer, best_arch.json with provenance, README.md card."""
    name = provenance.get("name", Path(out).name)
    return save_model(
        model,
        out,
        tokenizer,
        metadata=provenance,
        overwrite=overwrite,
        extra_files={
            "best_arch.json": json.dumps(provenance, indent=2),
            "README.md": model_card(name, provenance, scores),
        },
    )
