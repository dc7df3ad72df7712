"""Will it fit? Compile the trainer's own train step for a TPU slice, on this CPU machine.

    python -m launch.compile experiments.llama_1b --topology v5p-8
    python -m launch.compile experiments.gpt2_small size=tiny --topology v5e-4 train.batch_size=64
    python -m launch.compile experiments.llama_1b mesh.dcn_data=2 --topology v5p-8 --num-slices 2

libtpu (from `pip install "jax[tpu]"`) describes a TPU topology without a TPU; XLA compiles the real
jitted step for it (the trainer's shardings, optimizer state, donation), and the compiled memory
analysis gives the bytes each device needs. Prints one JSON line:
  topology, num_slices, num_devices (all slices), per_device_bytes, hbm_bytes_per_device, fits,
  flops_per_step, compile_s, ...
per_device_bytes = arguments + outputs - aliased (the donated state is counted once) + temporaries.
HBM per chip is the documented capacity (launch/tpu_types.py); the runtime keeps a little of it.
Exit status: 0 fits, 1 does not fit, 2 bad input.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time

from launch.tpu_types import TpuType, parse_tpu_type

# libtpu looks for a TPU VM's metadata server and worker list when it loads; on a CPU machine these
# say where we are, so it loads quietly. It also takes /tmp/libtpu_lockfile to own the (absent) chips;
# compiling needs no chips, so several checks may run at once. main() sets these before jax is imported
# (jax reads JAX_PLATFORMS then); importing this module changes nothing.
LIBTPU_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
              "TF_CPP_MIN_LOG_LEVEL": "2"}


def load_config(experiment: str, overrides: list[str]):
    """experiments.NAME + key=value overrides -> validated Config (the experiment CLI's own parsing)."""
    from t5like.train import parse_args
    try:
        module = importlib.import_module(experiment)
    except ModuleNotFoundError as e:
        raise ValueError(f"experiment {experiment!r} cannot be imported ({e}); give a module such as "
                         "experiments.quickstart.") from None
    if not hasattr(module, "config"):
        raise ValueError(f"experiment {experiment!r} has no config() function.")
    return parse_args(module.config, overrides).validate()


def topology_devices(tpu: TpuType, num_slices: int = 1):
    for key, value in {**LIBTPU_ENV, "TPU_ACCELERATOR_TYPE": tpu.accelerator_type}.items():
        os.environ.setdefault(key, value)
    from jax.experimental import topologies
    return topologies.get_topology_desc(
        platform="tpu", topology_name=tpu.libtpu_topology, chip_config_name=tpu.generation.chip_config,
        chips_per_host_bounds=tpu.chips_per_host_bounds, num_slices=num_slices).devices


def check_slices(mesh, tpu: TpuType, num_slices: int) -> tuple[int, int, int, int]:
    """The config's mesh for `num_slices` slices of `tpu`: the DCN axes (mesh.dcn_data x mesh.dcn_fsdp) make
    the slices, and the other axes cover one slice's chips. Cheap; runs before any compile. -> per-slice shape."""
    from t5like.sharding import mesh_shape
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"--num-slices={num_slices!r} must be 1 or more (the number of slices of {tpu.name}).")
    dcn = mesh.dcn_data * mesh.dcn_fsdp
    if dcn != num_slices:
        fix = (f"mesh.dcn_data={num_slices} (data parallelism over DCN)" if num_slices > 1
               else "mesh.dcn_data=1 mesh.dcn_fsdp=1, or --num-slices " + str(dcn))
        raise ValueError(f"mesh.dcn_data={mesh.dcn_data} x mesh.dcn_fsdp={mesh.dcn_fsdp} = {dcn} slices, but "
                         f"--num-slices={num_slices}; make them agree: {fix}.")
    try:
        return mesh_shape(mesh, tpu.chips)
    except ValueError as e:
        where = (f"the slice ({tpu.accelerator_type} has {tpu.chips} chips)" if num_slices == 1 else
                 f"the slices ({num_slices} x {tpu.accelerator_type}, {tpu.chips} chips each; the axes other than "
                 "mesh.dcn_* are per slice)")
        raise ValueError(f"the config's mesh does not match {where}: {e}") from None


