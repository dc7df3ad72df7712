"""Run an experiment's sweep: every trial as its own training process, results in one append-only table.

    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/sweep_tiny --parallel 2
    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/sweep_tiny --list      # trials and status
    python -m launch.sweep experiments.NAME --workdir DIR --set seed=1                    # extra overrides
    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/small --budgets 2e11 --sizes 3  # a smaller IsoFLOP sweep
    python -m launch.sweep experiments.NAME --workdir DIR --backend ray --ray-address auto # on a Ray cluster

The experiment module declares its sweep: `sweep() -> list[Trial]` (an IsoFLOP plan, `grid(..., config=config())`
or `random_search(..., config=config())` from t5like.scaling.design; every trial id hashes the config the
trial runs, so editing config() makes new trials) and, optionally, `prepare(workdir) -> list[str]`: run
once in this process before any trial (e.g. to train a shared tokenizer), returning overrides for every
trial. Trial ID runs `python -m EXPERIMENT workdir=DIR/trials/ID *overrides`, output in DIR/trials/ID/train.log.

DIR/results.csv gets one row per finished attempt (status ok, failed or preempted), written by this
process only; the file is never rewritten. Rerunning the same command skips every trial that has an ok
row (so ok rows are never duplicated) and reruns the others, which resume from their own checkpoints. A
trial can therefore have failed rows followed by one ok row: the latest row of a trial is its state.
Ctrl-C (or SIGTERM) sends SIGTERM to the running trials, which checkpoint and exit; nothing is recorded
for them, and a rerun resumes them.

Backends: `local` (default) runs trials as child processes and splits this host's GPUs, TPU chips or
CPU cores and simulated devices between the --parallel trials (launch/devices.py); `ray` runs each trial
as a Ray actor on a local or running Ray cluster (launch/ray_backend.py), --parallel defaulting to what fits.

A cooldown fork (Trial.parent; experiments.scaling_tiny_forks) starts once its parent has saved the step it
forks from (launch/runner.py), on either backend.

If the trials have 2 or more IsoFLOP budgets, the fit and plots follow (`--no-fit` to skip): DIR/fit.json and
DIR/plots/. `--budgets C ... --sizes N` re-plan an IsoFLOP experiment smaller (or larger), as the same flags
of `python -m t5like.scaling.design` show it.
Parts: launch/plan.py, table.py, trial.py, devices.py, backends.py, ray_backend.py, runner.py, progress.py.
"""
from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import os
import subprocess
import sys
import tempfile
from typing import Optional

from etils import epath

from launch.backends import BACKENDS, make_backend
from launch.plan import Sweep, load_sweep
from launch.runner import run_sweep
from launch.table import COLUMNS, OK, ResultsTable
from t5like.storage import is_remote

INTERRUPTED = 130


def fit_and_plot(workdir: str, sweep: Sweep) -> bool:
    """`python -m t5like.scaling fit` and `plot` on this sweep's ok rows (local or gs://); True if both worked."""
    table = ResultsTable(os.path.join(workdir, "results.csv"))
    ids = {t.id for t in sweep.trials if t.budget is not None}  # a cooldown fork's stable run is no IsoFLOP point
    rows = table.rows()
    source = table.path
    if any(r["trial_id"] not in ids for r in rows):  # rows of an earlier design (or stable runs) stay out of this fit
        source = os.path.join(workdir, "results_this_sweep.csv")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(r for r in rows if r["trial_id"] in ids)
        epath.Path(source).write_text(buf.getvalue())
    fit_json, plots = os.path.join(workdir, "fit.json"), os.path.join(workdir, "plots")
    for args in (["fit", source, "--approach", "all", "--out", fit_json],
                 ["plot", source, "--fit", fit_json, "--out", plots]):
        print(f"$ python -m t5like.scaling {' '.join(args)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "t5like.scaling", *args])
        if proc.returncode != 0:
            print(f"error: `python -m t5like.scaling {args[0]}` exited {proc.returncode}; the trials' results are "
                  f"in {table.path}.", file=sys.stderr)
            return False
    return True


def _lock_workdir(workdir: str) -> int:
    """One runner per sweep directory (two would run the same trials); released when this process exits.
    For a gs:// sweep the lock is a local file, so it only guards against a second runner on this machine."""
    if is_remote(workdir):
        digest = hashlib.sha1(workdir.encode()).hexdigest()[:12]
        path = os.path.join(tempfile.gettempdir(), f"t5like_sweep_{digest}.lock")
    else:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, ".sweep.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"--workdir {workdir}: another `launch.sweep` is running there; wait for it or stop it "
                         "(Ctrl-C), then rerun.") from None
    return fd


def list_trials(sweep: Sweep, workdir: str) -> None:
    path = os.path.join(workdir, "results.csv")
    latest = {}
    if epath.Path(path).exists():
        for r in ResultsTable(path).rows():
            if latest.get(r["trial_id"], {}).get("status") != OK:
                latest[r["trial_id"]] = r
    for t in sweep.trials:
        r = latest.get(t.id)
        state = r["status"] if r else "pending"
        loss = f"  eval loss {float(r['final_eval_loss']):.4f}" if r and r["final_eval_loss"] else ""
        budget = f"  C={t.budget:.3g}" if t.budget else ""
        fork = f"  fork of {t.parent} at step {t.fork_step}" if t.parent else ""
        print(f"{state:<9} {t.id}{budget}{loss}{fork}")


