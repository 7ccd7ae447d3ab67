"""Write a model folder that plain `transformers` loads: weights, config, tokenizer, provenance.

The folder loads in transformers 4.4x-4.5x as well as 5.x: `config.json` carries, beside 5's
`rope_parameters`, the top-level `rope_theta` (and `rope_scaling`) that 4.x reads (without
them 4.x silently uses rope base 10,000), with `head_dim` and `tie_word_embeddings` explicit;
`tokenizer_config.json` names `PreTrainedTokenizerFast`, known to both (5's own
`TokenizersBackend` is unknown to 4.x), and holds the chat template that 4.x before 4.50
reads only there. `_name_or_path` is the model's name, never a local path.

`export_winner` adds what users ship: the best architecture with its provenance as JSON
and a model card (README.md) with architecture, parameter counts, training tokens and
evaluation results beside the teacher's. `save_tensors` and `load_tensors` keep named tensors
with a JSON of what they were made from (the rankings, the teacher logit cache).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file, save_file

from minitron_nas.errors import MinitronError
from minitron_nas.files import atomic_dir

TOKENIZER_CLASS = "PreTrainedTokenizerFast"  # a tokenizer.json tokenizer in transformers 4.x and 5.x


def legacy_rope(config: dict) -> dict:
    """The keys transformers 4.x reads for what 5.x keeps in `rope_parameters`.

    `rope_theta`, and `rope_scaling` (None for the default rope); a model with one rope per
    layer type (Gemma 3) also gets `rope_local_base_freq`, the sliding layers' base.
    """
    rope = config.get("rope_parameters")
    if not rope:
        return {}
    keys = {}
    if all(isinstance(value, dict) for value in rope.values()):  # {layer type: parameters}
        if "sliding_attention" in rope:
            keys["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = rope.get("full_attention") or next(iter(rope.values()))
    keys["rope_theta"] = rope["rope_theta"]
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    keys["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return keys


def _portable_config(folder: Path, model, name: str) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    text_config = model.config.get_text_config()
    config.update(legacy_rope(config))
    config["head_dim"] = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    config["tie_word_embeddings"] = bool(getattr(text_config, "tie_word_embeddings", False))
    config.pop("_model_name_or_path", None)  # a GGUF's general.name, copied by transformers' GGUF reader
    config["_name_or_path"] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _portable_tokenizer(folder: Path) -> None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if (folder / "tokenizer.json").is_file():
        config["tokenizer_class"] = TOKENIZER_CLASS
    for key in ("is_local", "local_files_only"):  # how this process loaded it, not what it is
        config.pop(key, None)
    template = folder / "chat_template.jinja"
    if template.is_file() and "chat_template" not in config:
        config["chat_template"] = template.read_text()
    path.write_text(json.dumps(config, indent=2) + "\n")


def save_tensors(folder: Path, tensors: dict, meta: dict, tensor_file: str, meta_file: str, overwrite: bool = False) -> None:
    """`tensors` as safetensors and `meta` as JSON in `folder`, written atomically: a temporary sibling folder, renamed when complete."""
    with atomic_dir(Path(folder), overwrite) as tmp:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp / tensor_file))
        (tmp / meta_file).write_text(json.dumps(meta, indent=2))


def load_tensors(folder: Path, tensor_file: str, meta_file: str, missing: str, corrupt: str) -> tuple[dict, dict]:
    """The (meta, tensors) that `save_tensors` wrote in `folder`.

    Raises MinitronError: `missing` when a file is missing, `corrupt` (its `{why}` replaced by the
    error's type) when the JSON or the safetensors do not read.
    """
    meta_path, tensor_path = Path(folder) / meta_file, Path(folder) / tensor_file
    if not meta_path.is_file() or not tensor_path.is_file():
        raise MinitronError(missing)
    try:
        return json.loads(meta_path.read_text()), load_file(str(tensor_path))
    except Exception as err:  # corrupt JSON or safetensors header
        raise MinitronError(corrupt.replace("{why}", type(err).__name__)) from None


def save_model(
    model,
    out: Path,
    tokenizer=None,
    metadata: dict | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save atomically: a failed save leaves no folder that looks complete.

    The config and tokenizer files are made loadable by transformers 4.x too (see above);
    `_name_or_path` is `metadata["name"]`, else the folder's name.
    """
    out = Path(out)
    name = (metadata or {}).get("name") or out.name
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        _portable_config(tmp, model, name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer(tmp)
        (tmp / "minitron.json").write_text(json.dumps(metadata or {}, indent=2))
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text)
    return out


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
        f"Pruned from the teacher **{provenance['teacher']}** (fingerprint {provenance.get('teacher_fingerprint', 'n/a')}) "
        "and distilled with minitron_nas, following NVIDIA's Minitron recipe (structured pruning + "
        "knowledge distillation): rank -> search -> distill. Loads with plain transformers (4.4x and later):",
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
    dense = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
    family_sizes = [key for key, value in arch.items() if key not in dense and key != "layers" and value is not None]  # MoE and hybrid sizes
    for key in (*dense, *family_sizes):
        lines.append(f"| {key} | {arch.get(key)} | {teacher_arch.get(key, '')} |")
    params = provenance["parameters"]
    rankings = provenance.get("rankings") or {}
    search = provenance.get("search") or {}
    teacher_params = provenance.get("teacher_parameters", {})
    role = search.get("role", "winner")  # `export --front`: also "member of the Pareto front by parameters"
    active = []  # an MoE model: what one token uses (its top-k experts of each layer)
    if params.get("active") is not None:
        teacher_active = teacher_params.get("active")
        active = [f"| active parameters (per token) | {params['active']:,} | {'' if teacher_active is None else f'{teacher_active:,}'} |"]
    lines += [
        f"| parameters | {params['total']:,} | {teacher_params.get('total', 0):,} |",
        f"| non-embedding parameters | {params['non_embedding']:,} | {teacher_params.get('non_embedding', 0):,} |",
        *active,
        "",
        "## Recipe",
        "",
        f"1. **rank**: the importance of every head, neuron, embedding channel and layer of the teacher, "
        f"on {rankings.get('samples')} x {rankings.get('seq_len')} tokens of `{rankings.get('data')}` "
        f"(aggregation {json.dumps(rankings.get('aggregation'))});",
        f"2. **search**: every architecture within the budget ({json.dumps(provenance.get('budget', {}))}) pruned from the teacher "
        f"and retrained briefly by distillation, {search.get('search_tokens') or 0:,} training tokens over every candidate and rung; "
        f"the {role} (trial {search.get('trial')}) scored {search.get('metric')} = {_number(search.get('score'))}"
        f"{f' +/- {_number(stderr)}' if (stderr := search.get('score_stderr')) is not None else ''};",
        f"3. **distill**: the {role} distilled from the teacher on {provenance.get('distill_tokens', 0):,} tokens.",
        "",
        "## Evaluation",
        "",
    ]
    if scores:
        lines.append(scores_table(scores).to_markdown(index=False, floatfmt=".4f"))
    else:
        lines.append("No evaluation was run.")
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


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
