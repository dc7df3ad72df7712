"""t5like's train step against Hugging Face transformers on the same shape, in one process; one JSON line.

    python benchmarks/vs_hf.py [--shape gpt2-bench] [--rounds 8] [key=value ...]

Peer: `transformers.GPT2LMHeadModel` (random init, no download) + `torch.optim.AdamW`, gradient clipping
at 1.0 like t5like's default, torch on the CPU with 2 threads (`--torch-threads`), eager, its default
attention ("sdpa"). t5like: the trainer's own jitted step (t5like.train.build), which blocks on its
metrics every step as the trainer does with train.log_every=1.

The two steps and the peak matmul run interleaved (t5like, HF, matmul, t5like, ...), so load from other
processes on a shared machine hits both alike; each figure is the median over `--rounds`. tokens/s =
batch x seq_len / step time. MFU = t5like's model FLOPs per step / step time / peak, the peak being the
fastest jitted fp32 2048^3 matmul seen in this run (t5like.metrics's definition).
Only decoder shapes have a HF peer here.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.train_step import SHAPES, random_batch  # noqa: E402
from t5like import train  # noqa: E402
from t5like.config import apply_overrides  # noqa: E402


def hf_step_fn(cfg, batch: dict, threads: int):
    """A closure running one HF GPT-2 train step (forward, backward, clip, AdamW) on `batch`."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    m = cfg.model
    hf_cfg = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
        n_inner=m.d_ff, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout,
        embd_pdrop=m.dropout, attn_pdrop=m.dropout, tie_word_embeddings=m.tie_embeddings, bos_token_id=0,
        eos_token_id=0)
    model = transformers.GPT2LMHeadModel(hf_cfg).train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    ids = torch.from_numpy(np.asarray(batch["inputs"], np.int64))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step, sum(p.numel() for p in model.parameters())


def t5like_step_fn(cfg, batch: dict):
    setup = train.build(cfg, batch)
    gbatch = train.global_batch(setup, batch)
    box = [setup.init_state()]

    def step():
        box[0], metrics = setup.train_step(box[0], gbatch)
        return float(metrics["loss"])  # blocks, as the trainer's logging does every step

    return step, setup


def matmul_fn(n: int = 2048):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    return lambda: mm(a, b).block_until_ready(), 2 * n ** 3


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-bench", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (each: one step of each, one matmul)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="t5like config overrides, e.g. model.scan_unroll=1")
    args = ap.parse_args(argv)
    cfg = apply_overrides(SHAPES[args.shape], args.overrides).validate()
    if cfg.model.family != "decoder":
        raise SystemExit("error: vs_hf.py compares decoder shapes only (HF peer: GPT2LMHeadModel).")

    batch = random_batch(cfg, np.random.RandomState(0))
    ours, setup = t5like_step_fn(cfg, batch)
    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    hf, hf_params = hf_step_fn(cfg, batch, args.torch_threads)
    matmul, matmul_flops = matmul_fn()
    fns = {"t5like": ours, "hf": hf, "matmul": matmul}
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    losses = {}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t)
            losses[name] = out
    step = {k: statistics.median(v) for k, v in times.items()}
    peak = matmul_flops / min(times["matmul"])
    tokens = setup.tokens_per_step
    result = {
        "shape": args.shape, "overrides": args.overrides, "rounds": args.rounds,
        "t5like_tokens_per_s": round(tokens / step["t5like"], 1), "hf_tokens_per_s": round(tokens / step["hf"], 1),
        "ratio_t5like_to_hf": round(step["hf"] / step["t5like"], 3),
        "t5like_mfu": round(setup.flops_per_step / step["t5like"] / peak, 3),
        "t5like_step_s": round(step["t5like"], 4), "hf_step_s": round(step["hf"], 4),
        "t5like_step_s_all": [round(t, 3) for t in times["t5like"]], "hf_step_s_all": [round(t, 3) for t in times["hf"]],
        "peak_flops_per_s": round(peak), "peak_source": "fastest fp32 2048^3 jitted matmul in this run",
        "model_flops_per_step": setup.flops_per_step, "t5like_compile_s": round(compile_s, 1),
        "hf_params": hf_params, "t5like_loss": round(losses["t5like"], 4), "hf_loss": round(losses["hf"], 4),
        "torch_threads": args.torch_threads, "device": jax.devices()[0].device_kind,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
