"""What the search puts in its study: the study itself, and the trials it queues for workers.

A trial names its work in its user attributes, never by an index into any list: rung 0's
work units (`rung0_chunk`, up to RUNG0_CHUNK candidate keys) and a candidate at a retraining
rung (its architecture, rung, data order, steps and tokens, with what it carries from its
rung-0 trial). Workers pop waiting trials atomically; a second queueing of the same
(rung, architecture, data order) is recognised by `earlier_live` and ends as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict

import optuna

from minitron_nas.config.space import AXES, FAMILY_AXES, SearchSpace
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture
from minitron_nas.provenance import refuse_if_changed
from minitron_nas.search.candidates import Candidate
from minitron_nas.search.halving import Schedule
from minitron_nas.search.samplers import sampler_named
from minitron_nas.search.study import STUDY_NAME

__all__ = [
    "COMPLETE",
    "RUNNING",
    "WAITING",
    "arch_key",
    "candidate_attrs",
    "carried",
    "distributions",
    "earlier_live",
    "made_from",
    "open_study",
    "params_of",
    "queue_candidate",
    "queue_rung0",
    "search_trials",
    "work_trials",
]

# What a candidate's trials at later rungs inherit from its rung-0 trial.
CARRIED = ("architecture", "key", "params_total", "params_non_embedding", "params_active", "pruned", "prefill_tokens_per_s", "decode_tokens_per_s")
WAITING, RUNNING, COMPLETE = optuna.trial.TrialState.WAITING, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
RUNG0_CHUNK = 64  # most rung-0 candidates per work unit: few queue writes, yet shared among workers
PROPOSALS = 8  # most adaptive proposals per work unit: each waits for the scores before it


def arch_key(arch: Architecture) -> str:
    """The architecture as text: hidden/ffn/heads:kv groups/layers, then (MoE) /e<experts>/m<expert width>/s<shared width>,
    (hybrid) /<Mamba heads>x<Mamba head_dim>/<Mamba>M<attention>A<MLP>F layers (no F part for Bamba)."""
    key = f"{arch.hidden_size}/{arch.intermediate_size}/{arch.num_attention_heads}:{arch.num_key_value_heads}/{arch.num_hidden_layers}"
    for prefix, value in (("e", arch.num_experts), ("m", arch.moe_intermediate_size), ("s", arch.shared_expert_intermediate_size)):
        if value is not None:
            key += f"/{prefix}{value}"
    if arch.mamba_num_heads is not None:
        key += f"/{arch.mamba_num_heads}x{arch.mamba_head_dim}/{arch.num_mamba_layers}M{arch.num_attention_layers}A"
        key += f"{arch.num_mlp_layers}F" if arch.num_mlp_layers is not None else ""  # Bamba: no MLP layers of their own
    return key


def params_of(space: SearchSpace, arch: Architecture) -> dict[str, int]:
    """The architecture as Optuna params, one per axis of the space (what optuna-dashboard plots)."""
    values = {**arch.to_dict(), "heads_per_group": arch.num_attention_heads // arch.num_key_value_heads}
    return {axis: values[axis] for axis in AXES + FAMILY_AXES if axis in space.axes}


def distributions(space: SearchSpace) -> dict[str, optuna.distributions.CategoricalDistribution]:
    return {axis: optuna.distributions.CategoricalDistribution(tuple(space.axes[axis])) for axis in AXES + FAMILY_AXES if axis in space.axes}


def candidate_attrs(c: Candidate) -> dict:
    attrs = {"architecture": c.arch.to_dict(), "key": arch_key(c.arch), "params_total": c.total, "params_non_embedding": c.non_embedding}
    if c.active != c.total:  # an MoE candidate: what a token uses
        attrs["params_active"] = c.active
    return attrs


def carried(attrs: dict) -> dict:
    """What a candidate's trial at the next rung inherits from this one."""
    return {k: attrs[k] for k in CARRIED if k in attrs}


def made_from(space: SearchSpace, teacher_fingerprint: str) -> dict[str, str]:
    """What a study's results depend on, one short hash per part (a resume must match)."""
    parts = {
        "teacher": teacher_fingerprint,
        "axes": {k: list(v) for k, v in sorted(space.axes.items())},
        "budget": asdict(space.budget),
        "ranking": asdict(space.ranking),
        "retrain": asdict(space.retrain),
        "scoring": asdict(space.scoring),
        "halving": asdict(space.halving),
        "distill.tokens": space.distill.tokens,
        "sampler": [space.sampler, space.trials, space.seed],
    }
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:12] for k, v in parts.items()}


