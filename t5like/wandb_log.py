"""Weights & Biases (train.wandb_project), as a plugin of the trainer's seam (t5like/plugins.py).

A writer beside TensorBoard and metrics.jsonl: host 0 logs the config at start, every metrics row (training
and eval) at its step, and summary.json's entries at the end. The run's id is kept in WORKDIR/wandb_run_id, so
a resumed run continues the same W&B run (wandb.init(id=..., resume="allow")). Steps redone after a kill are
logged again with the same step numbers. W&B's own settings come from its environment variables
(WANDB_MODE=offline, WANDB_ENTITY, WANDB_DIR, WANDB_API_KEY); its files go to WORKDIR/wandb unless WANDB_DIR
says otherwise, or to a local temporary directory for a gs:// workdir.
"""
from __future__ import annotations

import os
import tempfile

import jax

from t5like import storage
from t5like.config import Config, to_dict
from t5like.plugins import Plugin


def run_id_path(workdir: str) -> str:
    return storage.join(workdir, "wandb_run_id")


class WandB(Plugin):
    """Logs config, metrics rows and the summary to W&B from host 0."""

    def __init__(self, cfg: Config):
        self.cfg, self.run = cfg, None

    def check_start(self, resuming: bool) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError(f"train.wandb_project={self.cfg.train.wandb_project!r} needs the wandb package: pip "
                             "install 't5like[wandb]' (or set train.wandb_project='' to log without W&B).") from None
        if jax.process_index() != 0:
            return
        workdir = self.cfg.workdir
        path = run_id_path(workdir)
        run_id = storage.read_text(path).strip() if storage.exists(path) else None  # None: W&B makes one
        local = os.environ.get("WANDB_DIR") or (tempfile.mkdtemp(prefix="t5like-wandb-")
                                                if storage.is_remote(workdir) else workdir)
        os.makedirs(local, exist_ok=True)  # wandb falls back to a temporary directory when it is missing
        self.run = wandb.init(project=self.cfg.train.wandb_project, id=run_id, resume="allow", dir=local,
                              name=os.path.basename(os.path.normpath(workdir)), config=to_dict(self.cfg))
        if run_id is None:
            storage.write_atomic(path, self.run.id)

    def on_log(self, step: int, row: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=step)

    on_eval_row = on_log  # eval rows go to W&B as the training rows do

    def on_finish(self, summary: dict) -> None:
        if self.run is not None:
            self.run.summary.update(summary)
            self.run.finish()
            self.run = None
