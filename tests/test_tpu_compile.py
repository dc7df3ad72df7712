"""launch.compile: the trainer's own train step compiled ahead of time for a TPU topology, on this CPU
machine, through libtpu's compile-only devices; and launch.tpu refusing a plan that does not fit."""
import json
import os
import subprocess
import sys

import pytest

import jax
import numpy as np

from launch.compile import load_config
from t5like.data import batch_shapes
from t5like.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import libtpu  # noqa: F401  (jax[tpu] brings it)
    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')

# One v5e chip (16 GiB) cannot hold this step: 16384 x 256 tokens' fp32 logits over a 2048 vocabulary are
# 34 GB alone. (A big model fails the same way, but takes the compiler ten times longer to refuse.)
TOO_BIG = ["train.batch_size=16384", "data.seq_len=256"]


def per_device_argument_bytes(name: str) -> int:
    cfg = load_config(f"experiments.{name}", ["size=tiny"])
    batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(cfg.data, cfg.train.batch_size).items()}
    setup = build(cfg, batch, devices=jax.devices()[:4])
    shards = [(x.sharding.shard_shape(x.shape), x.dtype) for x in jax.tree.leaves(setup.abstract_state)]
    shards += [(setup.batch_shardings[k].shard_shape(v.shape), v.dtype) for k, v in batch.items()]
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shards)


def env():
    # The compile runs as the user runs it: a fresh process, no simulated CPU devices needed.
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**e, "PYTHONPATH": ROOT}


def start(*argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@needs_libtpu
def test_tiny_presets_compile_for_a_small_v5e_slice():
    runs = {name: start("-m", "launch.compile", f"experiments.{name}", "size=tiny", "--topology", "v5e-4")
            for name in ("gpt2_small", "t5_base")}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, out                       # one JSON line, nothing else on stdout
        assert "WARNING" not in err and "metadata" not in err.lower(), err  # libtpu kept quiet
        r = json.loads(lines[0])
        assert r["topology"] == "v5e-4" and r["accelerator_type"] == "v5litepod-4" and r["num_devices"] == 4
        assert r["fits"] is True and r["hbm_bytes_per_device"] == 16 * 1024 ** 3
        # The compiled step's arguments are this device's share of the train state and the batch: the
        # same config built on 4 CPU devices says how big that share is (TPU layouts may pad it a little).
        expected = per_device_argument_bytes(name)
        assert expected <= r["argument_bytes"] < 1.5 * expected, (name, r, expected)
        assert r["per_device_bytes"] >= r["argument_bytes"] and r["flops_per_step"] > 0 and r["compile_s"] > 0


@needs_libtpu
def test_a_plan_that_cannot_fit_is_refused():
    """A batch no v5e chip holds: launch.compile says fits=false; launch.tpu's dry run refuses the plan."""
    proc = start("-m", "launch.tpu", "run", "experiments.quickstart", *TOO_BIG, "--name", "too-big",
                 "--tpu", "v5e-1", "--zone", "us-west4-a", "--project", "p", "--workdir", "gs://bkt/too-big",
                 "--dry-run")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    assert not any(line.startswith("gcloud ") for line in out.splitlines()), out   # no plan printed
    # The long step says what it is doing before it starts, and how to skip it.
    assert err.index("compiling the train step for v5e-1 ahead of time") < err.index("compile check: ")
    assert "--skip-compile-check skips it" in err
    check = json.loads(err.split("compile check: ", 1)[1].splitlines()[0])
    assert check["fits"] is False and check["topology"] == "v5e-1" and check["num_devices"] == 1
    assert check["per_device_bytes"] > check["hbm_bytes_per_device"]
    assert "error: this plan does not fit" in err and "GiB" in err and "mesh.fsdp" in err and "remat" in err


@needs_libtpu
def test_the_slice_table_agrees_with_libtpu():
    """Chips, hosts and chips per host of each slice type, as libtpu lays out its compile-only devices."""
    from launch.tpu_types import parse_tpu_type
    names = ["v5e-1", "v5e-8", "v5litepod-16", "v5p-8", "v5p-32", "v4-32", "v6e-8", "v6e-16"]
    code = ("import json, sys; from launch import compile; from launch.tpu_types import parse_tpu_type; "
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    d = compile.topology_devices(parse_tpu_type(n))\n"
            "    out[n] = [len(d), len({x.process_index for x in d}), sorted({x.device_kind for x in d})]\n"
            "print(json.dumps(out))")
    proc = start("-c", code, *names)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    seen = json.loads(out.strip().splitlines()[-1])
    for name in names:
        t = parse_tpu_type(name)
        assert seen[name] == [t.chips, t.hosts, [t.generation.device_kind]], (name, seen[name])
    assert parse_tpu_type("v5e-16") == parse_tpu_type("v5litepod-16")
    assert (parse_tpu_type("v5p-32").chips, parse_tpu_type("v5p-32").topology) == (16, "2x2x4")


@needs_libtpu
def test_two_slices_compile_and_dcn_axes_that_disagree_are_refused_first():
    """`--num-slices 2` with data over DCN (mesh.dcn_data=2): 2 slices of v5e-4 (8 devices) compile and report
    memory per device; the same without mesh.dcn_data is refused (exit 2) before libtpu compiles anything."""
    good = start("-m", "launch.compile", "experiments.llama_1b", "size=tiny", "--topology", "v5e-4",
                 "--num-slices", "2", "mesh.dcn_data=2")
    bad = start("-m", "launch.compile", "experiments.llama_1b", "size=tiny", "--topology", "v5e-4",
                "--num-slices", "2")
    out, err = bad.communicate(timeout=600)
    assert bad.returncode == 2 and out == "", (out, err)
    assert err.startswith("error: mesh.dcn_data=1 x mesh.dcn_fsdp=1 = 1 slices, but --num-slices=2; make them "
                          "agree: mesh.dcn_data=2"), err
    out, err = good.communicate(timeout=600)
    assert good.returncode == 0, err
    r = json.loads(out.strip())
    assert (r["num_slices"], r["num_devices"], r["topology"], r["fits"]) == (2, 8, "v5e-4", True), r
    assert r["per_device_bytes"] >= r["argument_bytes"] > 0 and r["temp_bytes"] > 0