def _oom_bytes(message: str) -> int | None:
    """XLA's TPU compiler refuses a program over HBM at compile time; its first figure is what the
    program needs ('... HLO temporaries (23.63G) exceeds available HBM (15.75G)'); a lower bound."""
    m = re.search(r"([\d.]+)([KMGT])\b", message)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2)))


def check(cfg, tpu: TpuType, num_slices: int = 1) -> dict:
    """Compile cfg's train step for `num_slices` slices of `tpu` and report its per-device memory."""
    import numpy as np
    from t5like.data import batch_shapes
    from t5like.train import build

    check_slices(cfg.mesh, tpu, num_slices)  # a mesh that does not match the slices: a clear error, first
    devices = topology_devices(tpu, num_slices)
    hosts = len({d.process_index for d in devices})  # over all slices
    if cfg.train.batch_size % hosts:
        where = f"{num_slices} slices of " if num_slices > 1 else ""
        raise ValueError(f"train.batch_size={cfg.train.batch_size} does not divide over the {hosts} hosts of "
                         f"{where}{tpu.accelerator_type}; use a multiple of {hosts}.")
    # build() takes one host's rows, as the trainer gives it; it makes the global batch from the hosts.
    per_host = cfg.train.batch_size // hosts
    batch = {k: np.zeros(shape, dtype) for k, (shape, dtype) in batch_shapes(cfg.data, per_host).items()}
    hbm = tpu.generation.hbm_bytes_per_chip
    out = {"topology": tpu.name, "accelerator_type": tpu.accelerator_type, "num_slices": num_slices,
           "num_devices": len(devices)}
    start = time.perf_counter()
    setup = build(cfg, batch, devices=devices)
    try:
        compiled = setup.train_step.lower(setup.abstract_state, setup.abstract_batch).compile()
    except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED at compile time means it does not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        used = _oom_bytes(str(e))
        return {**out, "per_device_bytes": used, "hbm_bytes_per_device": hbm, "fits": False,
                "flops_per_step": setup.flops_per_step, "compile_s": round(time.perf_counter() - start, 1),
                "compiler": str(e).splitlines()[0][:300]}
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                  + mem.temp_size_in_bytes)
    return {**out, "per_device_bytes": int(per_device), "hbm_bytes_per_device": hbm, "fits": per_device <= hbm,
            "flops_per_step": setup.flops_per_step, "compile_s": round(compile_s, 1),
            "argument_bytes": int(mem.argument_size_in_bytes), "output_bytes": int(mem.output_size_in_bytes),
            "alias_bytes": int(mem.alias_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}


def advice(result: dict) -> str:
    """What to change when a plan does not fit."""
    gib = 1024 ** 3
    used = result["per_device_bytes"]
    # After a refusal the compiler names one figure (e.g. the temporaries alone): a lower bound.
    at_least = "at least " if "compiler" in result else ""
    used_text = f"{at_least}{used / gib:.1f} GiB" if used else "more than it has"
    return (f"the train step needs {used_text} per device on {result['topology']}, which has "
            f"{result['hbm_bytes_per_device'] / gib:.0f} GiB HBM per chip. Shard the weights and optimizer "
            "state (mesh.fsdp=-1 mesh.data=1), recompute activations (model.remat=full), lower "
            "train.batch_size or raise optim.grad_accum_steps, or choose a larger slice.")


def main(argv=None) -> int:
    os.environ["JAX_PLATFORMS"] = "cpu"   # this process compiles; it runs nothing on a TPU
    for key, value in LIBTPU_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="python -m launch.compile", description=__doc__.split("\n")[0])
    parser.add_argument("experiment", help="experiment module, e.g. experiments.llama_1b")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--topology", required=True, help="TPU slice type, e.g. v5p-8, v5e-16, v4-32, v6e-8")
    parser.add_argument("--num-slices", type=int, default=1,
                        help="slices of that type joined over DCN (the config's mesh.dcn_data x mesh.dcn_fsdp)")
    args = parser.parse_intermixed_args(argv)   # overrides before or after --topology, as the docstring shows
    try:
        tpu = parse_tpu_type(args.topology)
        cfg = load_config(args.experiment, args.overrides)
        result = check(cfg, tpu, args.num_slices)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    if not result["fits"]:
        print(f"does not fit: {advice(result)}", file=sys.stderr)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
