"""Activation-based importance of every head, neuron, channel and layer (Minitron, Sec. 2).

One calibration pass with forward hooks scores:
- heads: L2 norm of each head's attention output, before the output projection;
- neurons: magnitude of the down projection's input (the MLP's intermediate activation);
- channels: magnitude of every hidden-size norm output (the inputs of the residual
  branches, plus Gemma's post-branch norms and the final norm), summed over norms;
- layers: Block Importance, 1 - mean cosine(layer input, layer output);
- experts, their neurons and a shared expert's neurons in MoE layers (experts.py).
Each score is reduced first over the sequence, then over the batch, with a configurable
reduction; the paper's best is (batch=L2, seq=mean). Magnitudes are used because signed
activations would cancel under a mean. On request, each layer is also scored by the
held-out loss of the model with that layer skipped.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minitron_nas.config.settings import Aggregation, RankSettings
from minitron_nas.data import token_blocks
from minitron_nas.errors import MinitronError
from minitron_nas.evaluate.heldout import lm_loss
from minitron_nas.files import check_writable
from minitron_nas.model.architecture import head_dim_of
from minitron_nas.model.devices import model_device, model_dtype, to_model_device
from minitron_nas.model.families import family_for, final_norm, layers_of
from minitron_nas.model.saving import load_tensors, save_tensors
from minitron_nas.model.teachers import Teacher, check_context
from minitron_nas.provenance import refuse_if_changed
from minitron_nas.prune.aggregate import BatchAccumulator, reduce_seq
from minitron_nas.prune.experts import ExpertScores
from minitron_nas.prune.mamba import MambaScores

TENSOR_FILE, META_FILE = "rankings.safetensors", "rankings.json"
_TENSORS = (
    "heads", "channels", "block_importance", "neurons", "layer_loss", "norm_inputs",
    "experts", "expert_activation", "expert_neurons", "shared_neurons", "mamba_heads", "mamba_dims",
)  # fmt: skip
_REQUIRED = _TENSORS[:3]  # the rest depend on the family (dense MLP or experts) and on the options


_COS_EPS = 1e-8  # F.cosine_similarity's default


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, eps) along the last axis: the first step of F.cosine_similarity, op for op."""
    return x / torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True).clamp_min_(_COS_EPS)


@dataclass
class Rankings:
    """Importance scores (higher = more important) and where they came from."""

    heads: torch.Tensor  # [layers, query heads]
    channels: torch.Tensor  # [hidden]
    block_importance: torch.Tensor  # [layers]
    neurons: torch.Tensor | None = None  # [layers, ffn] (dense MLP layers)
    layer_loss: torch.Tensor | None = None  # [layers] held-out loss with the layer skipped
    norm_inputs: torch.Tensor | None = None  # [norms, hidden] mean square of each hidden norm's input per channel
    experts: torch.Tensor | None = None  # [layers, experts] REAP saliency (MoE, experts.py)
    expert_activation: torch.Tensor | None = None  # [layers, experts] Minitron activation score
    expert_neurons: torch.Tensor | None = None  # [layers, experts, expert width]
    shared_neurons: torch.Tensor | None = None  # [layers, shared expert width] (Qwen2-MoE)
    mamba_heads: torch.Tensor | None = None  # [layers, Mamba heads] (hybrids; zeros in other layers)
    mamba_dims: torch.Tensor | None = None  # [layers, Mamba head_dim]
    meta: dict = field(default_factory=dict)

    def save(self, out: Path, overwrite: bool = False) -> None:
        tensors = {k: getattr(self, k) for k in _TENSORS if getattr(self, k) is not None}
        save_tensors(out, tensors, self.meta, TENSOR_FILE, META_FILE, overwrite)

    @staticmethod
    def weights_file(folder: Path) -> Path:
        """The tensors of the rankings saved in `folder` (hashed into an export's provenance)."""
        return Path(folder) / TENSOR_FILE

    @classmethod
    def load(cls, folder: Path, teacher_fingerprint: str | None = None) -> Rankings:
        meta, tensors = load_tensors(
            folder,
            TENSOR_FILE,
            META_FILE,
            missing=f"no rankings in '{folder}': run `minitron-nas rank` first or fix --rankings",
            corrupt=f"rankings in '{folder}' are corrupt ({{why}}): rerun `minitron-nas rank`",
        )
        missing = [k for k in _REQUIRED if k not in tensors]
        if missing:
            raise MinitronError(f"rankings in '{folder}' lack '{missing[0]}': rerun `minitron-nas rank`")
        dtype = f", in {meta['teacher_dtype']}" if meta.get("teacher_dtype") else ""
        refuse_if_changed(
            f"the rankings folder '{folder}'",
            meta,
            {"teacher_fingerprint": teacher_fingerprint},
            f"rank this teacher first in the same --dtype (these were ranked on '{meta.get('teacher')}'{dtype})",
        )
        return cls(**{k: tensors.get(k) for k in _TENSORS}, meta=meta)


