"""What a Cloud TPU slice is: generations, slice types, their topologies, and where they are offered.

    parse_tpu_type("v5p-32")   -> TpuType(v5p, 16 chips, 4 hosts, accelerator_type "v5p-32", topology "2x2x4")
    parse_tpu_type("v5e-16")   -> the same as "v5litepod-16" (gcloud's name for v5e)

Naming: the number in a v4/v5p type counts TensorCores (2 per chip, seen by JAX as one megacore
device per chip); in a v5e/v6e type it counts chips (1 core each). Sources, checked 2026-11:
- chips, HBM and bf16 peak per chip: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} ("System architecture").
- runtime versions: cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX" table).
- zones: cloud.google.com/tpu/docs/regions-zones, the North America table (single-tenant zones included).
  Zones change, so a zone in a region the table does not list (Europe, Asia) is not checked (launch.tpu
  says so), and launch.tpu's --any-zone skips the check. A zone not of the form REGION-ZONE is refused.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str                   # our name: v4, v5e, v5p, v6e
    gcloud_prefix: str          # gcloud accelerator-type prefix: v4, v5litepod, v5p, v6e
    cores_per_chip: int         # how the type's number counts: 2 = TensorCores (v4, v5p), 1 = chips
    dims: int                   # torus dimensions: 3 (v4, v5p) or 2 (v5e, v6e)
    max_chips_single_host: int  # slices up to this many chips have one VM
    hbm_bytes_per_chip: int
    peak_bf16_flops: float
    runtime_version: str        # default --version for JAX on this generation
    chip_config: str            # libtpu's compile-only chip config: megacore = one device per chip
    zones: tuple[str, ...]
    device_kind: str            # jax Device.device_kind


GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("v4", "v4", 2, 3, 4, 32 * GiB, 275e12, "tpu-ubuntu2204-base", "megacore",
               ("us-central2-b",), "TPU v4"),
    Generation("v5e", "v5litepod", 1, 2, 8, 16 * GiB, 197e12, "v2-alpha-tpuv5-lite", "default",
               ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "us-east5-a", "us-east5-b",
                "us-east5-c"), "TPU v5 lite"),
    Generation("v5p", "v5p", 2, 3, 4, 95 * GiB, 459e12, "v2-alpha-tpuv5", "megacore",
               ("us-central1-a", "us-east5-a", "us-east5-b", "us-east5-c", "us-south1-a"), "TPU v5"),
    Generation("v6e", "v6e", 1, 2, 8, 32 * GiB, 918e12, "v2-alpha-tpuv6e", "default",
               ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "us-east5-c", "us-east4-a",
                "us-east4-b", "us-west1-c"), "TPU v6 lite"),
)}

# Regions the zone table covers; a zone elsewhere is not judged (the table cannot know it).
KNOWN_REGIONS = frozenset(z.rsplit("-", 1)[0] for g in GENERATIONS.values() for z in g.zones)

# Chip counts Cloud TPU offers as one slice (powers of two; larger v4/v5p shapes exist, see the docs).
SLICE_CHIPS = {"v4": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
               "v5p": (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 6144),
               "v5e": (1, 4, 8, 16, 32, 64, 128, 256),
               "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}


@dataclasses.dataclass(frozen=True)
class TpuType:
    generation: Generation
    chips: int

    @property
    def accelerator_type(self) -> str:
        """gcloud's --accelerator-type, e.g. v5p-32, v5litepod-16."""
        return f"{self.generation.gcloud_prefix}-{self.chips * self.generation.cores_per_chip}"

    @property
    def name(self) -> str:
        return f"{self.generation.name}-{self.chips * self.generation.cores_per_chip}"

    @property
    def hosts(self) -> int:
        g = self.generation
        return 1 if self.chips <= g.max_chips_single_host else self.chips // 4

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts

    @property
    def topology(self) -> str:
        """The slice's chip grid, e.g. 2x2x4 (v5p-32) or 4x4 (v5e-16)."""
        return "x".join(map(str, _grid(self.chips, self.generation.dims)))

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        grid = _grid(self.chips_per_host, 2) if self.chips_per_host > 1 else (1, 1)
        return (grid[0], grid[1], 1)

    @property
    def libtpu_topology(self) -> str:
        """The name jax.experimental.topologies takes, e.g. v5e:4x4."""
        return f"{self.generation.name}:{self.topology}"

    @property
    def peak_flops(self) -> float:
        return self.chips * self.generation.peak_bf16_flops

    def describe(self) -> str:
        g = self.generation
        return (f"{self.accelerator_type}: {self.chips} chips ({self.topology}), {self.hosts} host(s) x "
                f"{self.chips_per_host} chips, {g.hbm_bytes_per_chip / GiB:.0f} GiB HBM and "
                f"{g.peak_bf16_flops / 1e12:.0f} bf16 TFLOP/s per chip")


