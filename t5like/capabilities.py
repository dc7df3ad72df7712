"""The capabilities a config turns on, as plugins of the trainer's seam (t5like/plugins.py).

The trainer, inference loading and the AOT compile all build their plugins here, so each sees the same
model tree and optimizer. A new capability (µP, DPO, in-loop eval, profiles) is one line in `plugins_for`.
"""
from __future__ import annotations

from typing import Sequence

from t5like.config import Config
from t5like.eval.plugin import Evaluation
from t5like.finetune import FineTuning, InitFrom, with_source_settings
from t5like.fork import Fork
from t5like.goodput import Goodput
from t5like.models import abstract_model
from t5like.parametrization import Parametrization
from t5like.plugins import Plugin, Plugins
from t5like.preference import PreferenceTuning
from t5like.profiles import Profile
from t5like.wandb_log import WandB


def plugins_for(cfg: Config, extra: Sequence[Plugin] = ()) -> Plugins:
    """The plugins of `cfg`, in the order they apply, then `extra` (a caller's own)."""
    # The parametrization's init comes first: init_from then overwrites what it loads (a µP run's own params).
    plugins: list[Plugin] = [Parametrization(cfg, lambda model: abstract_model(model)[1]), FineTuning(cfg)]
    if cfg.checkpoint.init_from:
        plugins.append(InitFrom(cfg))
    if cfg.checkpoint.fork_from:
        plugins.append(Fork(cfg))
    if cfg.data.objective == "dpo":  # after init_from: its reference copy is the loaded starting point
        plugins.append(PreferenceTuning(cfg))
    if cfg.data.named_eval_sets() or cfg.eval.tasks:  # after the plugins that add modules: it evaluates their model
        plugins.append(Evaluation(cfg))
    plugins.append(Goodput(cfg))  # every run accounts for its time
    if cfg.train.profile_steps:
        plugins.append(Profile(cfg))
    if cfg.train.wandb_project:  # last: it logs the rows and summary the others made
        plugins.append(WandB(cfg))
    return Plugins([*plugins, *extra])


def with_inherited_settings(cfg: Config, explicit: set[str]) -> Config:
    """`cfg` with the settings its capabilities take from elsewhere, except the keys in `explicit` (those
    the command line gave): checkpoint.init_from's model settings and tokenizer."""
    return with_source_settings(cfg, explicit)
