"""Device mesh and the one rules table that maps logical axis names onto it.

Parameters carry logical names (`vocab, embed, mlp, heads, kv_heads, head_dim, layers`) and
activations are constrained by theirs (`batch, length, act_embed, act_heads, act_mlp, act_vocab`).
Activation names differ from parameter names so that, under FSDP, `embed` can be sharded in the
weights while activations keep their embedding dimension whole.

DP, FSDP and TP are choices of mesh shape and rules, never of model code:
  DP:      mesh data=-1                  (batch over `data`)
  FSDP:    mesh fsdp=-1                  (batch and weights' `embed` over `fsdp`)
  TP:      mesh tensor=N                 (heads, mlp and vocab over `tensor`)
  CP:      mesh context=N                (activations' `length` over `context`; attention all-gathers K/V)
The mesh axes are Auto (GSPMD propagation). JAX >= 0.7 defaults `make_mesh` to Explicit axes,
so we say which we want.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from t5like.config import MeshConfig

# `context` sits next to `tensor`, inside fsdp: its per-layer K/V all-gathers want fast links too.
MESH_AXES = ("data", "fsdp", "context", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("relative_buckets", None),
    ("classes", None),
)

# Logical names that replicate, by design, over a mesh axis that does not divide them. With GQA/MQA
# there may be fewer kv heads than `tensor` shards; copying K/V per shard is the standard answer
# (Megatron, MaxText). Every other name that does not divide is an error: no silent replication.
REPLICATE_IF_INDIVISIBLE = frozenset({"kv_heads", "act_kv_heads"})


def validate_rules(rules: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Each rule names existing mesh axes only."""
    out = []
    for item in rules:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"mesh.rules entry {item!r} must be a (logical_name, mesh_axes) pair.")
        name, axes = item
        for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"mesh.rules maps {name!r} to mesh axis {axis!r}, which does not exist; "
                                 f"mesh axes are {list(MESH_AXES)} (or None to replicate).")
        out.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
    """Resolve -1 and check that the mesh covers exactly the devices there are (in MESH_AXES order)."""
    shape = [cfg.data, cfg.fsdp, cfg.context, cfg.tensor]
    for name, size in zip(MESH_AXES, shape):
        if size == 0 or size < -1:
            raise ValueError(f"mesh.{name}={size} must be a positive integer or -1 (all remaining devices).")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh (data, fsdp, context, tensor)={tuple(shape)} has more than one -1; set all but one.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh (data, fsdp, context, tensor)={tuple(shape)}: the fixed axes ({known}) do not divide "
                             f"the {num_devices} devices; choose sizes whose product divides {num_devices}.")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh (data, fsdp, context, tensor)={tuple(shape)} has {math.prod(shape)} devices but "
                         f"{num_devices} are available; make the product {num_devices}, or use -1 on one axis.")
    return tuple(shape)


DCN_AXES = ("dcn_data", "dcn_fsdp")  # MeshConfig fields: how many slices the data and fsdp axes span


def num_slices(devices: Sequence[jax.Device]) -> int:
    """TPU slices among `devices` (their slice_index); 1 on other platforms."""
    if devices[0].platform != "tpu":
        return 1
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    validate_rules(cfg.rules or DEFAULT_RULES)
    dcn = [getattr(cfg, name) for name in DCN_AXES]
    for name, size in zip(DCN_AXES, dcn):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"mesh.{name}={size!r} must be a positive integer (1 = within one slice).")
    slices = math.prod(dcn)
    # On TPU the slices are the devices' own; elsewhere processes play slices when DCN axes are asked for.
    tpu = devices[0].platform == "tpu"
    granules = num_slices(devices) if tpu else len({d.process_index for d in devices}) if slices > 1 else 1
    if slices != granules:
        what = "TPU slices" if tpu else "processes (each one plays a slice)"
        raise ValueError(f"mesh.dcn_data={dcn[0]} x mesh.dcn_fsdp={dcn[1]} = {slices} slices, but the devices "
                         f"belong to {granules} {what}; make mesh.dcn_data x mesh.dcn_fsdp = {granules} "
                         f"(e.g. mesh.dcn_data={granules}).")
    shape = mesh_shape(cfg, len(devices) // slices)  # per slice
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_hybrid_device_mesh(shape, (*dcn, 1, 1), devices, process_is_granule=not tpu)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[Optional[str]], shape: Optional[Sequence[int]], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]], *, what: Optional[str] = None) -> P:
    """PartitionSpec for an array whose dims carry `names`.

    A mesh axis already used by an earlier dim is skipped. A mesh axis that does not divide its dim is
    an error naming `what` (a parameter or the batch), unless the name is in REPLICATE_IF_INDIVISIBLE;
    with `what=None` (activation constraints, which follow the checked params and batch) it is skipped.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name is not None else None
        axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        kept = []
        size = None if shape is None else shape[i]
        for axis in axes:
            n = mesh.shape.get(axis, 1)  # an axis this mesh lacks is an axis of size 1
            if axis in used or n == 1:
                continue
            if size is not None and size % (n * math.prod(mesh.shape[a] for a in kept)):
                if what is not None and name not in REPLICATE_IF_INDIVISIBLE:
                    raise ValueError(
                        f"{what}: dim {i} ({name!r}, size {size}) cannot be sharded over mesh axis {axis!r} "
                        f"(size {n}{' after ' + str(kept) if kept else ''}): it does not divide {size}. Fix: a "
                        f"mesh.{axis} that divides {size}, a model size divisible by it, or map {name!r} to None "
                        "in mesh.rules to replicate it on purpose.")
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*spec)


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Applies logical-name sharding constraints to activations. `mesh=None` is a no-op."""
    mesh: Optional[Mesh] = None
    rules: tuple = DEFAULT_RULES

    def __call__(self, x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
        if self.mesh is None or self.mesh.size == 1:
            return x
        spec = logical_to_spec(names, x.shape, self.mesh, self.rules)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def named(self, names: Sequence[Optional[str]], shape: Sequence[int], what: Optional[str] = None) -> NamedSharding:
        """The sharding of an array with these logical names; with `what`, indivisible dims are errors."""
        return NamedSharding(self.mesh, logical_to_spec(names, shape, self.mesh, self.rules, what=what))


def logical_axes(variable: nnx.Variable) -> tuple:
    names = variable.get_metadata().get("logical_axes")
    if names is None:
        raise ValueError(f"parameter {variable!r} has no logical_axes metadata; every parameter needs one.")
    return tuple(names)


def state_shardings(state: nnx.State, sharder: Sharder) -> Any:
    """NamedShardings for every variable of an (abstract) model state, from its logical names."""
    def one(path, var):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return var.replace(sharder.named(logical_axes(var), var.get_value().shape, what=f"parameter {name}"))
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(sharder: Sharder, batch: dict[str, np.ndarray]) -> dict[str, NamedSharding]:
    """Every batch array is [batch, length]: rows over the batch axes, length replicated."""
    return {k: sharder.named(("batch",) + (None,) * (np.ndim(v) - 1), np.shape(v), what=f"batch[{k!r}]")
            for k, v in batch.items()}
