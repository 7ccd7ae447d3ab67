"""A search space: the sections of a space file as typed dataclasses (no torch).

A space names the teacher, the allowed values of each axis, the budget, and how candidates
are retrained and scored. The stage settings (ranking, retrain, distill) are in settings.py,
the reader in loader.py, the value checks in checks.py; enumeration is search.candidates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from minitron_nas.config.settings import DistillSettings, RankSettings, RetrainSettings
from minitron_nas.errors import MinitronError

RUNG_METRICS = ("kld", "heldout_loss")
METRICS = ("lm_eval", "heldout_loss", "kld")
SAMPLER_NAMES = ("auto", "grid", "random", "tpe")  # search.samplers.SAMPLERS, by name
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")  # model.devices.DTYPES, by name
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
AXES = ("hidden_size", "intermediate_size", "heads_per_group", "num_key_value_heads", "num_hidden_layers")
MOE_AXES = ("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size")  # MoE teachers only
HYBRID_AXES = ("mamba_num_heads", "mamba_head_dim", "num_mamba_layers", "num_attention_layers", "num_mlp_layers")  # hybrid teachers only
FAMILY_AXES = MOE_AXES + HYBRID_AXES
BUDGET_COUNTS = ("total", "non_embedding", "active")


def check_device_name(device: str) -> None:
    """Syntax only (no GPU query): auto, cpu, cuda or cuda:N."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise MinitronError(f"device '{device}' is not understood: use auto, cpu, cuda or cuda:N")


def check_dtype_name(dtype: str) -> None:
    if not isinstance(dtype, str) or (dtype != "auto" and dtype not in DTYPE_NAMES):
        raise MinitronError(f"dtype '{dtype}' is not understood: use auto, bfloat16, float16 or float32")


@dataclass(frozen=True)
class Budget:
    parameters: int
    count: str = "total"  # or "non_embedding", or "active" (per token: top-k experts, MoE)
    tolerance: float = 0.05  # relative, on both sides of the target
    memory_gb: float | None = None  # weights + KV cache, optional second limit
    context: int = 4096
    batch: int = 1
    bytes_per_value: int = 2


@dataclass(frozen=True)
class HalvingSettings:
    """How the search spends its retraining tokens: synchronous successive halving (halving.py)."""

    eta: int = 3
    """Each rung keeps the best 1/eta of its candidates; the next rung retrains them on eta x the tokens."""
    budget_tokens: int | None = None
    """Training tokens the whole search may spend; None: `budget_fraction` of `distill.tokens`."""
    budget_fraction: float | None = None
    """The search's budget as a fraction of the final distillation's tokens, e.g. 0.25 (with
    neither budget: as many halvings as keep `final_candidates`, the last at `retrain.tokens`)."""
    rung_metric: str = "kld"
    """What the rungs before the last compare on, at equal tokens: kld or heldout_loss. Rung 0 scores
    every candidate pruned on it (forward passes only)."""
    retrained: int | None = None
    """How many of rung 0's best are retrained (None: final_candidates x eta^2, fewer if the budget
    asks); 0: no retraining, the search is pruned scoring over the whole set."""
    min_steps: int = 4
    """Fewest optimizer steps of a retraining rung (4 or more: warm-up, stable and decay each need some)."""
    final_candidates: int = 2
    """Fewest candidates the last rung keeps (ranked there by `scoring.metric`)."""
    within_noise: float = 0.5
    """Candidates within one standard error of a rung's cut line go on too, up to this share of those
    promoted by rank (their tokens are reserved in the budget)."""
    order_pilot: int = 2
    """More data orders of rung 1's first candidate, trained to measure the data-order term of every
    retraining rung's standard error; 0: leave that term out."""

    def budget(self, distill_tokens: int) -> int | None:
        if self.budget_tokens is not None:
            return self.budget_tokens
        return None if self.budget_fraction is None else int(self.budget_fraction * distill_tokens)


