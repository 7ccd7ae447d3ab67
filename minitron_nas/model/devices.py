"""Where models run and in which dtype: one choice, resolved once, honoured by every stage.

`placement("auto", "auto")` is CUDA + bfloat16 when a GPU is present (the local rank's GPU
under `accelerate launch`) and CPU + float32 otherwise. `to_model_device` is the one road
from a batch to a model: every stage moves its token blocks through it, so a model placed
on a GPU never receives host tensors. `check_fits` refuses a teacher that cannot fit before
any weight is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import psutil
import torch

from minitron_nas.config.space import check_device_name, check_dtype_name
from minitron_nas.errors import MinitronError
from minitron_nas.model.architecture import Architecture, ParamCounter

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype."""

    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device} / {str(self.dtype).removeprefix('torch.')}"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> this process's GPU if there is one, else the CPU; a missing GPU is refused."""
    if isinstance(device, torch.device):
        return device
    check_device_name(device)
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if device == "auto":
            return torch.device("cpu")
        raise MinitronError(
            f"device '{device}' was asked for but torch {torch.__version__} sees no CUDA GPU: "
            "use --device cpu, or install the CUDA build of torch on a GPU machine"
        )
    count = torch.cuda.device_count()
    if device in ("auto", "cuda"):
        index = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))  # one GPU per process
    else:
        index = int(device.split(":")[1])
    if index >= count:
        raise MinitronError(f"device 'cuda:{index}' does not exist: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | None = None) -> torch.dtype:
    """'auto' -> bfloat16 on a GPU that supports it (else float16), float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype_name(dtype)
    if dtype != "auto":
        return DTYPES[dtype]
    device = resolve_device("auto") if device is None else device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def placement(device: str | torch.device = "auto", dtype: str | torch.dtype = "auto") -> Placement:
    resolved = resolve_device(device)
    return Placement(resolved, resolve_dtype(dtype, resolved))


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer): where its inputs must live."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    for tensor in model.parameters():
        return tensor.dtype
    return torch.float32


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors (also inside tuples, lists and dicts) moved to `device`; anything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=batch.is_pinned())
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def to_model_device(batch: Any, model: torch.nn.Module) -> Any:
    """`batch` on the device of `model`: the one way a batch reaches a model."""
    return to_device(batch, model_device(model))


def process_count() -> int:
    """Processes training together: 1 alone, N under `accelerate launch --num_processes N`."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main_process() -> bool:
    """True alone, and on rank 0 under `accelerate launch`: the process that writes shared files."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from accelerate import PartialState  # accelerate: only when processes are asked about

    return PartialState().is_main_process


def wait_for_everyone() -> None:
    """A barrier under `accelerate launch`; nothing alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # accelerate: only when processes are asked about

        PartialState().wait_for_everyone()


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device`: the GPU's free memory, or available host memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def weight_bytes(config, dtype: torch.dtype) -> int:
    """Bytes the weights of `config` take in `dtype`: exact parameter count x bytes per value."""
    count = ParamCounter(config).count(Architecture.from_config(config)).total
    return count * torch.empty((), dtype=dtype).element_size()


def check_fits(config, place: Placement, name: str = "the teacher") -> int:
    """Refuse, before loading, weights that do not fit in the free memory of the device."""
    needed = weight_bytes(config, place.dtype)
    free = free_bytes(place.device)
    if needed > free:
        where = "free GPU memory" if place.device.type == "cuda" else "available host memory"
        raise MinitronError(
            f"{name} needs {needed / 2**30:.1f} GiB for its weights in {str(place.dtype).removeprefix('torch.')} "
            f"on {place.device} but only {free / 2**30:.1f} GiB of {where} is left: use a GPU with more memory, "
            "--dtype bfloat16, or a smaller teacher"
        )
    return needed