def open_study(space: SearchSpace, store, where, resume: bool, teacher_fingerprint: str, pool: list[Candidate], schedule: Schedule) -> optuna.Study:
    """Create the study and queue rung 0, or reopen it (refused if made from another search)."""
    exists = STUDY_NAME in [s.study_name for s in optuna.get_all_study_summaries(store)]
    if exists and not resume:
        raise MinitronError(f"a study already exists in '{where}': pass --resume or choose another --out")
    study = optuna.create_study(
        storage=store,
        study_name=STUDY_NAME,
        direction="minimize",  # the rung metrics (kld, heldout_loss) are lower-is-better
        sampler=optuna.samplers.RandomSampler(seed=space.seed),  # never consulted: every trial has its params
        pruner=optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    want = made_from(space, teacher_fingerprint)
    have = study.user_attrs.get("made_from")
    if have is not None:
        refuse_if_changed(f"the study in '{where}'", have, want, "resume with the original space and teacher, or choose another --out")
        study.set_user_attr("resumed", True)
        return study
    study.set_user_attr("made_from", want)
    study.set_user_attr("space", space.source)
    study.set_user_attr("metric", space.scoring.metric)
    study.set_user_attr("rung_metric", space.halving.rung_metric)
    study.set_user_attr("rungs", len(schedule.rungs))
    study.set_user_attr("schedule", [{**asdict(r), "stable": r.stable} for r in schedule.rungs])
    study.set_user_attr("budget_tokens", schedule.budget_tokens)
    study.set_user_attr("rung0_candidates", schedule.rungs[0].candidates)
    if sampler_named(space.sampler).adaptive and schedule.rungs[0].candidates < len(pool):
        queue_proposals(study, schedule.rungs[0].candidates)  # proposed one at a time from the scores so far
    else:
        queue_rung0(study, [arch_key(c.arch) for c in pool])
    return study


def queue_candidate(study: optuna.Study, rung: int, schedule: Schedule, candidate: dict, params: dict, order: int = 0) -> None:
    """A waiting trial naming its architecture, rung and data order (no index into any list)."""
    r = schedule.rungs[rung]
    study.enqueue_trial(params, user_attrs={**candidate, "rung": rung, "order": order, "steps": r.steps, "tokens": r.tokens}, skip_if_exists=False)


def queue_rung0(study: optuna.Study, keys: list[str], requeued: bool = False) -> None:
    """Rung 0's candidates as waiting work units of up to RUNG0_CHUNK, which workers pop like any trial."""
    size = max(1, min(RUNG0_CHUNK, math.ceil(len(keys) / RUNG0_CHUNK)))
    for i in range(0, len(keys), size):
        study.enqueue_trial({}, user_attrs={"rung0_chunk": keys[i : i + size], **({"requeued": True} if requeued else {})}, skip_if_exists=False)


def queue_proposals(study: optuna.Study, n: int, requeued: bool = False) -> None:
    """`n` of rung 0's candidates still to be proposed by an adaptive sampler, as work units of up to PROPOSALS."""
    for i in range(0, n, PROPOSALS):
        attrs = {"rung0_chunk": [], "rung0_propose": min(PROPOSALS, n - i), **({"requeued": True} if requeued else {})}
        study.enqueue_trial({}, user_attrs=attrs, skip_if_exists=False)


def search_trials(study: optuna.Study, *states) -> list[optuna.trial.FrozenTrial]:
    """Candidates' trials in these states (all states when none is named)."""
    return [t for t in study.get_trials(deepcopy=False, states=states or None) if "rung" in t.user_attrs]


def work_trials(study: optuna.Study, *states) -> list[optuna.trial.FrozenTrial]:
    """Candidates' trials and rung-0 work units in these states."""
    return [t for t in study.get_trials(deepcopy=False, states=states or None) if "rung" in t.user_attrs or "rung0_chunk" in t.user_attrs]


def earlier_live(study: optuna.Study, trial: optuna.Trial) -> int | None:
    """An earlier trial of the same (rung, architecture, data order) that did not fail: this one is a duplicate."""
    key, rung, order = trial.user_attrs["key"], trial.user_attrs["rung"], trial.user_attrs.get("order", 0)
    for t in study.get_trials(deepcopy=False, states=(WAITING, RUNNING, COMPLETE)):
        a = t.user_attrs
        if t.number < trial.number and a.get("key") == key and a.get("rung") == rung and a.get("order", 0) == order and "duplicate_of" not in a:
            return t.number
    return None
