"""Peak FLOP/s, MFU, and the metric writers (metrics.jsonl + TensorBoard).

MFU = model FLOPs per step (t5like.accounting.training_flops, causal attention halved)
      / step time / (peak FLOP/s per device x devices).
Peaks are dense matmul figures per compute dtype from the vendors' data sheets; a device or dtype the
table does not know gives MFU None (null in metrics.jsonl) and one warning, never a stopped run. On CPU there is no data sheet:
the peak is one jitted fp32 2048x2048x2048 matmul measured in the same process. `train.peak_flops` overrides both.
"""
from __future__ import annotations

import functools
import json
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp

from t5like import storage

# device_kind substring -> dense matmul peak FLOP/s per chip, by compute dtype, from the vendors' data
# sheets. TPUs run float32 matmuls at JAX's default precision as one bfloat16 pass, so their float32
# entry is the bf16 figure. NVIDIA float32 matmuls run on TF32 tensor cores at default precision.
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},   # v5e
    "TPU v5e": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},   # v6e (Trillium)
    "TPU v6e": {"bfloat16": 918e12, "float32": 918e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},   # SXM; PCIe is ~756e12 bf16
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
}


@functools.cache
def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of one jitted fp32 n^3 matmul: the best of `repeats` after a warm-up. Measured once per process
    (0.7 s on 2 cores), so runs started one after another in a process share it."""
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


def peak_flops_per_device(device: Optional[jax.Device] = None, dtype: str = "bfloat16",
                          given: float = 0.0) -> tuple[Optional[float], str]:
    """(peak FLOP/s for `dtype` matmuls, where it came from) for one device; (None, why) when unknown,
    so MFU is reported as unknown rather than stopping a run. `given` (train.peak_flops), when not 0, wins."""
    if given:
        return given, "train.peak_flops"
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        return measure_cpu_peak(), "measured fp32 2048^3 matmul"
    for kind, peaks in PEAK_FLOPS.items():
        if kind.lower() in device.device_kind.lower():
            if dtype in peaks:
                return peaks[dtype], f"table: {kind} {dtype}"
            return None, f"no {dtype} peak in the table for {kind}"
    return None, f"no peak FLOP/s known for device_kind={device.device_kind!r} (add it to t5like.metrics.PEAK_FLOPS)"


def summary_writer_class():
    """tensorboardX's SummaryWriter. Where torch is installed but not yet imported, tensorboardX would import
    it only to recognise torch tensors, which t5like never logs (Python floats only): seconds at every
    start of a run. The import is hidden from it while it loads, and restored for everyone else."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """WORKDIR/metrics.jsonl (one JSON object per line) mirrored to TensorBoard. Only process 0 writes.

    The readers' contract: every step appears once, in order. A run resumed from a checkpoint at step S
    first truncates the file back to the rows with step <= S (one atomic replace), and TensorBoard is
    told to purge the events after S, so the steps a killed run logged after its last checkpoint are
    dropped rather than duplicated. Local files are appended line by line; a Cloud Storage object cannot
    be appended to, so there the rows are buffered and the object rewritten on flush (every
    `remote_flush_s`, at each checkpoint and at close).
    """

    def __init__(self, workdir: str, resume_step: Optional[int] = None, remote_flush_s: float = 30.0):
        self.enabled = jax.process_index() == 0
        self.path = storage.join(workdir, "metrics.jsonl")
        self.remote = storage.is_remote(workdir)
        self.remote_flush_s, self.last_flush = remote_flush_s, time.monotonic()
        self.rows: list[str] = []
        self.file = self.tb = None
        if not self.enabled:
            return
        kept = [json.dumps(r) for r in read_metrics(workdir) if resume_step is not None and r["step"] <= resume_step]
        if self.remote:
            self.rows = kept
            self.flush()
        else:
            storage.write_atomic(self.path, "".join(line + "\n" for line in kept))
            self.file = open(self.path, "a")
        self.tb = summary_writer_class()(storage.join(workdir, "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: (None if v is None else float(v)) for k, v in metrics.items()}}
        line = json.dumps(row)
        if self.remote:
            self.rows.append(line)
            if time.monotonic() - self.last_flush > self.remote_flush_s:
                self.flush()
        else:
            self.file.write(line + "\n")
            self.file.flush()
        for k, v in row.items():
            if k != "step" and v is not None:
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self.remote:
            storage.write_atomic(self.path, "".join(line + "\n" for line in self.rows))
            self.last_flush = time.monotonic()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self.file is not None:
                self.file.close()
            self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl. A run killed mid-write leaves its last line cut short: that line is
    dropped with a warning (a resumed run rewrites the file without it). A bad line before the last is an error."""
    path = storage.join(workdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    lines = [(n, line) for n, line in enumerate(storage.read_text(path).splitlines(), 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                print(f"warning: {path} line {n} is cut short ({line[:80]!r}), as a killed run leaves it; "
                      "ignoring it.", file=sys.stderr)
                break
            raise ValueError(f"{path} line {n} is not valid JSON ({e}): {line[:80]!r}. Only a run's last line may "
                             "be cut short; fix or delete that line.") from None
    return rows
