"""The capabilities a config turns on, as plugins of the trainer's seam (t5like/plugins.py).

The trainer, inference loading and the AOT compile all build their plugins here, so each sees the same
model tree and optimizer. A new capability (µP, DPO, in-loop eval, profiles) is one line in `plugins_for`.
"""
from __future__ import annotations

from typing import Sequence

from t5like.config import Config
from t5like.finetune import FineTuning, InitFrom
from t5like.models import abstract_model
from t5like.parametrization import Parametrization
from t5like.plugins import Plugin, Plugins


def plugins_for(cfg: Config, extra: Sequence[Plugin] = ()) -> Plugins:
    """The plugins of `cfg`, in the order they apply, then `extra` (a caller's own)."""
    # The parametrization's init comes first: init_from then overwrites what it loads (a µP run's own params).
    plugins: list[Plugin] = [Parametrization(cfg, lambda model: abstract_model(model)[1]), FineTuning(cfg)]
    if cfg.checkpoint.init_from:
        plugins.append(InitFrom(cfg))
    return Plugins([*plugins, *extra])
