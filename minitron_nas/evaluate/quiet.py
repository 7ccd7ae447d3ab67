"""lm-eval run quietly and offline: its logs, warnings and bars folded away, the Hub unreachable.

lm-eval, datasets and transformers print to stderr and read the network settings from the
environment at import; scoring an in-memory model on local files needs neither.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from contextlib import contextmanager, redirect_stderr

__all__ = ["offline", "quiet_lm_eval"]


@contextmanager
def quiet_lm_eval(verbose: bool = False):
    """lm-eval, datasets and transformers quiet for the duration: no warnings, logs or per-request bars.

    Their bars and printed warnings go to stderr, which is redirected; the real stderr is
    yielded for the caller's own progress line. `verbose` leaves everything as it is.
    """
    if verbose:
        yield sys.stderr
        return
    real = sys.stderr
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "huggingface_hub", "evaluate", "accelerate")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield real
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def offline():
    """Hugging Face hub and datasets offline for the duration, restored afterwards.

    The libraries read the environment at import, so their module flags are patched too.
    """
    modules = {"huggingface_hub.constants": ("HF_HUB_OFFLINE",), "datasets.config": ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched = []
    for module_name, attrs in modules.items():
        try:
            module = importlib.import_module(module_name)  # import before the environment changes
        except ImportError:
            continue
        patched += [(module, attr, getattr(module, attr)) for attr in attrs if hasattr(module, attr)]
    env_keys = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    try:
        for k in env_keys:
            os.environ[k] = "1"
        for module, attr, _ in patched:
            setattr(module, attr, True)
        yield
    finally:
        for module, attr, old in patched:
            setattr(module, attr, old)
        for k, old in saved_env.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
