"""Decoding throughput: KV-cached vs uncached greedy decoding on a small decoder-only model, and HF.

    python benchmarks/decode.py [--batch 1 8] [--modes cached cached_fit uncached hf] [--prompt-len 16]
                                [--d-model 256] [--layers 4] [--repeats 5]
    python benchmarks/decode.py --batch 1 8 --modes cached_fit hf     # t5like against HF transformers

Modes (greedy, EOS disabled so every row decodes all N tokens; compile time excluded):
  cached      t5like.decoding.generate: one jitted loop, KV cache preallocated to model.max_len slots.
              Attention reads the shortest of `t5like.layers.cache_read_lengths` that holds every filled
              slot, so the unfilled end of the cache costs little.
  cached_fit  the same with the cache sized to prompt + N (generate's default).
  uncached    each step a full forward over the whole sequence so far (padded to a multiple of 16 tokens
              to bound recompiles), argmax at the last position: work per step grows with the sequence,
              so total time grows quadratically once attention/projection over the sequence dominates.
  hf          transformers' LlamaForCausalLM of the same shape (random init, RoPE, RMSNorm, SwiGLU, GQA,
              untied) and `generate(do_sample=False, use_cache=True)` with its dynamic KV cache, torch on
              the CPU with --torch-threads threads; EOS off (min_new_tokens = max_new_tokens).
All modes of one batch size run interleaved (best of --repeats each). Prints one JSON line per
measurement, then one per mode with time(long)/time(short), and per batch the cached_fit/hf ratio.
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


def hf_greedy_fn(cfg, prompt_BP: np.ndarray, threads: int):
    """(n -> new tokens [B, n]) with HF generate on a Llama of `cfg`'s shape."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    ids = torch.from_numpy(np.concatenate([np.zeros((prompt_BP.shape[0], 1), np.int64), prompt_BP], 1))

    def run(n: int) -> np.ndarray:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                                 max_new_tokens=n, min_new_tokens=n)
        return out[:, ids.shape[1]:].numpy()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--modes", nargs="+", default=["cached", "cached_fit", "uncached"],
                    choices=["cached", "cached_fit", "uncached", "hf"])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs=2, default=(128, 256))
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()

    cfg = dataclasses.replace(model_preset("llama_style", "tiny"), d_model=args.d_model, num_layers=args.layers,
                              d_ff=args.d_model * 3, max_len=512)
    model = build_model(cfg, seed=0)
    for batch in args.batch:
        prompt = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        lengths = np.full(batch, args.prompt_len)
        common = dict(device=str(jax.devices()[0].platform), batch=batch, prompt_len=args.prompt_len,
                      d_model=cfg.d_model, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.kv_heads,
                      vocab=cfg.vocab_size)
        hf = hf_greedy_fn(cfg, prompt, args.torch_threads) if "hf" in args.modes else None

        def runs(mode: str, n: int):
            if mode == "uncached":
                return lambda: uncached_greedy(model, prompt, n)
            if mode == "hf":
                return lambda: hf(n)
            cache_len = cfg.max_len if mode == "cached" else 0
            cfg_n = DecodeConfig(max_new_tokens=n, eos_id=-1, cache_len=cache_len)
            return lambda: generate(model, prompt, lengths, cfg_n)[0][:, 0]

        best, outs = timed({(mode, n): runs(mode, n) for mode in args.modes for n in args.lengths}, args.repeats)
        for mode in args.modes:
            for n in args.lengths:
                cache_len = {"cached": cfg.max_len, "cached_fit": args.prompt_len + 1 + n}.get(mode)
                print(json.dumps(dict(common, mode=mode, new_tokens=n, cache_len=cache_len,
                                      seconds=round(best[mode, n], 4),
                                      tokens_per_s=round(batch * n / best[mode, n], 1))), flush=True)
        short, long = args.lengths
        for mode in args.modes:
            row = dict(batch=batch, mode=mode, ratio=f"time({long})/time({short})",
                       value=round(best[mode, long] / best[mode, short], 2))
            if "uncached" in args.modes and mode != "hf":
                row["same_tokens_as_uncached"] = bool(np.array_equal(outs[mode, long], outs["uncached", long]))
            print(json.dumps(row), flush=True)
        if "hf" in args.modes and "cached_fit" in args.modes:
            print(json.dumps(dict(batch=batch, new_tokens=long, t5like_cached_fit_over_hf_tokens_per_s=round(
                best["hf", long] / best["cached_fit", long], 2))), flush=True)


if __name__ == "__main__":
    main()
