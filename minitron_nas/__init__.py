"""minitron_nas: smaller, accurate models from one trained causal LM (Minitron recipe).

The Python API mirrors the CLI stages:

    teacher = load_teacher("smollm2-135m")
    blocks = token_blocks("shakespeare", teacher.tokenizer, seq_len=256, max_blocks=64)
    rankings = compute_rankings(teacher.model, blocks)
    arch = Architecture.from_dict({"intermediate_size": 768}, Architecture.from_config(teacher.model.config))
    student = prune(teacher.model, rankings, arch)
"""

from .architecture import Architecture, ParamCount, ParamCounter
from .data import token_blocks
from .errors import MinitronError
from .export import save_model
from .pruning import prune, select
from .ranking import Aggregation, Rankings, compute_rankings, layer_drop_losses
from .scoring import lm_loss
from .teachers import Teacher, load_config, load_teacher

__all__ = [
    "Aggregation",
    "Architecture",
    "MinitronError",
    "ParamCount",
    "ParamCounter",
    "Rankings",
    "Teacher",
    "compute_rankings",
    "layer_drop_losses",
    "lm_loss",
    "load_config",
    "load_teacher",
    "prune",
    "save_model",
    "select",
    "token_blocks",
]
