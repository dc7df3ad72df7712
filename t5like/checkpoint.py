"""Checkpoints with orbax: async, atomic, keep-N (+ every M-th), resumable.

Each checkpoint step holds three items:
  state   params, optimizer state and step (a pytree, saved sharded)
  data    the data iterator's position (JSON)
  config  the run's config (JSON)
Orbax writes a step into a temporary directory and renames it when complete, so a save that is
killed never becomes the step `latest_step()` returns; leftover temporaries are cleaned at start-up.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from t5like.config import CheckpointConfig, Config, from_dict


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_period or None, create=True,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """Restore the full state into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(abstract_state,
                                         restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state)),
            data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params, e.g. to fine-tune from another run or to generate."""
        item = {"params": abstract_params}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        return restored.state["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def read_config(workdir: str) -> Config:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"workdir={workdir!r} has no config.json: it is not a t5like run directory. "
                                "Pass the workdir a training run wrote.")
    with open(path) as f:
        return from_dict(Config, json.load(f))


def latest_step_or_raise(workdir: str) -> int:
    ckpt = checkpoint_dir(workdir)
    step = Checkpointer(ckpt, CheckpointConfig(async_save=False)).latest_step() if os.path.isdir(ckpt) else None
    if step is None:
        raise FileNotFoundError(f"workdir={workdir!r} has no complete checkpoint in {ckpt}; train first "
                                f"(e.g. python -m experiments.quickstart workdir={workdir}) or pass another workdir.")
    return step


def load_params(workdir: str, abstract_params: Any, step: Optional[int] = None) -> Any:
    step = latest_step_or_raise(workdir) if step is None else step
    ckpt = Checkpointer(checkpoint_dir(workdir), CheckpointConfig(async_save=False))
    try:
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()


def load_for_inference(workdir: str, shard=None):
    """(config, model, tokenizer) from a run's latest checkpoint, on the default device or `shard`'s mesh."""
    from flax import nnx
    from t5like.data import get_tokenizer
    from t5like.models import FAMILIES
    from t5like.sharding import Sharder, state_shardings

    cfg = read_config(workdir)
    step = latest_step_or_raise(workdir)
    shard = shard or Sharder()
    from t5like.finetune import adapt
    abstract = nnx.eval_shape(lambda: adapt(FAMILIES[cfg.model.family](cfg.model, rngs=nnx.Rngs(0), shard=shard), cfg))
    graphdef, abstract_state = nnx.split(abstract)
    if shard.mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract_state.to_pure_dict())
    else:
        shardings = state_shardings(abstract_state, shard).to_pure_dict()
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_state.to_pure_dict(), shardings)
    params = load_params(workdir, target, step)
    nnx.replace_by_pure_dict(abstract_state, params)
    model = nnx.merge(graphdef, abstract_state)
    tokenizer = get_tokenizer(cfg.data, workdir, cfg.model.vocab_size)
    return cfg, model, tokenizer