def _grid(chips: int, dims: int) -> tuple[int, ...]:
    """Near-cubic power-of-two grid, smallest dims first: 16 chips -> 4x4 (2D) or 2x2x4 (3D)."""
    if dims == 3 and chips < 8:
        return (*_grid(chips, 2), 1)
    shape = [1] * dims
    n = chips
    while n > 1:
        i = shape.index(min(shape))
        shape[i] *= 2
        n //= 2
    if math.prod(shape) != chips:  # not a power of two (v5p-12288: 16x16x24)
        raise ValueError(f"{chips} chips is not a power of two; give the topology explicitly.")
    return tuple(sorted(shape))


def parse_tpu_type(name: str) -> TpuType:
    """v5p-32, v5litepod-16 / v5e-16, v6e-8, v4-32 -> TpuType; a clear error for anything else."""
    known = ", ".join(f"{g.name}-N" for g in GENERATIONS.values())
    prefix, _, count = name.rpartition("-")
    gen = next((g for g in GENERATIONS.values() if prefix in (g.name, g.gcloud_prefix)), None)
    if gen is None or not count.isdigit():
        raise ValueError(f"TPU type {name!r} is not one this launcher knows; use one of {known} "
                         "(e.g. v5p-32, v5e-16, v6e-8, v4-32).")
    n = int(count)
    chips = n // gen.cores_per_chip
    if n % gen.cores_per_chip or chips not in SLICE_CHIPS[gen.name]:
        sizes = ", ".join(f"{gen.name}-{c * gen.cores_per_chip}" for c in SLICE_CHIPS[gen.name])
        raise ValueError(f"TPU type {name!r}: {gen.name} slices come in these sizes: {sizes}.")
    return TpuType(gen, chips)


# Google Cloud zone names: REGION-ZONE, the region a continent, a direction and a number (us-east5,
# europe-west4, northamerica-northeast1), the zone one letter.
ZONE = re.compile(r"[a-z]+-[a-z]+[0-9]+-[a-z]")


def check_zone_form(zone: str) -> None:
    if not ZONE.fullmatch(zone):
        raise ValueError(f"--zone={zone!r} is not a Google Cloud zone name: the form is REGION-ZONE, e.g. "
                         "us-east5-a (region us-east5, zone a); `gcloud compute tpus locations list` lists them.")


def check_zone(tpu: TpuType, zone: str) -> Optional[str]:
    """Refuse a malformed zone, or one the table knows does not offer this generation; -> a note when the
    table cannot judge the zone (a region it does not cover)."""
    check_zone_form(zone)
    region = zone.rsplit("-", 1)[0]
    if zone in tpu.generation.zones:
        return None
    if region not in KNOWN_REGIONS:
        return (f"--zone={zone} was not checked: the zone table lists North American zones only; "
                f"gcloud will say if {zone} has no {tpu.generation.name} (`gcloud compute tpus accelerator-types list "
                f"--zone={zone}` lists what it has).")
    raise ValueError(f"--zone={zone!r} does not offer {tpu.generation.name} according to "
                     f"cloud.google.com/tpu/docs/regions-zones; {tpu.generation.name} zones: "
                     f"{', '.join(tpu.generation.zones)}. Pick one of those, or pass --any-zone if your "
                     "project has capacity there (e.g. a reservation).")


def generation_of_device_kind(kind: str) -> Generation:
    for g in GENERATIONS.values():
        if g.device_kind == kind:
            return g
    raise ValueError(f"no HBM figure for device kind {kind!r}; known: {[g.device_kind for g in GENERATIONS.values()]}.")


def table(max_chips: int = 64) -> str:
    """The slice types up to max_chips, one per line (python -m launch.tpu_types)."""
    rows = ["type            chips  topology  hosts  HBM/chip  bf16 peak/chip  runtime version      zones"]
    for g in GENERATIONS.values():
        for chips in (c for c in SLICE_CHIPS[g.name] if c <= max_chips):
            t = TpuType(g, chips)
            rows.append(f"{t.accelerator_type:<15} {chips:>5}  {t.topology:<8}  {t.hosts:>5}  "
                        f"{g.hbm_bytes_per_chip / GiB:>5.0f} GiB  {g.peak_bf16_flops / 1e12:>7.0f} TFLOP/s  "
                        f"{g.runtime_version:<19}  {', '.join(g.zones)}")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
