"""Quantized decoding speed and memory: greedy decoding of a decoder-only model in full precision, with int8
(or int4) weight-only quantization, and with an int8 KV cache too (t5like.quantization.quantize_for_decoding).

    python benchmarks/int8_decode.py [--batch 1 8] [--new-tokens 128] [--d-model 512] [--layers 4]
                                     [--modes fp32 w8 w8kv8 w4] [--repeats 3]

Random weights (speed does not depend on them), RoPE/GQA/SwiGLU (the llama_style preset at the given width),
EOS off so every row decodes --new-tokens tokens, compile time excluded, modes interleaved and the best of
--repeats kept. One JSON line per (batch, mode): seconds, tokens/s, the speed-up over fp32, parameter and KV
cache bytes, and the fraction of greedy tokens equal to fp32's (random weights have near-tied logits: the
trained-model agreement is tests/test_quantization.py's).

Weight-only quantization saves memory everywhere; it saves time where decoding is bound by reading weights
and the int8 -> float conversion fuses into the matmul (TPU, GPU). XLA on CPU converts the weights to float
before the dot, so on CPU expect no speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from flax import nnx

from t5like import quantization
from t5like.config import model_preset
from t5like.decoding import DecodeConfig, generate
from t5like.models import build_model

MODES = {"fp32": ("none", "none"), "w8": ("int8", "none"), "w8kv8": ("int8", "int8"), "w4": ("int4", "none")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = dataclasses.replace(model_preset("llama_style", "tiny"), d_model=args.d_model, num_layers=args.layers,
                              d_ff=args.d_model * 3, max_len=args.prompt_len + args.new_tokens + 1)
    base = build_model(cfg, seed=0)
    models = {m: base if MODES[m] == ("none", "none") else
              quantization.quantize_for_decoding(base, weights=MODES[m][0], kv_cache=MODES[m][1]) for m in args.modes}
    decode = DecodeConfig(max_new_tokens=args.new_tokens, eos_id=-1)
    for batch in args.batch:
        prompt = np.random.RandomState(0).randint(3, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        lengths = np.full(batch, args.prompt_len)
        run = {m: (lambda model=model: np.asarray(generate(model, prompt, lengths, decode)[0][:, 0]))
               for m, model in models.items()}
        outs = {m: fn() for m, fn in run.items()}  # compile
        best = {m: float("inf") for m in run}
        for _ in range(args.repeats):
            for m, fn in run.items():
                start = time.perf_counter()
                outs[m] = fn()
                best[m] = min(best[m], time.perf_counter() - start)
        for m, model in models.items():
            cache = jax.eval_shape(lambda model=model: model.init_cache(np.zeros(batch, np.int32),
                                                                        args.prompt_len + 1 + args.new_tokens))
            row = dict(device=jax.devices()[0].platform, batch=batch, mode=m, d_model=cfg.d_model,
                       layers=cfg.num_layers, new_tokens=args.new_tokens, seconds=round(best[m], 4),
                       tokens_per_s=round(batch * args.new_tokens / best[m], 1),
                       param_bytes=quantization.weight_bytes(nnx.state(model)),
                       kv_cache_bytes=quantization.nbytes(cache.self_kv))
            if "fp32" in best:
                row["speedup_vs_fp32"] = round(best["fp32"] / best[m], 3)
                row["same_greedy_tokens_as_fp32"] = round(float((outs[m] == outs["fp32"]).mean()), 3)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
