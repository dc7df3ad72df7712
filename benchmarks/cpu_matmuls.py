"""fp32 matmul throughput of XLA (jitted jnp.matmul) and torch on the gpt2-bench shapes; one JSON line each.

    python benchmarks/cpu_matmuls.py [--torch-threads 2] [--repeats 10]

Shapes are [M, K] @ [K, N] with M = batch x seq = 2048 tokens: a 2048^3 square (the CPU "peak" of
t5like.metrics), the MLP's up projection, a weight gradient of it, and the vocabulary projection.
Each figure is the mean of --repeats calls after 3 warm-up calls; the two libraries alternate per shape.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {"square_2048": (2048, 2048, 2048), "mlp_up": (2048, 384, 1536), "mlp_up_weight_grad": (384, 2048, 1536),
          "logits": (2048, 384, 8192)}


def mean_seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.torch_threads)
    matmul = jax.jit(jnp.matmul)
    rng = np.random.RandomState(0)
    for name, (m, k, n) in SHAPES.items():
        a, b = rng.randn(m, k).astype(np.float32), rng.randn(k, n).astype(np.float32)
        ta, tb, ja, jb = torch.from_numpy(a), torch.from_numpy(b), jnp.asarray(a), jnp.asarray(b)
        flops = 2 * m * k * n
        xla = flops / mean_seconds(lambda: matmul(ja, jb).block_until_ready(), args.repeats)
        pt = flops / mean_seconds(lambda: ta @ tb, args.repeats)
        print(json.dumps({"shape": name, "mkn": [m, k, n], "xla_gflops": round(xla / 1e9, 1),
                          "torch_gflops": round(pt / 1e9, 1), "torch_threads": args.torch_threads,
                          "device": jax.devices()[0].device_kind}))


if __name__ == "__main__":
    main()
