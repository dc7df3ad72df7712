"""How the local backend shares one host's devices between K trials running at once.

- GPUs: trial i of K gets GPUs [i*D/K, (i+1)*D/K) through CUDA_VISIBLE_DEVICES.
- TPU chips (/dev/accel* or /dev/vfio/N): TPU_VISIBLE_CHIPS, plus, for 1 or 2 chips,
  TPU_CHIPS_PER_HOST_BOUNDS and TPU_HOST_BOUNDS=1,1,1 (the variables Ray sets for a task given part of a
  TPU host) and their older names TPU_CHIPS_PER_PROCESS_BOUNDS, TPU_PROCESS_BOUNDS (jax-ml/jax#14977).
  Not yet run on a TPU VM here.
- CPU: JAX's simulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=D) are split D/K per
  trial, and the cores this process may use are split into K disjoint sets (CPU affinity, set in the
  trial before Python starts the experiment; OMP_NUM_THREADS to match). With fewer cores than K,
  trials share cores round-robin, and the runner says so.

K must divide D (a clear error otherwise: an uneven split would give trials different meshes). Every
trial gets T5LIKE_DEVICES (its host device indices) and, on CPU, T5LIKE_CPUS (its cores).
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess

_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def with_device_count(xla_flags: str, n: int) -> str:
    """XLA_FLAGS with the simulated CPU device count set to n, and every other flag kept."""
    return " ".join(_COUNT_FLAG.sub("", xla_flags).split() + [f"--xla_force_host_platform_device_count={n}"])


@dataclasses.dataclass(frozen=True)
class HostDevices:
    kind: str                   # "gpu", "tpu" or "cpu"
    ids: tuple[str, ...]        # GPU ids, TPU chip indices, or simulated CPU device indices
    cores: tuple[int, ...]      # CPU cores this process may run on

    def describe(self) -> str:
        return f"{len(self.ids)} {self.kind.upper()} device(s), {len(self.cores)} core(s)"


def _tpu_chips() -> list[str]:
    accel = sorted(glob.glob("/dev/accel[0-9]*"), key=lambda p: int(p[len("/dev/accel"):]))
    if accel:
        return [p[len("/dev/accel"):] for p in accel]
    vfio = [p for p in glob.glob("/dev/vfio/[0-9]*")]  # newer TPU VMs (v5p, v6e)
    return [str(i) for i in range(len(vfio))]


def _gpus(env: dict) -> list[str]:
    if env.get("CUDA_VISIBLE_DEVICES", "").strip():
        return [g.strip() for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def detect(env: dict) -> HostDevices:
    """This host's devices as the trials would see them. JAX_PLATFORMS=cpu means CPU whatever is installed."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if not platforms or "tpu" in platforms:
        chips = _tpu_chips()
        if chips:
            return HostDevices("tpu", tuple(chips), cores)
    if not platforms or "cuda" in platforms or "gpu" in platforms:
        gpus = _gpus(env)
        if gpus:
            return HostDevices("gpu", tuple(gpus), cores)
    counts = _COUNT_FLAG.findall(env.get("XLA_FLAGS", ""))
    n = int(counts[-1]) if counts else 1  # the last flag wins, as in XLA
    return HostDevices("cpu", tuple(str(i) for i in range(n)), cores)


def split(host: HostDevices, k: int, env: dict) -> list[dict]:
    """Environment overrides for each of the K trial slots; ValueError if K does not divide the devices."""
    d = len(host.ids)
    if k > 1 and d % k and not (host.kind == "cpu" and d == 1):  # one plain CPU device: cores split only
        divisors = [i for i in range(1, d + 1) if d % i == 0]
        raise ValueError(f"--parallel {k} does not divide this host's {d} {host.kind.upper()} devices "
                         f"({host.describe()}); use --parallel one of {divisors} so every trial gets the same "
                         "number of devices.")
    per = max(1, d // k)
    slots = []
    for i in range(k):
        ids = host.ids[i * per:(i + 1) * per] if d >= k else host.ids
        slot = {"T5LIKE_DEVICES": ",".join(ids)}
        if host.kind == "gpu":
            slot["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
        elif host.kind == "tpu" and k > 1:
            slot["TPU_VISIBLE_CHIPS"] = ",".join(ids)
            if per in (1, 2):  # both namings libtpu has read (Ray sets the first pair; jax-ml/jax#14977 the second)
                bounds = "1,1,1" if per == 1 else "1,2,1"
                slot.update(TPU_CHIPS_PER_HOST_BOUNDS=bounds, TPU_HOST_BOUNDS="1,1,1",
                            TPU_CHIPS_PER_PROCESS_BOUNDS=bounds, TPU_PROCESS_BOUNDS="1,1,1")
        if host.kind == "cpu":
            if d > 1:
                slot["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), per)
            cores = core_sets(host.cores, k)[i]
            slot["T5LIKE_CPUS"] = ",".join(map(str, cores))
            slot["OMP_NUM_THREADS"] = str(len(cores))
        slots.append(slot)
    return slots


def core_sets(cores: tuple[int, ...], k: int) -> list[tuple[int, ...]]:
    """K disjoint, near-equal sets of cores; with fewer cores than K, one core each, round-robin (shared)."""
    if len(cores) < k:
        return [(cores[i % len(cores)],) for i in range(k)]
    return [tuple(cores[i::k]) for i in range(k)]


def sharing_note(host: HostDevices, k: int) -> str:
    if host.kind != "cpu":
        per = len(host.ids) // k
        return f"each of {k} trial slots gets {per} of {len(host.ids)} {host.kind.upper()} device(s)"
    shared = " (fewer cores than trials: cores are shared)" if len(host.cores) < k else ""
    return (f"each of {k} trial slots gets {max(1, len(host.ids) // k)} simulated CPU device(s) and its own "
            f"{max(1, len(host.cores) // k)} of {len(host.cores)} core(s){shared}")
