"""t5like's train step against Hugging Face transformers on the same shape, in one process; one JSON line.

    python benchmarks/vs_hf.py [--shape gpt2-bench] [--rounds 8] [key=value ...]

Peer: `transformers.GPT2LMHeadModel` (gpt2 shapes) or `LlamaForCausalLM` (llama-1b), random init, no
download, + `torch.optim.AdamW`, gradient clipping at 1.0 like t5like's default; eager, its default
attention ("sdpa"); on the GPU when there is one (bf16 shapes under torch.autocast, fp32 parameters
and AdamW state like t5like's), else the CPU with 2 threads (`--torch-threads`). t5like: the trainer's
own jitted step (t5like.train.build), which blocks on its metrics every step as the trainer does with
train.log_every=1.

The two steps and the peak matmul run interleaved (t5like, HF, matmul, t5like, ...), so load from other
processes on a shared machine hits both alike; each figure is the median over `--rounds`. tokens/s =
batch x seq_len / step time. MFU = model FLOPs per step (t5like.accounting; the same for both) / step
time / peak. On the CPU the peak is the fastest jitted fp32 2048^3 matmul seen in this run
(t5like.metrics's definition); on a GPU it is the datasheet's dense peak for the compute dtype
(t5like.metrics.PEAK_FLOPS). Only decoder shapes have a HF peer here.
The printed losses are sanity checks, not a comparison: both sides train on one repeated random batch,
HF's AdamW at the peak learning rate from its first step, t5like's through its warmup schedule.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# On a GPU, JAX would otherwise take 75% of its memory at start-up, in the HF child process too.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks.train_step import SHAPES, random_batch  # noqa: E402
from t5like import train  # noqa: E402
from t5like.config import apply_overrides  # noqa: E402
from t5like.metrics import peak_flops_per_device  # noqa: E402


def hf_model(cfg):
    """The HF model of the same shape, randomly initialised (no download): GPT-2 or Llama."""
    import transformers

    m = cfg.model
    if m.activation == "swiglu":  # the llama_style preset
        hf_cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.d_ff, num_hidden_layers=m.num_layers,
            num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.dim_per_head,
            max_position_embeddings=m.max_len, rms_norm_eps=m.norm_eps,
            tie_word_embeddings=m.tie_embeddings, attention_bias=m.use_bias, mlp_bias=m.use_bias)
        return transformers.LlamaForCausalLM(hf_cfg)
    hf_cfg = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers, n_head=m.num_heads,
        n_inner=m.d_ff, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout,
        embd_pdrop=m.dropout, attn_pdrop=m.dropout, tie_word_embeddings=m.tie_embeddings, bos_token_id=0,
        eos_token_id=0)
    return transformers.GPT2LMHeadModel(hf_cfg)


def hf_step_fn(cfg, batch: dict, threads: int, device: str):
    """A closure running one HF train step (forward, backward, clip, AdamW) on `batch`. fp32 parameters
    and optimizer state; a bf16/fp16 compute dtype runs under torch.autocast (HF Trainer's bf16=True)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = hf_model(cfg).to(device).train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay)
    ids = torch.from_numpy(np.asarray(batch["inputs"], np.int64)).to(device)
    dtype = getattr(torch, cfg.model.dtype)
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the GPU

    return step, sum(p.numel() for p in model.parameters())


def t5like_step_fn(setup, batch: dict):
    """A closure running t5like's jitted train step, and the seconds its first call (the compile) took."""
    gbatch = train.global_batch(setup, batch)
    box = [setup.init_state()]

    def step():
        box[0], metrics = setup.train_step(box[0], gbatch)
        return float(metrics["loss"])  # blocks, as the trainer's logging does every step

    start = time.perf_counter()
    step()
    return step, time.perf_counter() - start


MATMUL_N = 2048
MATMUL_FLOPS = 2 * MATMUL_N ** 3


def matmul_fn():
    a = jax.random.normal(jax.random.key(0), (MATMUL_N, MATMUL_N), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (MATMUL_N, MATMUL_N), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)

    def matmul():
        mm(a, b).block_until_ready()
    return matmul


def timed(fns: dict, rounds: int, warmup: int) -> tuple[dict, dict]:
    """Per-call seconds of each function, interleaved round by round, and each one's last return value."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, last = {k: [] for k in fns}, {}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t)
    return times, last


def run_alone(argv: list[str], which: str) -> dict:
    """This script in a child process timing one side only, so each has the GPU's memory to itself."""
    proc = subprocess.run([sys.executable, __file__, *argv, "--only", which], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"error: the {which} side failed (exit {proc.returncode}); its output is above.")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gpt2-bench", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=8, help="timed rounds (each: one step of each, one matmul)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--only", choices=("t5like", "hf"), default=None,
                    help="time one side (on a GPU each side runs alone in its own child process)")
    ap.add_argument("overrides", nargs="*", help="t5like config overrides, e.g. model.scan_unroll=1")
    args = ap.parse_args(argv)
    cfg = apply_overrides(SHAPES[args.shape], args.overrides).validate()
    if cfg.model.family != "decoder":
        raise SystemExit(f"error: vs_hf.py compares decoder shapes only (HF peers: GPT2LMHeadModel, LlamaForCausalLM); "
                         f"--shape {args.shape} has model.family={cfg.model.family!r}.")
    on_gpu = jax.devices()[0].platform == "gpu"
    batch = random_batch(cfg, np.random.RandomState(0))
    setup = train.build(cfg, batch)
    fns, compile_s, hf_params = {}, None, None
    if on_gpu and args.only is None:
        # Both models' weights, AdamW state and activations do not fit one GPU's memory together, and
        # JAX's allocator keeps what it took: time each side in its own process, one after the other.
        sides = {which: run_alone(argv, which) for which in ("t5like", "hf")}
        times = {which: sides[which]["times"][which] for which in sides}
        last = {which: sides[which]["last"][which] for which in sides}
        compile_s, hf_params = sides["t5like"]["compile_s"], sides["hf"]["hf_params"]
    else:
        if args.only in (None, "t5like"):
            fns["t5like"], compile_s = t5like_step_fn(setup, batch)
        if args.only in (None, "hf"):
            fns["hf"], hf_params = hf_step_fn(cfg, batch, args.torch_threads, "cuda" if on_gpu else "cpu")
        if not on_gpu:
            fns["matmul"] = matmul_fn()
        times, last = timed(fns, args.rounds, args.warmup)
        if args.only:
            print(json.dumps({"times": times, "last": last, "compile_s": compile_s, "hf_params": hf_params}))
            return {}
    step = {k: statistics.median(v) for k, v in times.items()}
    if on_gpu:
        peak, peak_source = peak_flops_per_device(dtype=cfg.model.dtype, given=cfg.train.peak_flops)
    else:
        peak, peak_source = MATMUL_FLOPS / min(times["matmul"]), "fastest fp32 2048^3 jitted matmul in this run"
    tokens = setup.tokens_per_step
    result = {
        "shape": args.shape, "overrides": args.overrides, "rounds": args.rounds,
        "t5like_tokens_per_s": round(tokens / step["t5like"], 1), "hf_tokens_per_s": round(tokens / step["hf"], 1),
        "ratio_t5like_to_hf": round(step["hf"] / step["t5like"], 3),
        "t5like_mfu": round(setup.flops_per_step / step["t5like"] / peak, 3),
        "hf_mfu": round(setup.flops_per_step / step["hf"] / peak, 3),
        "t5like_step_s": round(step["t5like"], 4), "hf_step_s": round(step["hf"], 4),
        "t5like_step_s_all": [round(t, 3) for t in times["t5like"]], "hf_step_s_all": [round(t, 3) for t in times["hf"]],
        "peak_flops_per_s": round(peak), "peak_source": peak_source,
        "model_flops_per_step": setup.flops_per_step, "t5like_compile_s": round(compile_s, 1),
        "hf_params": hf_params, "t5like_loss": round(last["t5like"], 4), "hf_loss": round(last["hf"], 4),
        "torch_threads": args.torch_threads, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
