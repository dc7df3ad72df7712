"""Checkpoints with orbax: async, atomic, keep-N (+ every M-th), resumable, local or on `gs://`.

`checkpoint.keep_steps` are saved and kept beside the last `keep` (a cooldown fork starts from them).

Each checkpoint step holds three items:
  state   params, optimizer state, step, and every host's data-iterator position (a pytree, saved sharded)
  config  the run's config (JSON)
A step only counts once orbax has finalised it (a rename locally, a commit marker on Cloud Storage), so a
save that is killed never becomes the step `latest_step()` returns. A step that was finalised but later
damaged (a truncated or deleted file) is skipped on resume with a warning naming it, and moved aside to
WORKDIR/unreadable_checkpoints/ so the run can write that step again. With several hosts, each host reads
its own shards, so damage may show on one host only: the hosts agree on the newest step that reads back on
every host. Read-only uses (init_from, generate, export) fall back the same way but move nothing.
A checkpoint whose state tree differs from the config's (e.g. a setting that adds optimizer state) is not
damage: it is refused as a config mismatch (CheckpointMismatch), and nothing is moved.

The data position is per host: host h's iterator state is row h of a [hosts, bytes] uint8 array in the
state pytree, so each host saves and restores its own, in the same atomic step as the params.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from t5like import storage
from t5like.config import CheckpointConfig, Config, from_dict


class UnreadableCheckpoint(ValueError):
    """No finalised checkpoint step could be read back."""


class CheckpointMismatch(ValueError):
    """A readable checkpoint whose state tree is not the one this config builds: a config change, not damage."""


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
        if cfg.keep_steps:  # orbax takes a preservation policy instead of its keep options, not beside them
            policies = [ocp.checkpoint_managers.LatestN(cfg.keep), ocp.checkpoint_managers.CustomSteps(cfg.keep_steps)]
            if cfg.keep_period:
                policies.append(ocp.checkpoint_managers.EveryNSteps(cfg.keep_period))
            keep = dict(preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
        else:
            keep = dict(max_to_keep=cfg.keep, keep_period=cfg.keep_period or None)
        options = ocp.CheckpointManagerOptions(
            **keep, create=True, enable_async_checkpointing=cfg.async_save, cleanup_tmp_directories=True)
        self.directory = directory
        # One process holds every replica of every array: orbax's replica-parallel saving would only cut each
        # replicated array into per-replica slices (an eager op each) for this same process to write.
        self.state_handler = (ocp.PyTreeCheckpointHandler() if jax.process_count() > 1 else
                              ocp.PyTreeCheckpointHandler(type_handler_registry=_OneProcessTypeHandlers()))
        self.manager = ocp.CheckpointManager(
            _absolute(directory), options=options,
            item_handlers={"state": self.state_handler, "config": ocp.JsonCheckpointHandler()})

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
        self._check_tree(step, meta, abstract_state)
        replicated = NamedSharding(_host_mesh(), P())
        item = {**abstract_state, "data": jax.ShapeDtypeStruct(saved, np.uint8, sharding=replicated)}
        state = dict(self._read_state(step, ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item))))
        return state, decode_host_states(np.asarray(state.pop("data")))

    def _read_state(self, step: int, args: ocp.args.PyTreeRestore) -> Any:
        """This host's read of a step's state item. Through the handler, not the manager: orbax's restore ends
        in a barrier of all hosts, where the others would wait forever for a host whose read failed."""
        return self.state_handler.restore(storage.path(_absolute(self.directory)) / str(step) / "state", args=args)

    def _check_tree(self, step: int, meta: Any, abstract_state: Any) -> None:
        """CheckpointMismatch, before any array is read, when the saved state's leaves are not this config's."""
        saved = {path for path in _leaf_paths(meta) if path[0] != "data"}
        wanted = _leaf_paths(abstract_state)
        if saved == wanted:
            return
        only_saved, only_here = sorted(saved - wanted), sorted(wanted - saved)
        parts = [tree for tree in ("params", "opt_state", "step")
                 if any(p[0] == tree for p in only_saved + only_here)]
        show = lambda paths: ", ".join("/".join(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
        raise CheckpointMismatch(
            f"checkpoint step {step} in {self.directory} is readable but holds a different {' and '.join(parts)} "
            f"tree than this config builds (only in the checkpoint: {show(only_saved) or 'nothing'}; only in this "
            f"config: {show(only_here) or 'nothing'}). A setting that shapes the model or optimizer state changed "
            "(e.g. model.*, optim.name, optim.grad_clip on/off, optim.weight_decay on/off with adafactor, "
            "finetune.*). Rerun with the settings the checkpoint was trained with, or use a new workdir "
            "(checkpoint.init_from=OLD_WORKDIR starts from its params).")

    def restore_latest_readable(self, abstract_state: Any) -> tuple[Optional[int], Any, list[dict]]:
        """Restore the newest step that reads back whole on every host; warn about each newer one that does
        not, and move those aside. (None, None, []) when there is no finalised step at all."""
        step, restored, bad = self._newest_readable(lambda s: self.restore(s, abstract_state))
        if step is None and bad:
            raise UnreadableCheckpoint(
                f"no checkpoint in {self.directory} reads back (steps {bad} are damaged). Delete those step "
                "directories to start this run from scratch, or restore them from a copy.")
        if step is None:
            return None, None, []
        if bad:
            aside = self._set_aside(bad)
            print(f"warning: resuming from step {step}, not from the unreadable step(s) {bad}, which were moved "
                  f"to {aside} (the run will write those steps again).", file=sys.stderr)
        return (step, *restored)

    def restore_params_latest_readable(self, abstract_params: Any) -> tuple[Optional[int], Any]:
        """The params of the newest step that reads back, for a read-only use of a run (init_from, generate,
        export): damaged newer steps are warned about and left where they are. (None, None) without steps."""
        step, params, bad = self._newest_readable(lambda s: self.restore_params(s, abstract_params))
        if step is None and bad:
            raise UnreadableCheckpoint(
                f"no checkpoint in {self.directory} reads back (steps {bad} are damaged); restore them from a copy, "
                "or use another run.")
        if bad:
            print(f"warning: using step {step}, not the unreadable step(s) {bad} of {self.directory} (left in "
                  "place: resuming that run moves them aside).", file=sys.stderr)
        return step, params

    def _newest_readable(self, read: Callable[[int], Any]) -> tuple[Optional[int], Any, list[int]]:
        """(step, read(step), newer unreadable steps) for the newest step that `read` reads on every host.
        Each host reads its own shards, so one host may fail where another succeeds: every attempt is followed
        by a vote, so that all hosts take the same step (or all fail), rather than resuming from different ones."""
        bad = []
        for step in reversed(_steps_on_every_host(self.all_steps())):
            try:
                value, error = read(step), None
            except CheckpointMismatch:
                raise  # a config change, the same on every host: not damage
            except Exception as e:  # orbax/tensorstore raise many types for a torn step
                value, error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            failed = _hosts_where(error is not None)
            if not failed:
                return step, value, bad
            where = "" if jax.process_count() == 1 else f" on host(s) {failed}"
            reason = f" ({error})" if error is not None else ""
            print(f"warning: checkpoint step {step} in {self.directory} is unreadable{where}{reason}; trying an "
                  "older step.", file=sys.stderr)
            bad.append(step)
        return None, None, bad

    def _set_aside(self, steps: list[int]) -> str:
        """Move damaged steps out of the checkpoint directory (the run will save those step numbers again),
        into a sibling `unreadable_checkpoints/`, keeping their bytes for a post-mortem."""
        aside = storage.join(storage.path(self.directory).parent, "unreadable_checkpoints")
        if jax.process_index() == 0:
            for step in steps:
                storage.move_tree(storage.join(self.directory, str(step)),
                                  storage.join(aside, f"{step}-{int(time.time())}"))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("t5like: unreadable checkpoints set aside")
        self.manager.reload()
        return aside

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the params, e.g. to fine-tune from another run or to generate."""
        item = {"params": abstract_params}
        return self._read_state(step, ocp.args.PyTreeRestore(
            item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _steps_on_every_host(steps: list[int]) -> list[int]:
    """The steps every host lists (sorted). Hosts that list different steps would otherwise try a different
    number of them and wait for each other's votes forever."""
    if jax.process_count() == 1:
        return steps
    width = int(np.max(multihost_utils.process_allgather(np.array(len(steps)))))
    if width == 0:
        return []
    row = np.full(width, -1, np.int64)
    row[:len(steps)] = steps
    rows = multihost_utils.process_allgather(row)
    return sorted(set.intersection(*(set(r.tolist()) for r in rows)) - {-1})


def _hosts_where(flag: bool) -> list[int]:
    """The indices of the hosts where `flag` is true (a collective: every host must call it)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    flags = multihost_utils.process_allgather(np.array(int(flag), np.int32))
    return [int(h) for h in np.flatnonzero(flags)]


def _leaf_paths(tree: Any) -> set[tuple[str, ...]]:
    """Leaf paths as tuples of names, the same for a pytree of arrays and orbax's metadata of it (which keeps
    dicts as dicts, and namedtuples and tuples as lists or dicts keyed by field/index)."""
    def name(k):
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                return str(getattr(k, attr))
        return str(k)
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {tuple(name(k) for k in path) for path, leaf in leaves if leaf is not None}


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
    """The params of `step`, or of the newest step that reads back (warning about damaged newer ones)."""
    if step is None:
        latest_step_or_raise(workdir)
    ckpt = Checkpointer(checkpoint_dir(workdir), CheckpointConfig(async_save=False))
    try:
        if step is None:
            return ckpt.restore_params_latest_readable(abstract_params)[1]
        return ckpt.restore_params(step, abstract_params)
    finally:
        ckpt.close()
