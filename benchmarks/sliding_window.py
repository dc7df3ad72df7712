"""Sliding-window attention on CPU: the blockwise XLA path against dense masked attention, forward and backward,
at a fixed window W and growing T; one JSON line per (path, T).

    python benchmarks/sliding_window.py [--lengths 1024 2048 4096 8192] [--window 256] [--repeats 5]

Both paths compute the same thing (layers.attention_kernel with model.attention_window=W, causal, packed rows):
"blockwise" is layers.windowed_attention, whose cost grows with T*W; "dense" masks the full [T, T] logits, whose
cost grows with T^2 (at T = 8192 its [4, 8192, 8192] fp32 logits are 1 GiB, and the backward
keeps a few such arrays). Each figure is the median of --repeats calls of the jitted gradient (q, k, v) after one
warm-up call. `ratio` is the time over the previous length's: ~2 per doubling is linear, ~4 quadratic.
Run it on an idle machine: other processes on the cores skew the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from t5like import layers as L
from t5like.sharding import Sharder


def seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--paths", nargs="+", default=["blockwise", "dense"], choices=["blockwise", "dense"])
    args = ap.parse_args()
    B, N, K, H, W = args.batch, args.heads, args.kv_heads, args.head_dim, args.window
    previous: dict[str, float] = {}
    for T in args.lengths:
        ks = jax.random.split(jax.random.key(T), 3)
        q = jax.random.normal(ks[0], (B, T, N, H))
        k, v = (jax.random.normal(key, (B, T, K, H)) for key in ks[1:])
        seg = jnp.asarray(np.repeat(np.arange(1, 5), -(-T // 4))[None, :T].repeat(B, 0))  # 4 packed documents
        mask = L.attention_mask(seg, seg, causal=True, window=W)
        attend = {"blockwise": lambda q, k, v: L.windowed_attention(q, k, v, mask),
                  "dense": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense(),
                                                                        implementation="xla")}
        for path in args.paths:
            f = attend[path]
            step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
            s = seconds(step, (q, k, v), args.repeats)
            row = {"path": path, "T": T, "window": W, "seconds": round(s, 5),
                   "ratio": round(s / previous[path], 2) if path in previous else None}
            previous[path] = s
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
