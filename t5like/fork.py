"""Cooldown forks (Hägele et al. 2024): a run that starts from step S of another run's checkpoints with that
run's whole state (params, optimizer state, step, data position) and trains on with its own schedule.

    python -m experiments.NAME workdir=FORK checkpoint.fork_from=STABLE checkpoint.fork_step=S \
        optim.schedule=wsd train.steps=T

A stable run (constant lr after warmup) saves step S (checkpoint.keep_steps); a wsd fork of T steps whose
cooldown starts at S then equals the wsd run trained from scratch, because their learning rates agree on
every step before S. On a fresh start the `Fork` plugin checks that, copies the parent's step S into the
fork's own checkpoint directory (atomically: a copy that is killed leaves nothing the fork would read), and
the trainer resumes from it as from its own checkpoint: exactly, and every later restart resumes the fork's
own checkpoints. The sweep runner (launch/runner.py) starts a fork only once its parent has saved step S.
"""
from __future__ import annotations

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5like import storage
from t5like.checkpoint import checkpoint_dir, read_config
from t5like.config import Config, to_dict
from t5like.optim import make_schedule
from t5like.plugins import Plugin

# Settings a fork may set apart from its parent: the schedule's shape after the fork step, its length, how
# it checkpoints, and how it evaluates and reports.
_FREE = {"optim.schedule", "optim.wsd_decay_fraction", "optim.end_lr_fraction", "train.steps", "train.eval_every",
         "train.eval_steps", "train.log_every", "train.progress", "checkpoint", "workdir", "eval"}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if any(key == f or key.startswith(f + ".") for f in _FREE):
            continue
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_fork(cfg: Config) -> Config:
    """The parent's config, after checking that this fork continues it: every setting that shapes the state
    or the data stream equal, step fork_step saved, and the same learning rate on every step before it.
    ValueError naming the difference otherwise, before anything is copied or compiled."""
    src, step = cfg.checkpoint.fork_from, cfg.checkpoint.fork_step
    try:
        parent = read_config(src)
    except FileNotFoundError as e:
        raise ValueError(f"checkpoint.fork_from={src!r}: {e}") from None
    if not storage.step_saved(checkpoint_dir(src), step):
        raise ValueError(f"checkpoint.fork_from={src!r} has no saved checkpoint step {step} (checkpoint.fork_step) in "
                         f"{checkpoint_dir(src)}: train the parent past it with checkpoint.keep_steps={step} (the "
                         "sweep runner waits for it), or fork from a step it has.")
    ours, theirs = _flat(to_dict(cfg)), _flat(to_dict(parent))
    differ = [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} there" for k in sorted(set(ours) | set(theirs))
              if ours.get(k) != theirs.get(k)]
    if differ:
        raise ValueError(f"checkpoint.fork_from={src!r} was trained with other settings: {'; '.join(differ)}. A fork "
                         "continues its parent's run and may change only the schedule after the fork step, "
                         "train.steps and how it checkpoints and evaluates.")
    steps = np.arange(step)
    mine = np.asarray(make_schedule(cfg.optim, cfg.train.steps)(steps))
    theirs_lr = np.asarray(make_schedule(parent.optim, parent.train.steps)(steps))
    off = np.flatnonzero(~np.isclose(mine, theirs_lr, rtol=1e-6, atol=0.0))
    if off.size:
        k = int(off[0])
        raise ValueError(f"checkpoint.fork_step={step}: this run's learning rate at step {k} is {mine[k]:.4g} but the "
                         f"parent's ({parent.optim.schedule}) was {theirs_lr[k]:.4g}, so the fork would not continue "
                         "its run; fork where this schedule's cooldown starts (t5like.config.wsd_decay_steps), after "
                         "the same warmup.")
    return parent


class Fork(Plugin):
    """checkpoint.fork_from + fork_step: a fresh start copies the parent's step into this run's checkpoints,
    and the trainer resumes from it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def check_start(self, resuming: bool) -> None:
        if resuming:  # the fork's own checkpoints: the parent may since have moved
            return
        check_fork(self.cfg)
        src, step = self.cfg.checkpoint.fork_from, self.cfg.checkpoint.fork_step
        if jax.process_index() == 0:  # one copy; a multi-host run's workdir is shared storage (gs://)
            storage.copy_step(checkpoint_dir(src), checkpoint_dir(self.cfg.workdir), step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("t5like: fork copied")
        print(f"forked from {checkpoint_dir(src)} at step {step}", file=sys.stderr)
