"""A cooldown fork against the run it stands for: one stable run (constant learning rate after warmup), wsd
cooldowns forked from it at several token counts (t5like/fork.py), and each wsd run trained again from
scratch with the same tokens and schedule. Prints each pair's final eval loss, their relative difference
(issue 28 asks for within 0.5%), the eval loss's standard error over sequences, and the steps each way costs.

    python benchmarks/cooldown_fork.py --workdir /tmp/cooldown_fork                      # 2 forks, d_model 32
    python benchmarks/cooldown_fork.py --workdir /tmp/cf --steps 200 400 800 --d-model 48 --layers 2

The model family is experiments/scaling_tiny.py's (tiny decoder LMs on the Python standard library). A fork
restores its parent's whole state (params, optimizer, step, data position), so on one machine the pairs
should agree to float rounding; the figure checks that the fork path loses nothing. Reruns resume every run
(each is an ordinary t5like workdir). A benchmark: it asserts nothing. Results: WORKDIR/cooldown_fork.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[240, 480], help="each fork's total steps")
    ap.add_argument("--cooldown", type=float, default=0.2, help="cooldown fraction of each fork's steps")
    ap.add_argument("--d-model", type=int, default=32)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-files", type=int, default=300, help="stdlib files in the corpus (0: all)")
    args = ap.parse_args(argv)
    if len(set(args.steps)) != len(args.steps) or min(args.steps) < 20:
        ap.error(f"--steps {args.steps}: give distinct step counts of at least 20")

    from experiments import scaling_tiny
    from t5like import train
    from t5like.config import apply_overrides, wsd_decay_steps
    from t5like.data import get_tokenizer

    wd = os.path.abspath(args.workdir)
    base = scaling_tiny.config()
    tok_dir = os.path.join(wd, "tokenizer_run")
    data = [f"data.max_files={args.max_files}"]
    get_tokenizer(apply_overrides(base, data).data, tok_dir, base.model.vocab_size)
    d, steps = args.d_model, sorted(args.steps)
    d_ff = 8 * math.ceil(8 / 3 * d / 8)
    lr = base.optim.learning_rate * (base.model.d_model / d) ** 0.5  # the design's sp rule
    starts = [t - wsd_decay_steps(t, args.cooldown) for t in steps]
    warmup = min(starts[0], round(0.05 * steps[0]))
    common = [*data, f"data.tokenizer_path={os.path.join(tok_dir, 'tokenizer', 'spm.model')}",
              f"model.d_model={d}", f"model.num_layers={args.layers}", f"model.num_heads={d // 8}",
              f"model.d_ff={d_ff}", f"train.batch_size={args.batch}", f"optim.learning_rate={lr:.4g}",
              f"optim.warmup_steps={warmup}", "train.progress=false", "checkpoint.keep=1"]
    wsd = ["optim.schedule=wsd", f"optim.wsd_decay_fraction={args.cooldown:g}"]

    def run(name, *extra):
        t0 = time.time()
        cfg = apply_overrides(base, [*common, *extra, f"workdir={os.path.join(wd, name)}"])
        result = train.train(cfg)
        print(f"{name}: eval loss {result.eval_loss:.4f} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        return result

    stable = max(starts)
    run("stable", "optim.schedule=constant", f"train.steps={stable}", f"checkpoint.every={stable}",
        f"checkpoint.keep_steps={','.join(map(str, starts))}")
    rows = []
    for total, start in zip(steps, starts):
        fork = run(f"fork{total}", *wsd, f"train.steps={total}", f"checkpoint.every={total}",
                   f"checkpoint.fork_from={os.path.join(wd, 'stable')}", f"checkpoint.fork_step={start}")
        alone = run(f"alone{total}", *wsd, f"train.steps={total}", f"checkpoint.every={total}")
        rows.append({"steps": total, "fork_step": start, "tokens": fork.summary["tokens"],
                     "fork_eval_loss": fork.eval_loss, "alone_eval_loss": alone.eval_loss,
                     "relative_difference": fork.eval_loss / alone.eval_loss - 1.0,
                     "eval_loss_stderr": alone.summary.get("final_eval_loss_stderr")})
    cost = {"steps_with_forks": stable + sum(t - s for t, s in zip(steps, starts)), "steps_without": sum(steps)}
    print(f"{'steps':>6} {'fork at':>7} {'fork loss':>9} {'alone loss':>10} {'rel diff':>9} {'stderr':>7}")
    for r in rows:
        print(f"{r['steps']:>6} {r['fork_step']:>7} {r['fork_eval_loss']:>9.4f} {r['alone_eval_loss']:>10.4f} "
              f"{r['relative_difference']:>+9.2e} {r['eval_loss_stderr'] or float('nan'):>7.4f}")
    worst = max(abs(r["relative_difference"]) for r in rows)
    print(f"largest |relative difference| {worst:.2e} (target < 5e-3); training steps: {cost['steps_with_forks']} "
          f"with forks, {cost['steps_without']} as separate runs")
    with open(os.path.join(wd, "cooldown_fork.json"), "w") as f:
        json.dump({"args": vars(args), "pairs": rows, "cost": cost, "largest_relative_difference": worst}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