def _env_items(items: list[str]) -> dict:
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ValueError(f"--env {item!r}: give KEY=VALUE (an environment variable for every trial).")
    return dict(item.split("=", 1) for item in items)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="module with sweep(), e.g. experiments.scaling_tiny")
    ap.add_argument("--workdir", required=True, help="sweep directory (or gs://...): results.csv, trials/ID/, "
                                                     "fit.json, plots/")
    ap.add_argument("--parallel", type=int, default=None,
                    help="trials run at once (local: default 1, splits this host's devices; ray: default what fits)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every trial (repeatable); changes the trial ids")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for every trial (repeatable; not part of the trial id)")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                    help="fit and plot after the sweep (default: on for IsoFLOP sweeps of 2 or more budgets)")
    ap.add_argument("--budgets", type=float, nargs="+", default=None, metavar="C",
                    help="IsoFLOP experiments: replace the design's budgets (FLOPs), as t5like.scaling.design "
                         "--budgets does; a budget the design has keeps its trials and results")
    ap.add_argument("--sizes", type=int, default=None, metavar="N",
                    help="IsoFLOP experiments: model sizes per budget instead of the design's sizes_per_budget")
    ap.add_argument("--list", action="store_true", help="list the trials and their status; run nothing")
    ap.add_argument("--grace", type=float, default=600.0, help="seconds trials get to checkpoint after Ctrl-C")
    ray = ap.add_argument_group("where trials run")
    ray.add_argument("--backend", default="local", help=f"where trials run: {' or '.join(BACKENDS)} (default local)")
    ray.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                     help="join this Ray cluster (auto: the one `ray start` made here); default: start a local one")
    ray.add_argument("--ray-timeout", type=float, default=30.0, help="seconds to wait for --ray-address to answer")
    ray.add_argument("--trial-cpus", type=float, default=1.0, help="CPUs each trial asks Ray for (default 1)")
    ray.add_argument("--trial-gpus", type=float, default=0.0, help="GPUs each trial asks Ray for")
    ray.add_argument("--trial-tpu", default=None, metavar="TYPE",
                     help="each trial takes a whole TPU slice of this type, e.g. v5p-32 (Ray resource TPU-TYPE-head)")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.experiment, tuple(args.extra), budgets=args.budgets, sizes=args.sizes)
        if args.list:
            list_trials(sweep, args.workdir)
            return 0
        if args.fit and not sweep.isoflop:
            raise ValueError(f"--fit: {args.experiment}'s trials have no IsoFLOP budgets, so there is no scaling "
                             "law to fit; drop --fit.")
        if args.backend != "ray" and (args.trial_tpu or args.trial_gpus or args.trial_cpus != 1.0):
            raise ValueError("--trial-cpus/--trial-gpus/--trial-tpu are Ray resources; add --backend ray (the local "
                             "backend splits this host's devices by --parallel).")
        resources = None
        if args.backend == "ray":
            from launch.ray_backend import Resources
            resources = Resources(args.trial_cpus, args.trial_gpus, args.trial_tpu)
        env = _env_items(args.env)
        lock = _lock_workdir(args.workdir)
        backend, parallel = make_backend(args.backend, args.parallel, ray_address=args.ray_address,
                                         ray_timeout_s=args.ray_timeout, resources=resources, extra_env=env)
        print(f"{args.experiment}: {len(sweep.trials)} trials -> {args.workdir} ({args.backend} backend, "
              f"parallel {parallel})", file=sys.stderr)
        try:
            outcome = run_sweep(sweep, args.workdir, backend, parallel, grace_s=args.grace)
        finally:
            backend.close()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # during prepare(), before any trial started
        print("interrupted before any trial started.", file=sys.stderr)
        return INTERRUPTED
    if outcome.interrupted:
        print(f"interrupted: {outcome.ok} trial(s) finished this time; rerun the same command to resume the rest.",
              file=sys.stderr)
        return INTERRUPTED
    print(f"done: {outcome.ok + outcome.skipped} ok ({outcome.skipped} from earlier runs), {outcome.failed} failed; "
          f"table {os.path.join(args.workdir, 'results.csv')}", file=sys.stderr)
    code = 0 if outcome.failed == 0 else 1
    budgets = {t.budget for t in sweep.trials if t.budget is not None}
    fit = args.fit if args.fit is not None else len(budgets) > 1
    if args.fit is None and len(budgets) == 1:  # e.g. --budgets C: no law to fit, and no failure either
        print("one IsoFLOP budget: no scaling law to fit, so no fit or plots (--fit to try anyway).", file=sys.stderr)
    if fit and outcome.ok + outcome.skipped > 0:
        if not fit_and_plot(args.workdir, sweep):
            code = 1
    os.close(lock)
    return code


if __name__ == "__main__":
    sys.exit(main())
