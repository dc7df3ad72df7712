"""Evaluate a run's latest checkpoint (or an imported Hugging Face checkpoint's workdir) on lm-eval tasks.

    python -m t5like.eval --workdir RUN --tasks hellaswag,arc_easy [--include-path my_tasks/] [--limit 100]
                          [--num-fewshot K] [--batch-size 16] [--output results.json]

Prints lm-eval's table of task metrics; --output writes lm-eval's results JSON. Names, task files and the
workdir are checked, and the tasks' data read, before the model is loaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m t5like.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a t5like run (its latest checkpoint) or `t5like.hf import` output")
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    ap.add_argument("--include-path", default="", help="a directory of local task YAML files")
    ap.add_argument("--limit", type=int, default=0, help="examples per task (0: all)")
    ap.add_argument("--num-fewshot", type=int, default=-1, help="few-shot examples (-1: each task's own)")
    ap.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    ap.add_argument("--bootstrap-iters", type=int, default=100000, help="stderr bootstrap (lm-eval's default; 0: off)")
    ap.add_argument("--output", default="", help="write lm-eval's results JSON here")
    ap.add_argument("--log-samples", action="store_true", help="keep per-example outputs in --output")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from t5like.checkpoint import latest_step_or_raise, read_config
    from t5like.eval.tasks import load_tasks, results_table, run_tasks, task_names, write_results

    for flag, value, low in (("--limit", args.limit, 0), ("--batch-size", args.batch_size, 1),
                             ("--num-fewshot", args.num_fewshot, -1), ("--bootstrap-iters", args.bootstrap_iters, 0)):
        if value < low:
            raise ValueError(f"{flag}={value} must be >= {low}.")
    step = latest_step_or_raise(args.workdir)  # a workdir without a checkpoint fails before anything loads
    read_config(args.workdir)  # a workdir that is no run fails here too
    names = task_names(args.tasks)
    manager, _ = load_tasks(names, args.include_path)

    from t5like.eval.loading import lm_from_workdir
    started = time.perf_counter()
    lm = lm_from_workdir(args.workdir, batch_size=args.batch_size)
    results = run_tasks(lm, names, manager, limit=args.limit, num_fewshot=args.num_fewshot,
                        bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples, seed=args.seed)
    results.setdefault("config", {}).update({"model": f"t5like:{args.workdir}", "step": step,
                                             "t5like_compiles": lm.compiles})
    print(results_table(results))
    print(f"{args.workdir} step {step}: {len(names)} task(s) in {time.perf_counter() - started:.1f} s, "
          f"{lm.compiles} compiled program(s)", file=sys.stderr)
    if args.output:
        write_results(results, args.output)
    return 0


if __name__ == "__main__":
    from t5like.cli import run
    run(main)
