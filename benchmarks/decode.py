"""Decoding throughput: KV-cached vs uncached greedy decoding on a small decoder-only model.

    python benchmarks/decode.py [--batch 1] [--prompt-len 16] [--d-model 256] [--layers 4] [--repeats 5]

Modes (greedy, EOS disabled so every row decodes all N tokens; compile time excluded):
  cached      t5like.decoding.generate: one jitted loop, KV cache preallocated to model.max_len slots,
              so every step costs the same and time should grow linearly in N (time(256)/time(128) ~ 2).
  cached_fit  the same with the cache sized to prompt + N (generate's default): attention reads a
              cache that is longer for larger N, so the ratio is a little above 2.
  uncached    each step a full forward over the whole sequence so far (padded to a multiple of 16 tokens
              to bound recompiles), argmax at the last position: work per step grows with the sequence,
              so total time grows quadratically once attention/projection over the sequence dominates.
Prints one JSON line per measurement, then one per mode with time(256)/time(128).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from t5like.config import model_preset
from t5like.decoding import DecodeConfig, generate
from t5like.models import build_model

BUCKET = 16


@functools.partial(jax.jit, static_argnums=(0, 3))
def _uncached_step(graphdef, state, buf_BL, width: int, cur: jax.Array):
    """Forward over the first `width` tokens (the sequence so far, padded), write argmax at slot `cur`."""
    model = nnx.merge(graphdef, state)
    logits_BWV = model({"inputs": buf_BL[:, :width]})
    token_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BWV, cur - 1, axis=1, keepdims=False), -1)
    return jax.lax.dynamic_update_index_in_dim(buf_BL, token_B.astype(buf_BL.dtype), cur, axis=1)


def uncached_greedy(model, prompt_BP: np.ndarray, new_tokens: int) -> np.ndarray:
    B, P = prompt_BP.shape
    graphdef, state = nnx.split(model)
    buf = np.zeros((B, P + 1 + new_tokens), np.int32)
    buf[:, 1:P + 1] = prompt_BP  # [BOS=0, prompt, generated...]
    buf = jnp.asarray(buf)
    for t in range(new_tokens):
        cur = P + 1 + t
        buf = _uncached_step(graphdef, state, buf, min(-(-cur // BUCKET) * BUCKET, buf.shape[1]), jnp.int32(cur))
    return np.asarray(buf[:, P + 1:])


def timed(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Best wall time of each fn over `repeats`, runs interleaved so that load on a shared machine hits
    every fn alike. The first call of each (compilation) is not timed."""
    outs = {k: fn() for k, fn in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            outs[k] = fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs=2, default=(128, 256))
    args = ap.parse_args()

    cfg = dataclasses.replace(model_preset("llama_style", "tiny"), d_model=args.d_model, num_layers=args.layers,
                              d_ff=args.d_model * 3, max_len=512)
    model = build_model(cfg, seed=0)
    prompt = np.random.RandomState(0).randint(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
    lengths = np.full(args.batch, args.prompt_len)
    common = dict(device=str(jax.devices()[0].platform), batch=args.batch, prompt_len=args.prompt_len,
                  d_model=cfg.d_model, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.kv_heads,
                  vocab=cfg.vocab_size)

    def runs(mode: str, n: int):
        if mode == "uncached":
            return lambda: uncached_greedy(model, prompt, n)
        cache_len = cfg.max_len if mode == "cached" else 0
        cfg_n = DecodeConfig(max_new_tokens=n, eos_id=-1, cache_len=cache_len)
        return lambda: generate(model, prompt, lengths, cfg_n)[0][:, 0]

    seconds: dict[str, dict[int, float]] = {}
    outputs: dict[str, dict[int, np.ndarray]] = {}
    for mode in ("cached", "cached_fit", "uncached"):
        best, outs = timed({n: runs(mode, n) for n in args.lengths}, args.repeats)
        seconds[mode], outputs[mode] = best, outs
        for n in args.lengths:
            cache_len = {"cached": cfg.max_len, "cached_fit": args.prompt_len + 1 + n}.get(mode)
            print(json.dumps(dict(common, mode=mode, new_tokens=n, cache_len=cache_len, seconds=round(best[n], 4),
                                  tokens_per_s=round(args.batch * n / best[n], 1))), flush=True)
    short, long = args.lengths
    for mode in seconds:
        agree = bool(np.array_equal(outputs[mode][long], outputs["uncached"][long]))
        print(json.dumps(dict(mode=mode, ratio=f"time({long})/time({short})",
                              value=round(seconds[mode][long] / seconds[mode][short], 2),
                              same_tokens_as_uncached=agree)), flush=True)


if __name__ == "__main__":
    main()