def _hidden_norms(model, family):
    """Every norm whose output lives in the hidden space, final norm included.

    Order: layer by layer, `family.layer_norms` within a layer, then the final norm (the
    rows of `Rankings.norm_inputs`)."""
    norms = []
    for layer in layers_of(model):
        norms += [getattr(layer, name) for name in family.layer_norms]
    return norms + [final_norm(model)]


def _layer_io(args, kwargs, output):
    hidden_in = args[0] if args else kwargs["hidden_states"]
    hidden_out = output[0] if isinstance(output, tuple) else output
    return hidden_in, hidden_out


@torch.no_grad()
def compute_rankings(
    model,
    blocks: torch.Tensor,
    aggregation: Aggregation = Aggregation(),
    batch_size: int = 8,
    heldout: torch.Tensor | None = None,
    progress: bool = True,
    meta: dict | None = None,
) -> Rankings:
    """Score every axis of `model` on calibration `blocks` ([N, seq_len] token ids).

    With `heldout` blocks, layers are also scored by the loss when each one is skipped.
    """
    family = family_for(model.config)
    config = model.config
    head_dim = head_dim_of(config)
    layers = layers_of(model)
    device = model_device(model)
    acc_heads = [BatchAccumulator(aggregation.batch) for _ in layers]
    acc_neurons = [BatchAccumulator(aggregation.batch) for _ in layers]
    experts = ExpertScores([family.moe_block(layer) for layer in layers], aggregation) if family.moe else None
    hybrid = family.hybrid
    types = hybrid.types(config) if hybrid else [None] * len(layers)  # a hybrid's heads, neurons and Mamba heads live in their own layers
    mamba = None
    if hybrid:
        mixers = [layer.get_submodule(hybrid.mixer) if t == hybrid.mamba else None for layer, t in zip(layers, types)]
        sizes = hybrid.sizes(config)
        mamba = MambaScores(mixers, sizes.heads, sizes.head_dim, aggregation)
    norms = _hidden_norms(model, family)
    acc_channels = [BatchAccumulator(aggregation.batch) for _ in norms]
    norm_squares = torch.zeros(len(norms), config.hidden_size, dtype=torch.float64, device=device)  # sum over tokens of x_c^2
    norm_tokens = [0]
    cos_sum = torch.zeros(len(layers), dtype=torch.float64, device=device)  # [layers], no host sync per hook
    cos_count = [0]
    previous = [None]  # (last layer output, its version, its unit rows): usually the next layer's input

    def head_hook(index):
        def hook(module, args):
            x = args[0]
            per_head = x.view(*x.shape[:-1], -1, head_dim).float().norm(dim=-1)
            acc_heads[index].add(reduce_seq(per_head, aggregation.seq))

        return hook

    def neuron_hook(index):
        def hook(module, args):
            acc_neurons[index].add(reduce_seq(args[0].abs(), aggregation.seq))

        return hook

    def channel_hook(index):
        def hook(module, args, output):
            acc_channels[index].add(reduce_seq(output.abs(), aggregation.seq))
            x = args[0]  # [B, S, hidden]: what the norm divides by its root mean square
            norm_squares[index] += x.double().pow(2).sum(dim=(0, 1))  # on the device: no host sync per hook
            if index == 0:
                norm_tokens[0] += x.shape[0] * x.shape[1]

        return hook

    def block_hook(index):
        def hook(module, args, kwargs, output):
            hidden_in, hidden_out = _layer_io(args, kwargs, output)
            # F.cosine_similarity(hidden_in, hidden_out, dim=-1) op for op (identical values), but
            # a layer's output is the next layer's input: its unit rows are normalised only once.
            cached = previous[0]
            if cached is not None and cached[0] is hidden_in and cached[1] == hidden_in._version:
                unit_in = cached[2]
            else:
                unit_in = _unit_rows(hidden_in.float())
            unit_out = _unit_rows(hidden_out.float())
            previous[0] = (hidden_out, hidden_out._version, unit_out)
            cos = unit_in.mul_(unit_out).sum(dim=-1)  # unit_in is not needed again
            cos_sum[index] += cos.double().sum()
            if index == 0:
                cos_count[0] += cos.numel()

        return hook

    handles = []
    for i, layer in enumerate(layers):
        if types[i] in (None, hybrid and hybrid.attention):
            handles.append(family.head_output(layer).register_forward_pre_hook(head_hook(i)))
        if not family.moe and (not hybrid or hybrid.has_mlp(types[i])):
            handles.append(family.neuron_output(layer).register_forward_pre_hook(neuron_hook(i)))
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
    for i, norm in enumerate(norms):
        handles.append(norm.register_forward_hook(channel_hook(i)))
    for scores in (experts, mamba):
        if scores is not None:
            handles += scores.register()
    start = time.perf_counter()
    try:
        for batch in tqdm(blocks.split(batch_size), desc="ranking", disable=not progress, unit="batch"):
            model(input_ids=to_model_device(batch, model), use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    elapsed = time.perf_counter() - start

    rankings = Rankings(
        heads=_stacked(acc_heads, config.num_attention_heads),
        neurons=None if family.moe else _stacked(acc_neurons, config.intermediate_size),
        **(experts.result() if experts is not None else {}),
        **(mamba.result() if mamba is not None else {}),
        channels=torch.stack([a.result() for a in acc_channels]).sum(0),
        block_importance=(1 - cos_sum / cos_count[0]).float().cpu(),
        norm_inputs=(norm_squares / norm_tokens[0]).float().cpu(),
        meta={
            **(meta or {}),
            "aggregation": asdict(aggregation),
            "samples": int(blocks.shape[0]),
            "seq_len": int(blocks.shape[1]),
            "seconds": round(elapsed, 2),
            "model_type": config.model_type,
        },
    )
    if heldout is not None:
        rankings.layer_loss = layer_drop_losses(model, heldout, batch_size, progress)
        rankings.meta["heldout_samples"] = int(heldout.shape[0])
    return rankings


def _stacked(accumulators: list[BatchAccumulator], size: int) -> torch.Tensor:
    """[layers, size]: zeros for a layer without this part (a hybrid's Mamba layer has no heads)."""
    return torch.stack([a.result() if a.n else torch.zeros(size) for a in accumulators])


@torch.no_grad()
def layer_drop_losses(model, heldout: torch.Tensor, batch_size: int = 8, progress: bool = True) -> torch.Tensor:
    """Held-out loss with each layer in turn replaced by the identity (higher = more important)."""
    losses = []

    def skip(module, args, kwargs, output):
        hidden_in, _ = _layer_io(args, kwargs, output)
        return (hidden_in, *output[1:]) if isinstance(output, tuple) else hidden_in

    for layer in tqdm(layers_of(model), desc="layer-drop loss", disable=not progress, unit="layer"):
        handle = layer.register_forward_hook(skip, with_kwargs=True)
        try:
            losses.append(lm_loss(model, heldout, batch_size))
        finally:
            handle.remove()
    return torch.tensor(losses, dtype=torch.float32)


# --------------------------------------------------------------------------- the rank stage


def rank(teacher: Teacher, settings: RankSettings, out: Path | None = None, overwrite: bool = False) -> Rankings:
    """Calibrate on `settings.data` and (optionally) save the rankings to `out`."""
    if out is not None:
        check_writable(out, overwrite)
    if settings.batch_size < 1:
        raise MinitronError(f"batch_size {settings.batch_size} is below 1: use --batch-size (ranking.batch_size) 1 or more")
    check_context(teacher.model.config, settings.seq_len, "--seq-len (ranking.seq_len)")
    blocks = token_blocks(settings.data, teacher.tokenizer, settings.seq_len, settings.samples, settings.split)
    heldout = None
    if settings.layer_loss:
        heldout = token_blocks(settings.data, teacher.tokenizer, settings.seq_len, settings.heldout_samples, "heldout")
    rankings = compute_rankings(
        teacher.model,
        blocks,
        settings.aggregation,
        settings.batch_size,
        heldout=heldout,
        meta={
            "teacher": teacher.name,
            "teacher_fingerprint": teacher.fingerprint,
            "teacher_dtype": str(model_dtype(teacher.model)).removeprefix("torch."),  # the fingerprint depends on it
            "data": settings.data,
            "split": settings.split,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    if out is not None:
        rankings.save(out, overwrite)
    return rankings


def load_or_rank(teacher: Teacher, settings: RankSettings, folder: Path) -> Rankings:
    """The rankings saved in `folder` (refused if made for another teacher), else rank and save them there."""
    if (Path(folder) / META_FILE).is_file():
        return Rankings.load(folder, teacher.fingerprint)
    return rank(teacher, settings, folder)
