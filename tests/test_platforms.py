"""t5like/platforms.py: on a machine without TPU chips, with JAX_PLATFORMS unset, importing t5like keeps
libtpu (installed by the dev extra's jax[tpu]) from starting and printing TPU errors; launch.compile still
compiles for a TPU topology; a JAX_PLATFORMS the user set is left alone."""
import json
import os
import subprocess
import sys

import pytest

from t5like.platforms import exclude_absent_tpu, platforms_without_tpu, tpu_chips_present

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import libtpu  # noqa: F401
    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False

# What libtpu prints when it starts without chips (issue 22: `Failed to find host bounds`, `E0000 ...
# INVALID_ARGUMENT: unexpected worker hostname ... TPU_WORKER_HOSTNAMES`).
TPU_ERRORS = ("host bounds", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "INVALID_ARGUMENT", "E0000",
              "libtpu", "InitGoogle")

# As an entry point does: t5like first (experiments.*, t5like.generate, t5like.hf ...), then JAX runs on
# this machine's devices; then the compile check's libtpu topology, and an ahead-of-time compile for it.
PROGRAM = """
import json, os
import t5like.train
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from launch.compile import topology_devices
from launch.tpu_types import parse_tpu_type
y = jax.jit(lambda a: a * 2)(np.ones(4, np.float32))
devices = topology_devices(parse_tpu_type("v5e-4"))
sharding = NamedSharding(Mesh(np.array(devices), ("x",)), PartitionSpec("x"))
compiled = jax.jit(lambda a: a * 2).lower(jax.ShapeDtypeStruct((8, 128), np.float32, sharding=sharding)).compile()
print(json.dumps({"platform": jax.devices()[0].platform, "sum": float(y.sum()), "JAX_PLATFORMS": os.environ["JAX_PLATFORMS"],
                  "tpu_devices": [d.device_kind for d in devices],
                  "argument_bytes": compiled.memory_analysis().argument_size_in_bytes}))
"""


@pytest.mark.skipif(not HAVE_LIBTPU, reason="without libtpu there is nothing to keep quiet")
@pytest.mark.skipif(tpu_chips_present(), reason="this machine has TPU chips: the TPU backend is wanted")
def test_no_tpu_errors_on_a_machine_without_tpus_and_the_tpu_compile_still_works():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}   # as a user runs it
    result = subprocess.run([sys.executable, "-c", PROGRAM], env={**env, "PYTHONPATH": ROOT}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if any(e in line for e in TPU_ERRORS)], result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["platform"] == "cpu" and out["sum"] == 8.0 and out["JAX_PLATFORMS"] == "cpu"
    assert out["tpu_devices"] == ["TPU v5 lite"] * 4
    assert out["argument_bytes"] == 8 * 128 * 4 // 4   # each of the 4 chips holds its quarter
    # A script that imports jax before t5like: jax has read the environment, its config still decides.
    result = subprocess.run([sys.executable, "-c", "import jax, t5like; print(jax.devices()[0].platform)"],
                            env={**env, "PYTHONPATH": ROOT}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["cpu"], result.stderr
    assert not [line for line in result.stderr.splitlines() if any(e in line for e in TPU_ERRORS)], result.stderr


def test_an_explicit_choice_is_left_alone():
    for environ in ({"JAX_PLATFORMS": ""}, {"JAX_PLATFORMS": "tpu,cpu"}, {"JAX_FORCE_TPU_INIT": "1"}):
        before = dict(environ)
        assert exclude_absent_tpu(environ) is None and environ == before


def test_the_platforms_are_what_jax_would_try_less_tpu():
    assert platforms_without_tpu(set(), amd_gpu_visible=False) == "cpu"
    assert platforms_without_tpu({"xla_cuda12"}, amd_gpu_visible=False) == "cuda,cpu"   # JAX skips cuda without a GPU
    assert platforms_without_tpu({"xla_rocm7"}, amd_gpu_visible=False) == "cpu"
    assert platforms_without_tpu({"xla_rocm7"}, amd_gpu_visible=True) == "rocm,cpu"
    assert platforms_without_tpu({"xla_cuda12", "someone_elses_plugin"}, amd_gpu_visible=False) is None
