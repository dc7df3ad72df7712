"""Peak FLOP/s, MFU, and the metric writers (metrics.jsonl + TensorBoard).

MFU = model FLOPs per step (t5like.accounting.training_flops, causal attention halved)
      / step time / (peak FLOP/s per device x devices).
Peaks are dense bf16 matmul figures from the vendors' data sheets. On CPU there is no data sheet:
the peak is one jitted fp32 2048x2048x2048 matmul measured in the same process.
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp

# device_kind substring -> dense bf16 peak FLOP/s per device (chip).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "H200": 989e12,
    "H100": 989e12,          # SXM; PCIe is ~756e12
    "A100": 312e12,
    "L4": 121e12,
}


def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one jitted fp32 n^3 matmul: the best of `repeats` after a warm-up."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def peak_flops_per_device(device: Optional[jax.Device] = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for one device."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak(), "measured fp32 2048^3 matmul"
    for kind, peak in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            return peak, f"table: {kind}"
    raise ValueError(f"no peak FLOP/s known for device_kind={device.device_kind!r}; add it to "
                     "t5like.metrics.PEAK_FLOPS.")


class MetricsWriter:
    """Appends one JSON object per line to WORKDIR/metrics.jsonl and mirrors scalars to TensorBoard.
    Only process 0 writes."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.enabled else None
        self.tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter
            self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step":
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
