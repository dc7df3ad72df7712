"""Keep libtpu from starting on a machine without TPU chips.

With JAX_PLATFORMS unset, JAX tries every backend it knows and TPU first: jax._src.xla_bridge registers a
`tpu` backend that loads libtpu whenever the libtpu package is installed (the dev extra's jax[tpu]
installs it, for launch.compile). On a laptop or a GPU box, libtpu then prints `Failed to find host
bounds ...` and `E0000 ... INVALID_ARGUMENT: unexpected worker hostname ... TPU_WORKER_HOSTNAMES` before
JAX falls back to the CPU or GPU.

exclude_absent_tpu() runs when t5like is imported (t5like/__init__.py), which every entry point does
before JAX starts its backends. With JAX_PLATFORMS unset and no TPU chips here, it sets JAX_PLATFORMS to
the platforms JAX would have tried, less tpu: the installed GPU plugins' (cuda; rocm where an AMD GPU is
visible), then cpu. An explicit JAX_PLATFORMS (even empty: "choose for me") and JAX_FORCE_TPU_INIT are
left alone, and so is a machine with a JAX plugin this does not know (its platform name is unknown).
Compiling for a TPU topology does not need the tpu backend: jax.experimental.topologies loads libtpu
itself (launch.compile).
"""
from __future__ import annotations

import glob
import os
import pkgutil
import sys
from importlib import metadata
from importlib.util import find_spec
from typing import Optional

# JAX's own PCI check (jax._src.hardware_utils): Google's vendor id and its TPU device ids (v3 ... TPU7x).
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"}


def tpu_chips_present() -> bool:
    """The devices libtpu opens (/dev/accel* on v4, /dev/vfio/N on v5e and later), or a TPU on the PCI
    bus. In doubt (a VFIO device of another kind), yes: the TPU backend stays."""
    if glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() != _GOOGLE_PCI_VENDOR:
                    continue
            with open(os.path.join(os.path.dirname(vendor), "device")) as f:
                if f.read().strip() in _TPU_PCI_DEVICES:
                    return True
        except OSError:
            continue
    return False


def jax_plugins() -> set[str]:
    """The PJRT plugins JAX would load: modules in the jax_plugins namespace and `jax_plugins` entry points
    (jax._src.xla_bridge.discover_pjrt_plugins)."""
    names = {ep.name for ep in metadata.entry_points(group="jax_plugins")}
    if find_spec("jax_plugins") is not None:
        import jax_plugins as namespace
        names |= {name for _, name, _ in pkgutil.iter_modules(namespace.__path__)}
    return names


def platforms_without_tpu(plugins: set[str], amd_gpu_visible: bool) -> Optional[str]:
    """JAX_PLATFORMS for what JAX would try with it unset, less tpu; None if a plugin's platform is unknown.
    (JAX itself skips cuda when no NVIDIA GPU is visible; rocm it would try, and fail, so it is listed only
    with an AMD GPU.)"""
    platforms = []
    for name in sorted(plugins):
        if "cuda" in name:
            platforms.append("cuda")
        elif "rocm" in name:
            if amd_gpu_visible:
                platforms.append("rocm")
        else:
            return None
    return ",".join(dict.fromkeys([*platforms, "cpu"]))


def exclude_absent_tpu(environ=os.environ) -> Optional[str]:
    """Set JAX_PLATFORMS (module docstring) before JAX starts its backends; -> what it set, or None."""
    if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ or tpu_chips_present():
        return None
    platforms = platforms_without_tpu(jax_plugins(), os.path.exists("/dev/kfd") or os.path.exists("/dev/dxg"))
    if platforms is None:
        return None
    if "jax" in sys.modules:   # imported first: it has read the environment; its config still decides
        import jax
        from jax._src import xla_bridge
        if jax.config.jax_platforms is not None or xla_bridge.backends_are_initialized():
            return None   # set in code, or too late: the backends have started
        jax.config.update("jax_platforms", platforms)
    environ["JAX_PLATFORMS"] = platforms   # child processes (trials, local pods) inherit the choice
    return platforms
