"""Checkpoints with orbax: async, atomic, keep-N (+ every M-th), resumable, local or on `gs://`.

Each checkpoint step holds three items:
  state   params, optimizer state, step, and every host's data-iterator position (a pytree, saved sharded)
  config  the run's config (JSON)
A step only counts once orbax has finalised it (a rename locally, a commit marker on Cloud Storage), so a
save that is killed never becomes the step `latest_step()` returns. A step that was finalised but later
damaged (a truncated or deleted file) is skipped on resume with a warning naming it, and moved aside to
WORKDIR/unreadable_checkpoints/ so the run can write that step again.

The data position is per host: host h's iterator state is row h of a [hosts, bytes] uint8 array in the
state pytree, so each host saves and restores its own, in the same atomic step as the params.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from t5like import storage
from t5like.config import CheckpointConfig, Config, from_dict


class UnreadableCheckpoint(Exception):
    """No finalised checkpoint step could be read back."""


class _OneProcessTypeHandlers(ocp.type_handlers.TypeHandlerRegistry):
    """orbax's standard type handlers, but jax.Arrays are saved whole, not in replica-parallel slices."""

    def __init__(self):
        # orbax exports no public name for the array-metadata store its default ArrayHandler gets.
        from orbax.checkpoint._src.metadata.array_metadata_store import Store
        self._array = ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=Store())

    def get(self, ty: Any) -> Any:
        if ty == self._array.typestr() or (isinstance(ty, type) and issubclass(ty, jax.Array)):
            return self._array
        return ocp.type_handlers.get_type_handler(ty)

    def has(self, ty: Any) -> bool:
        try:
            self.get(ty)
            return True
        except ValueError:
            return False

    def add(self, *args, **kwargs):
        raise NotImplementedError("a fixed registry; register handlers with orbax instead")


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, keep_period=cfg.keep_period or None, create=True,
            enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
        self.directory = directory
        # One process holds every replica of every array: orbax's replica-parallel saving would only cut each
        # replicated array into per-replica slices (an eager op each) for this same process to write.
        state = (ocp.PyTreeCheckpointHandler() if jax.process_count() > 1 else
                 ocp.PyTreeCheckpointHandler(type_handler_registry=_OneProcessTypeHandlers()))
        self.manager = ocp.CheckpointManager(
            _absolute(directory), options=options,
            item_handlers={"state": state, "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, config: dict) -> None:
        item = {**state, "data": host_states_array(data_state)}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(item),
                                                         config=ocp.args.JsonSave(config)), force=True)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, list[dict]]:
        """The full state in the shardings of `abstract_state` (ShapeDtypeStructs), and the data positions
        saved by every host (a list, one per host of the run that saved it)."""
        meta = self.manager.item_metadata(step).state
        saved = meta["data"].shape if meta is not None and "data" in meta else None
        if saved is None:
            raise ValueError(f"checkpoint step {step} in {self.directory} has no data positions")
        replicated = NamedSharding(_host_mesh(), P())
        item = {**abstract_state, "data": jax.ShapeDtypeStruct(saved, np.uint8, sharding=replicated)}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
        state = dict(restored.state)
        return state, decode_host_states(np.asarray(state.pop("data")))

    def restore_latest_readable(self, abstract_state: Any) -> tuple[Optional[int], Any, list[dict]]:
        """Restore the newest step that reads back whole; warn about each newer one that does not.
        (None, None, []) when there is no finalised step at all."""
        steps = self.all_steps()
        bad = []
        for step in reversed(steps):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # orbax/tensorstore raise many types for a torn step
                print(f"warning: checkpoint step {step} in {self.directory} is unreadable "
                      f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); trying an older step.", file=sys.stderr)
                bad.append(step)
                continue
            if bad:
                aside = self._set_aside(bad)
                print(f"warning: resuming from step {step}, not from the unreadable step(s) {bad}, which were moved "
                      f"to {aside} (the run will write those steps again).", file=sys.stderr)
            return step, state, data
        if bad:
            raise UnreadableCheckpoint(
                f"no checkpoint in {self.directory} reads back (steps {bad} are damaged). Delete those step "
                "directories to start this run from scratch, or restore them from a copy.")
        return None, None, []

    def _set_aside(self, steps: list[int]) -> str:
        """Move damaged steps out of the checkpoint directory (the run will save those step numbers again),
        into a sibling `unreadable_checkpoints/`, keeping their bytes for a post-mortem."""
        aside = storage.join(storage.path(self.directory).parent, "unreadable_checkpoints")
        if jax.process_index() == 0:
            storage.makedirs(aside)
            for step in steps:
                target = storage.path(aside) / f"{step}-{int(time.time())}"
                (storage.path(self.directory) / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("t5like: unreadable checkpoints set aside")
        self.manager.reload()
        return aside

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


def _absolute(directory: str) -> str:
    return directory if storage.is_remote(directory) else str(storage.path(directory).resolve())


def _host_mesh() -> jax.sharding.Mesh:
    """All devices as [hosts, devices per host]: row h lives on host h's devices."""
    devices = np.array(jax.devices()).reshape(jax.process_count(), jax.local_device_count())
    return jax.sharding.Mesh(devices, ("hosts", "local"))


def host_states_array(data_state: dict) -> jax.Array:
    """This host's data position as JSON bytes, gathered into one global [hosts, bytes] uint8 array."""
    mine = np.frombuffer(json.dumps(data_state, sort_keys=True).encode(), np.uint8)
    width = int(np.max(multihost_utils.process_allgather(np.array(len(mine))))) if jax.process_count() > 1 \
        else len(mine)
    row = np.zeros((1, width), np.uint8)
    row[0, :len(mine)] = mine
    sharding = NamedSharding(_host_mesh(), P("hosts"))
    return jax.make_array_from_process_local_data(sharding, row, (jax.process_count(), width))


def decode_host_states(array: np.ndarray) -> list[dict]:
    return [json.loads(bytes(row[row != 0]).decode()) for row in array]


def checkpoint_dir(workdir: str) -> str:
    return storage.join(workdir, "checkpoints")


def read_config(workdir: str) -> Config:
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"workdir={workdir!r} has no config.json: it is not a t5like run directory. "
                                "Pass the workdir a training run wrote.")
    return from_dict(Config, json.loads(storage.read_text(path)))


def latest_step(workdir: str) -> Optional[int]:
    """The newest finalised checkpoint step in a workdir, or None."""
    ckpt = checkpoint_dir(workdir)
    if not storage.exists(ckpt):
        return None
    manager = Checkpointer(ckpt, CheckpointConfig(async_save=False))
    try:
        return manager.latest_step()
    finally:
        manager.close()


def latest_step_or_raise(workdir: str) -> int:
    step = latest_step(workdir)
    if step is None:
        raise FileNotFoundError(f"workdir={workdir!r} has no complete checkpoint in {checkpoint_dir(workdir)}; train "
                                f"first (e.g. python -m experiments.quickstart workdir={workdir}) or pass another "
                                "workdir.")
    return step


def load_params(workdir: str, abstract_params: Any, step: Optional[int] = None) -> Any:
    step = latest_step_or_raise(workdir) if step is None else step
    ckpt = Checkpointer(checkpoint_dir(workdir), CheckpointConfig(async_save=False))
    try:
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()
