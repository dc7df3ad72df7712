"""Hugging Face interop at a real size: import, export and parity for a GPT-2-small-shaped (124M) checkpoint.

    python benchmarks/hf_interop.py [--arch gpt2|llama] [--dir DIR]

Builds a randomly initialised transformers model of the real shape in DIR (no download; needs torch and
transformers), then times t5like.hf.load_pretrained (safetensors -> numpy -> sharded device arrays) and
save_pretrained, and prints one JSON line: seconds, the max |logit| difference against transformers on
2 x 64 tokens, and whether every exported tensor is bitwise equal to the original.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax.numpy as jnp
import numpy as np


def make_checkpoint(arch: str, out: str):
    import torch
    import transformers as tf
    torch.manual_seed(0)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config())  # 124M: 12 layers, d=768, 12 heads, vocab 50257
    else:  # a TinyLlama-shaped layer stack, cut to 4 layers to stay CPU-sized: GQA 32/4, untied head
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                                                   num_key_value_heads=4, num_hidden_layers=4, vocab_size=32000))
    model.eval().save_pretrained(out)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"))
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp()
    try:
        run(args.arch, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def run(arch: str, root: str) -> None:
    import torch
    from safetensors.numpy import load_file

    from t5like.hf import load_pretrained, save_pretrained

    hf_dir, out_dir = os.path.join(root, "hf"), os.path.join(root, "exported")
    reference = make_checkpoint(arch, hf_dir)
    t0 = time.perf_counter()
    cfg, model = load_pretrained(hf_dir)
    t_load = time.perf_counter() - t0
    ids = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 64))
    ours = np.asarray(model({"inputs": jnp.asarray(ids)}))
    with torch.no_grad():
        ref = reference(input_ids=torch.tensor(ids)).logits.numpy()
    t0 = time.perf_counter()
    save_pretrained(model, out_dir)
    t_save = time.perf_counter() - t0
    a, b = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(out_dir, "model.safetensors"))
    print(json.dumps({
        "arch": arch, "params": int(sum(v.size for v in a.values())),
        "safetensors_mb": round(os.path.getsize(os.path.join(hf_dir, "model.safetensors")) / 2**20),
        "load_pretrained_s": round(t_load, 2), "save_pretrained_s": round(t_save, 2),
        "max_abs_logit_diff": float(np.abs(ours - ref).max()), "max_abs_logit": float(np.abs(ref).max()),
        "bitwise_round_trip": all(a[k].tobytes() == b[k].tobytes() for k in a), "tensors": len(a)}))


if __name__ == "__main__":
    main()
