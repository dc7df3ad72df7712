"""The learning-rate transfer figure: runs experiments/mup_transfer.py through launch.sweep, then reports the
loss-minimising learning rate per width (sp, mup) and per depth (sp, completep) and draws loss against learning
rate, one curve per width or depth, sp and µP side by side.

    python benchmarks/mup_transfer.py --workdir /tmp/mup_transfer                 # full grid, --parallel 2
    MUP_TRANSFER_GRID=reduced python benchmarks/mup_transfer.py --workdir /tmp/mt_small --set train.steps=20
    python benchmarks/mup_transfer.py --workdir /tmp/mup_transfer --no-run        # report an existing sweep

The sweep resumes (rerun the same command) and lands in WORKDIR/results.csv; the figure is
WORKDIR/mup_transfer.png (or --png). What transfer means here (issue 23): under µP the argmin moves by at most
one grid step across sizes; under sp by two or more, or the curves visibly shift. A benchmark: it prints the
argmins and the verdict, and asserts nothing.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def read_results(path: str) -> list[dict]:
    """The latest ok row of every trial, with its settings parsed from the overrides."""
    latest = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            latest[row["trial_id"]] = row
    out = []
    for row in latest.values():
        if row["status"] != "ok":
            continue
        o = dict(item.split("=", 1) for item in json.loads(row["overrides"]))
        loss = float(row["final_eval_loss"])
        out.append({"parametrization": o["model.parametrization"], "width": int(o["model.d_model"]),
                    "depth": int(o.get("model.num_layers", 4)), "lr": float(o["optim.learning_rate"]),
                    "loss": loss if math.isfinite(loss) else float("nan"),
                    "grid": "depth" if "model.num_layers" in o else "width"})
    return out


def curves(rows: list[dict], grid: str, parametrization: str) -> dict[int, list[tuple[float, float]]]:
    """{size: [(lr, loss), ...] sorted by lr} of one grid and parametrization."""
    size = "width" if grid == "width" else "depth"
    out: dict[int, list] = {}
    for r in rows:
        if r["grid"] == grid and r["parametrization"] == parametrization:
            out.setdefault(r[size], []).append((r["lr"], r["loss"]))
    return {k: sorted(v) for k, v in sorted(out.items())}


def argmins(c: dict[int, list]) -> dict[int, float]:
    """The loss-minimising learning rate per size (diverged runs, NaN, never win)."""
    return {k: min(v, key=lambda p: p[1] if math.isfinite(p[1]) else math.inf)[0] for k, v in c.items()}


def spread_in_steps(best: dict[int, float]) -> float:
    """How far apart (in grid steps of x2) the argmins of the sizes lie."""
    logs = [math.log2(x) for x in best.values()]
    return max(logs) - min(logs) if logs else float("nan")


def report(rows: list[dict], png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("width", "sp"), ("width", "mup"), ("depth", "sp"), ("depth", "completep")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharey="row")
    for ax, (grid, par) in zip(axes.flat, panels):
        c = curves(rows, grid, par)
        best = argmins(c)
        if not c:
            ax.set_title(f"{par}: no results")
            continue
        for size, points in c.items():
            line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                            label=f"{'d_model' if grid == 'width' else 'layers'} {size}")
            ax.plot([best[size]], [min(p[1] for p in points if math.isfinite(p[1]))], marker="*",
                    markersize=14, color=line.get_color())
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate")
        ax.set_ylabel("eval loss")
        ax.set_title(f"{par} across {grid}: argmin spread {spread_in_steps(best):.0f} grid steps")
        ax.legend(fontsize=8)
        print(f"{grid:5s} {par:9s} argmin lr per size: "
              + ", ".join(f"{k}: {v:.3g}" for k, v in best.items())
              + f"   (spread {spread_in_steps(best):.0f} steps of x2)")
    fig.suptitle("Learning-rate transfer, tiny decoders on the stdlib corpus (experiments/mup_transfer.py)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="extra overrides for every trial (launch.sweep --set), e.g. train.steps=20")
    ap.add_argument("--no-run", action="store_true", help="only read WORKDIR/results.csv and draw")
    ap.add_argument("--png", default=None, help="figure path (default WORKDIR/mup_transfer.png)")
    args = ap.parse_args(argv)
    if not args.no_run:
        cmd = [sys.executable, "-m", "launch.sweep", "experiments.mup_transfer", "--workdir", args.workdir,
               "--parallel", str(args.parallel), "--no-fit", *[a for s in args.extra for a in ("--set", s)]]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}).returncode
        if code != 0:
            print(f"launch.sweep exited {code}; reporting what finished.", file=sys.stderr)
    results = os.path.join(args.workdir, "results.csv")
    if not os.path.exists(results):
        print(f"error: {results} does not exist; run without --no-run first.", file=sys.stderr)
        return 2
    report(read_results(results), args.png or os.path.join(args.workdir, "mup_transfer.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