@dataclass(frozen=True)
class LatencySettings:
    """Inference speed of each candidate on the run's device (latency.py), a constraint if asked."""

    measure: bool = False
    """Measure prefill and decode throughput of every candidate at rung 0."""
    batch_size: int = 1
    """Sequences per forward pass."""
    context: int = 256
    """Prompt tokens per sequence (prefill)."""
    new_tokens: int = 32
    """Tokens generated per sequence through the KV cache (decode)."""
    repeats: int = 3
    """Timed repeats; the median is kept (one untimed warm-up first)."""
    min_decode_tokens_per_s: float | None = None
    """Candidates that decode slower than this are stopped at rung 0 and never promoted (implies measure)."""

    @property
    def active(self) -> bool:
        return self.measure or self.min_decode_tokens_per_s is not None


@dataclass(frozen=True)
class ScoringSettings:
    """How a candidate is scored: lm-eval tasks, held-out loss, or KL divergence to the teacher."""

    metric: str = "heldout_loss"
    """lm_eval, heldout_loss or kld."""
    tasks: tuple[str, ...] = ()
    """lm-eval task, group or tag names: any lm-eval knows, or one defined under include_path."""
    limit: int | dict[str, int] | None = None
    """Documents scored per task (the first N), one number or {task: N}; None scores all."""
    num_fewshot: int | dict[str, int] | None = None
    """Few-shot examples per prompt, one number or {task: n}; None keeps each task's default (0 for most)."""
    include_path: tuple[str, ...] = ()
    """Folders or YAML files of your own lm-eval task configs (lm-eval's --include_path)."""
    objective: str | dict[str, float] | None = None
    """'task/metric', or {'task/metric': weight} for a weighted mean; None: mean over tasks of acc_norm (else acc)."""
    batch_size: int = 16
    """lm-eval requests per forward pass."""
    data_dir: str | None = None
    """Folder of upstream benchmark files: the seven converted tasks are scored from it offline.
    None: lm-eval loads every task itself (the Hugging Face Hub, or its cache when offline)."""
    tasks_optional: bool = False
    """True: when data_dir is missing, score on held-out KL divergence instead of refusing the space."""
    heldout_samples: int = 32
    """Held-out blocks for heldout_loss and kld (their standard errors are over blocks)."""
    seq_len: int = 256
    """Tokens per held-out block."""

    def __post_init__(self):
        # YAML gives lists and single strings; keep the frozen spec's sequences immutable
        if isinstance(self.tasks, (list, str)):  # 'arc_easy,piqa' as on the command line
            names = self.tasks.split(",") if isinstance(self.tasks, str) else self.tasks
            object.__setattr__(self, "tasks", tuple(n.strip() if isinstance(n, str) else n for n in names if n != ""))
        if isinstance(self.include_path, (list, str)):
            object.__setattr__(self, "include_path", tuple(self.include_path) if isinstance(self.include_path, list) else (self.include_path,))


@dataclass(frozen=True)
class DeviceSettings:
    """Where every stage runs and in which dtype the teacher (and so every student) is held."""

    device: str = "auto"
    """auto (this process's GPU if any, else the CPU), cpu, cuda or cuda:N."""
    dtype: str = "auto"
    """auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32."""

    def __post_init__(self):
        check_device_name(self.device)  # syntax only: whether the GPU exists is asked where a model loads
        check_dtype_name(self.dtype)


@dataclass(frozen=True)
class SearchSpace:
    teacher: str
    axes: dict[str, tuple[int, ...]]
    budget: Budget
    ranking: RankSettings = RankSettings()
    retrain: RetrainSettings = RetrainSettings()
    scoring: ScoringSettings = ScoringSettings()
    distill: DistillSettings = DistillSettings()
    halving: HalvingSettings = HalvingSettings()
    latency: LatencySettings = LatencySettings()
    device: DeviceSettings = DeviceSettings()
    family: tuple[int, ...] = ()  # several budgets: each pruned from the previous, largest first
    sampler: str = "auto"
    trials: int | None = None
    seed: int = 0
    source: str = field(default="", compare=False)
