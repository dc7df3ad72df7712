"""Time the jitted train step on the current devices; print one JSON line.

    python benchmarks/train_step.py --shape gpt2-bench [key=value ...] [--steps 10]

The step is the trainer's own (t5like.train.build), fed random tokens so that data loading is not
timed. Timing starts after compile and warm-up. MFU = model FLOPs per step (t5like.accounting, causal
attention halved) / step time / peak. On CPU the peak is one jitted fp32 2048^3 matmul measured here.

Two host loops, interleaved in rounds of --chunk steps (median per step of each):
  step_s          as t5like.train with train.log_every=1: put the numpy batch on the devices, run the
                  step, then read the metrics to the host (float()), which waits for the step to finish.
  step_s_lagged   the same, but a step's metrics are read only after the next step was dispatched, so
                  the host's work (batch transfer, logging) overlaps the device's.

A/B of two configs in one process: `--vs model.scan_unroll=1` builds a second step with those overrides
(on top of the others) and alternates blocking steps of the two: step_s_vs, and speedup = step_s_vs / step_s.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import numpy as np

from t5like import train
from t5like.config import Config, ModelConfig, OptimConfig, TrainConfig, apply_overrides, model_preset
from t5like.data import DataConfig
from t5like.metrics import peak_flops_per_device

SHAPES = {
    # GPT-2-style decoder: 6 layers, d_model 384, 6 heads, d_ff 1536, vocab 8192, seq 256, batch 8, fp32, AdamW.
    "gpt2-bench": Config(
        model=ModelConfig(family="decoder", vocab_size=8192, d_model=384, num_heads=6, d_ff=1536, num_layers=6,
                          max_len=256, position="learned", activation="gelu", norm="layernorm", use_bias=True,
                          tie_embeddings=True, dropout=0.0, dtype="float32", param_dtype="float32"),
        data=DataConfig(objective="lm", seq_len=256),
        optim=OptimConfig(name="adamw"),
        train=TrainConfig(batch_size=8, steps=1000),
        workdir="/tmp/t5like-bench"),
    # GPU shapes (issue 13): TinyLlama's 1.1B Llama shape at seq 2048, and GPT-2 small (124M) at seq 1024;
    # bf16 compute with fp32 parameters and AdamW state, no dropout, no remat (fits one 80 GB H100 unrolled;
    # scanned, batch 8 ran out of memory).
    "llama-1b": Config(
        model=dataclasses.replace(model_preset("llama_style"), dtype="bfloat16"),
        data=DataConfig(objective="lm", seq_len=2048),
        optim=OptimConfig(name="adamw"),
        train=TrainConfig(batch_size=8, steps=1000),
        workdir="/tmp/t5like-bench"),
    "gpt2-small": Config(
        model=dataclasses.replace(model_preset("gpt2_small"), dtype="bfloat16", dropout=0.0),
        data=DataConfig(objective="lm", seq_len=1024),
        optim=OptimConfig(name="adamw"),
        train=TrainConfig(batch_size=16, steps=1000),
        workdir="/tmp/t5like-bench"),
}


def random_batch(cfg: Config, rng: np.random.RandomState) -> dict:
    B, L, V = cfg.train.batch_size // jax.process_count(), cfg.data.seq_len, cfg.model.vocab_size
    tokens = rng.randint(3, V, (B, L + 1)).astype(np.int32)
    ones = np.ones((B, L), np.int32)
    positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
    if cfg.model.family == "encoder_decoder":
        T = cfg.data.target_len or L // 4
        return dict(encoder_inputs=tokens[:, :L], encoder_segment_ids=ones, encoder_positions=positions,
                    decoder_inputs=tokens[:, :T], targets=tokens[:, 1:T + 1], weights=np.ones((B, T), np.float32),
                    decoder_segment_ids=ones[:, :T], decoder_positions=positions[:, :T])
    return dict(inputs=tokens[:, :L], targets=tokens[:, 1:], weights=np.ones((B, L), np.float32),
                segment_ids=ones, positions=positions)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compile")
    parser.add_argument("--chunk", type=int, default=2, help="steps per round of each host loop")
    parser.add_argument("--vs", nargs="+", default=None, metavar="KEY=VALUE",
                        help="overrides of a second config timed against this one, interleaved")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.remat=full")
    args = parser.parse_args(argv)
    cfg = apply_overrides(SHAPES[args.shape], args.overrides).validate()

    rng = np.random.RandomState(0)
    local = [random_batch(cfg, rng) for _ in range(4)]
    setup = train.build(cfg, local[0])
    state = setup.init_state()
    start = time.perf_counter()
    state, metrics = setup.train_step(state, train.global_batch(setup, local[0]))
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for i in range(args.warmup):
        state, metrics = setup.train_step(state, train.global_batch(setup, local[i % len(local)]))
    jax.block_until_ready(metrics)

    def blocking(state, n):
        for i in range(n):
            state, metrics = setup.train_step(state, train.global_batch(setup, local[i % len(local)]))
            row = jax.tree.map(float, metrics)
        return state, row

    def lagged(state, n):
        pending = None
        for i in range(n):
            state, metrics = setup.train_step(state, train.global_batch(setup, local[i % len(local)]))
            if pending is not None:
                jax.tree.map(float, pending)  # the previous step read on the host, as the trainer does
            pending = metrics
        return state, jax.tree.map(float, pending)

    loops = {"step_s": blocking, "step_s_lagged": lagged}
    states = {"step_s": state, "step_s_lagged": state}
    if args.vs:
        cfg_b = apply_overrides(cfg, args.vs).validate()
        setup_b = train.build(cfg_b, local[0])
        states["step_s_vs"] = setup_b.init_state()
        for _ in range(1 + args.warmup):
            states["step_s_vs"], m = setup_b.train_step(states["step_s_vs"], train.global_batch(setup_b, local[0]))
        jax.block_until_ready(m)

        def blocking_b(state, n):
            for i in range(n):
                state, metrics = setup_b.train_step(state, train.global_batch(setup_b, local[i % len(local)]))
                row = jax.tree.map(float, metrics)
            return state, row
        loops["step_s_vs"] = blocking_b
    times = {name: [] for name in loops}
    chunk = min(args.chunk, args.steps)
    for _ in range(max(args.steps // chunk, 1)):
        for name, loop in loops.items():
            start = time.perf_counter()
            # The lagged loop continues the blocking loop's state (the same params and optimizer).
            key = "step_s" if name == "step_s_lagged" else name
            states[key], metrics_n = loop(states[key], chunk)
            times[name].append((time.perf_counter() - start) / chunk)
            if name == "step_s":
                metrics = metrics_n
    step_s = statistics.median(times["step_s"])
    step_s_lagged = statistics.median(times["step_s_lagged"])

    peak, source = peak_flops_per_device(dtype=cfg.model.dtype, given=cfg.train.peak_flops)
    devices = jax.devices()
    total_peak = peak * (jax.process_count() if devices[0].platform == "cpu" else len(devices))
    model_flops_per_s = setup.flops_per_step / step_s
    result = {
        "shape": args.shape, "overrides": args.overrides, "device": devices[0].device_kind,
        "num_devices": len(devices), "step_s": step_s, "step_s_lagged": step_s_lagged,
        "lagged_speedup": step_s / step_s_lagged, "compile_s": compile_s,
        "tokens_per_s": setup.tokens_per_step / step_s, "model_flops_per_step": setup.flops_per_step,
        "model_flops_per_s": model_flops_per_s, "peak_flops_per_s": total_peak, "peak_source": source,
        "mfu": model_flops_per_s / total_peak, "loss": metrics["loss"],
    }
    if args.vs:
        step_b = statistics.median(times["step_s_vs"])
        result.update(vs=args.vs, step_s_vs=step_b, speedup=step_b / step_s)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
