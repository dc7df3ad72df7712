"""Multislice meshes (mesh.dcn_data, mesh.dcn_fsdp): the data and fsdp axes span slices joined over the data-centre
network, and only those axes' collectives cross it. Compiled ahead of time for two TPU slices through libtpu; the
multi-process CPU runs (processes as slices) are in tests/test_multihost.py."""
import math
import os
import re

import jax
import numpy as np
import pytest

from t5like.config import MeshConfig
from t5like.sharding import make_mesh

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def two_slices():
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=2).devices


def test_only_the_gradient_reduction_crosses_slices():
    """llama_1b tiny on 2 slices of v5e-4, data over DCN (mesh.dcn_data=2) and FSDP inside each slice: the compiled
    step's cross-slice transfers (libtpu's megascale sends) are all-reduces only, and carry one FSDP shard of the
    gradients (the weights' all-gathers stay inside the slice); it reports memory per device."""
    from launch.compile import load_config
    from t5like.data import batch_shapes
    from t5like.train import build
    devices = two_slices()
    cfg = load_config("experiments.llama_1b", ["size=tiny", "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=4",
                                               "train.batch_size=8"])
    batch = {k: np.zeros(s, d) for k, (s, d) in batch_shapes(cfg.data, 4).items()}  # one host's rows (2 hosts)
    setup = build(cfg, batch, devices=devices)
    mesh = setup.sharder.mesh
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert all(len({d.slice_index for d in row.flat}) == 1 for row in mesh.devices)  # a data index = a slice
    compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    text = compiled.as_text()
    sends = [line for line in text.splitlines() if "send(" in line and "megascale_transfer_type" in line]
    kinds = {re.search(r'megascale_transfer_type="(\w+)"', line).group(1) for line in sends}
    assert sends and kinds == {"ALL_REDUCE"}, kinds
    crossing = sum(math.prod(int(x) for x in re.search(r"= \(\w+\[([\d,]*)\]", line).group(1).split(",") if x)
                   for line in sends)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(setup.abstract_state["params"]))
    assert params / 4 <= crossing < 1.3 * params / 4, (crossing, params)  # one fsdp shard (tiles pad it a little)
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0 and memory.temp_size_in_bytes > 0


def test_dcn_axes_that_do_not_match_the_slices_are_refused():
    with pytest.raises(ValueError, match=r"mesh.dcn_data=2 x mesh.dcn_fsdp=1 = 2 slices, but the devices belong to "
                                         r"1 processes.*mesh.dcn_data=1"):
        make_mesh(MeshConfig(dcn_data=2))
    with pytest.raises(ValueError, match=r"mesh.dcn_fsdp=0 must be a positive integer"):
        make_mesh(MeshConfig(dcn_fsdp=0))
    devices = two_slices()
    with pytest.raises(ValueError, match=r"= 1 slices, but the devices belong to 2 TPU slices.*mesh.dcn_data=2"):
        make_mesh(MeshConfig(data=1, fsdp=-1), devices)
    assert make_mesh(MeshConfig(dcn_fsdp=2, data=1, fsdp=-1), devices).shape["fsdp"] == 8
