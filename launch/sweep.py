"""Run an experiment's sweep: every trial as its own training process, results in one append-only table.

    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/sweep_tiny --parallel 2
    python -m launch.sweep experiments.scaling_tiny --workdir /tmp/sweep_tiny --list      # trials and status
    python -m launch.sweep experiments.NAME --workdir DIR --set train.seed=1              # extra overrides

The experiment module declares its sweep: `sweep() -> list[Trial]` (an IsoFLOP plan, `grid(...)` or
`random_search(...)` from t5like.scaling.design) and, optionally, `prepare(workdir) -> list[str]`: run
once in this process before any trial (e.g. to train a shared tokenizer), returning overrides for every
trial. Trial ID runs `python -m EXPERIMENT workdir=DIR/trials/ID *overrides`, output in DIR/trials/ID/train.log.

DIR/results.csv gets one row per finished attempt (status ok, failed or preempted), written by this
process only, each with one append + fsync under a lock; the file is never rewritten. Rerunning the same
command skips every trial that has an ok row (so ok rows are never duplicated) and reruns the others,
which resume from their own checkpoints. A trial can therefore have failed rows followed by one ok row:
the latest row of a trial is its state. Ctrl-C (or SIGTERM) sends SIGTERM to the running trials, which
checkpoint and exit; nothing is recorded for them, and a rerun resumes them.

If the trials have IsoFLOP budgets, the fit and plots follow (`--no-fit` to skip): DIR/fit.json and DIR/plots/.

Parts: plan -> trials (`load_sweep`), the table (`ResultsTable`), where trials run (`Backend`,
`LocalBackend`: child processes on this machine), and the loop (`run_sweep`).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import importlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable, Optional, Protocol

from t5like.scaling.design import Choice, Trial, Uniform, grid, random_search, trial_id  # noqa: F401  (re-exported)

COLUMNS = ("trial_id", "budget", "status", "final_eval_loss", "loss", "final_train_loss", "params",
           "non_embedding_params", "tokens", "flops", "steps", "wall_time_s", "overrides", "error", "finished_at")
OK = "ok"
INTERRUPTED = 130
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# Plan -> trials ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sweep:
    module: str                         # run as `python -m module`
    trials: tuple[Trial, ...]
    prepare: Optional[Callable[[str], list[str]]] = None

    @property
    def isoflop(self) -> bool:
        return any(t.budget is not None for t in self.trials)


def load_sweep(module_name: str, extra: tuple[str, ...] = ()) -> Sweep:
    """Import the experiment, call its sweep() and check the trials before anything runs. Extra overrides
    are added to every trial and change its id (it is a different run)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"experiment {module_name!r} cannot be imported ({e}); give a module path such as "
                         "experiments.scaling_tiny, run from the repository root.") from None
    if not callable(getattr(module, "sweep", None)):
        raise ValueError(f"experiment {module_name} has no sweep() function; define sweep() -> list[Trial] "
                         "(an IsoFLOP plan's trials, or grid(...) / random_search(...) from t5like.scaling.design).")
    trials = module.sweep()
    trials = tuple(getattr(trials, "trials", trials))  # a Plan is fine too
    if not trials:
        raise ValueError(f"{module_name}.sweep() returned no trials; nothing to run.")
    for item in extra:
        if "=" not in item or item.startswith("workdir="):
            raise ValueError(f"--set {item!r}: give key=value config overrides (the runner sets workdir itself).")
    seen = set()
    checked = []
    for t in trials:
        if not isinstance(t, Trial):
            raise ValueError(f"{module_name}.sweep() returned {t!r}; it must return Trial objects.")
        if not _ID.match(t.id):
            raise ValueError(f"trial id {t.id!r} is not a safe directory name; use letters, digits, '.', '_', '-'.")
        if t.id in seen:
            raise ValueError(f"trial id {t.id!r} appears twice in {module_name}.sweep(); ids must be unique.")
        seen.add(t.id)
        for item in t.overrides:
            if "=" not in item or item.split("=", 1)[0] == "workdir":
                raise ValueError(f"trial {t.id}: override {item!r} must be key=value and not workdir "
                                 "(the runner gives each trial DIR/trials/ID).")
        if extra:
            t = dataclasses.replace(t, id=trial_id(t.id, extra), overrides=(*t.overrides, *extra))
        checked.append(t)
    prepare = getattr(module, "prepare", None)
    return Sweep(module_name, tuple(checked), prepare if callable(prepare) else None)


# The results table -------------------------------------------------------------------------------------

class ResultsTable:
    """DIR/results.csv: append-only, one physical line per row, written whole by one write() + fsync."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.exists(path):
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(",".join(COLUMNS) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # the header appears whole or not at all
            return
        with open(path, "rb") as f:
            data = f.read()
        header = data.split(b"\n", 1)[0].decode().strip()
        if header != ",".join(COLUMNS):
            raise ValueError(f"{path} has columns {header!r}, not this runner's {','.join(COLUMNS)!r}; "
                             "use a new --workdir (the table is never rewritten).")
        if not data.endswith(b"\n"):
            # Only a write cut short by a crash can leave this; the fragment is no row, so drop it.
            keep = data.rfind(b"\n") + 1
            print(f"warning: {path} ends with an incomplete line ({len(data) - keep} bytes); dropping it.",
                  file=sys.stderr)
            os.truncate(path, keep)

    def rows(self) -> list[dict]:
        with open(self.path, newline="") as f:
            text = f.read()
        text = text[:text.rfind("\n") + 1]  # complete lines only
        return list(csv.DictReader(io.StringIO(text)))

    def append(self, row: dict) -> None:
        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="raise").writerow(
            {k: _cell(row.get(k)) for k in COLUMNS})
        data = buf.getvalue().encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock

    def ok_ids(self) -> set[str]:
        return {r["trial_id"] for r in self.rows() if r["status"] == OK}


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return " | ".join(str(v).splitlines())  # one physical line per row


# Backends: where a trial runs ---------------------------------------------------------------------------

class Backend(Protocol):
    """Starts trial processes and reports on them. A cluster backend submits jobs instead."""

    def start(self, module: str, workdir: str, overrides: list[str], log_path: str) -> object: ...
    def poll(self, handle) -> Optional[int]: ...          # exit code, or None while running
    def terminate(self, handle) -> None: ...              # SIGTERM: checkpoint and exit (143)
    def kill(self, handle) -> None: ...


# Run in the child before the experiment: die with the runner (Linux), so a SIGKILLed runner leaves no
# trial running on its own; the trial gets SIGTERM, checkpoints and exits, and a rerun resumes it.
_BOOT = """\
import os, runpy, signal, sys
try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(os.environ["T5LIKE_SWEEP_PID"]):
    sys.exit(143)  # the runner is already gone
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@dataclasses.dataclass
class _LocalHandle:
    proc: subprocess.Popen
    lock_fd: int


class LocalBackend:
    """Each trial is a child process of this one, in its own session (a terminal's Ctrl-C reaches only the
    runner, which then stops the trials cleanly). A per-trial lock, held by the child, keeps two processes
    out of one trial workdir, e.g. a rerun racing a killed runner's trial that is still checkpointing."""

    def __init__(self, env: Optional[dict] = None):
        self.env = dict(os.environ if env is None else env)

    def start(self, module: str, workdir: str, overrides: list[str], log_path: str) -> _LocalHandle:
        os.makedirs(workdir, exist_ok=True)
        lock_fd = os.open(os.path.join(workdir, ".trial.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for an earlier process of {workdir} to exit ...", file=sys.stderr)
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
        env = dict(self.env, T5LIKE_SWEEP_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
        # `python -m launch.sweep` found the experiment on sys.path via the cwd; so must the child.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
        with open(log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m {module} workdir={workdir} "
                      f"{' '.join(overrides)}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, "-c", _BOOT, module, f"workdir={workdir}", *overrides],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, pass_fds=(lock_fd,))
        return _LocalHandle(proc, lock_fd)

    def poll(self, handle: _LocalHandle) -> Optional[int]:
        code = handle.proc.poll()
        if code is not None and handle.lock_fd >= 0:
            os.close(handle.lock_fd)  # the child's copy closed with it; the lock is free again
            handle.lock_fd = -1
        return code

    def terminate(self, handle: _LocalHandle) -> None:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)

    def kill(self, handle: _LocalHandle) -> None:
        if handle.proc.poll() is None:
            handle.proc.kill()


# The loop ----------------------------------------------------------------------------------------------

def trial_dir(workdir: str, trial: Trial) -> str:
    return os.path.join(workdir, "trials", trial.id)


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a kill
    return rows


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def finished_summary(tdir: str) -> Optional[dict]:
    """The trial's summary.json if it finished, with losses filled from metrics.jsonl where the summary has
    none (a run resumed from its final checkpoint trains no step and reports NaN); else None."""
    path = os.path.join(tdir, "summary.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("preempted"):
        return None
    if not (_finite(summary.get("final_loss")) and _finite(summary.get("final_eval_loss"))):
        metrics = _read_jsonl(os.path.join(tdir, "metrics.jsonl"))
        train = [r["loss"] for r in metrics if "loss" in r]
        evals = [r["eval_loss"] for r in metrics if "eval_loss" in r and r.get("step") == summary.get("step")]
        if not _finite(summary.get("final_loss")) and train:
            summary["final_loss"] = train[-1]
        if not _finite(summary.get("final_eval_loss")) and evals:
            summary["final_eval_loss"] = evals[-1]
    return summary


def _row(trial: Trial, status: str, *, summary: Optional[dict] = None, wall: float = float("nan"),
         error: str = "") -> dict:
    s = summary or {}
    eval_loss = s.get("final_eval_loss")
    return {"trial_id": trial.id, "budget": trial.budget, "status": status, "final_eval_loss": eval_loss,
            "loss": eval_loss, "final_train_loss": s.get("final_loss"),
            "params": s.get("params", trial.params), "non_embedding_params": s.get("non_embedding_params",
                                                                                   trial.non_embedding_params),
            "tokens": s.get("tokens", trial.tokens), "flops": s.get("flops", trial.flops),
            "steps": s.get("step", trial.steps), "wall_time_s": round(wall, 2) if _finite(wall) else None,
            "overrides": json.dumps(list(trial.overrides)), "error": error[-1500:] if error else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _tail(path: str, offset: int, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")  # progress bars
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


def _fmt_time(s: float) -> str:
    if not _finite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Progress:
    """`sweep: 5/15 ok, 1 failed, 2 running, 7 queued | 4m10s elapsed, ETA 12m30s` on stderr: one updating
    line on a terminal, else a line whenever the counts change, and once a minute."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.tty = stream, stream.isatty()
        self.last_counts, self.last_text, self.last_time = None, "", 0.0

    def show(self, counts: tuple, text: str, force: bool = False) -> None:
        now = time.time()
        if self.tty:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
        elif force or counts != self.last_counts or now - self.last_time > 60:
            print(text, file=self.stream, flush=True)
            self.last_time = now
        self.last_counts, self.last_text = counts, text

    def message(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)
        if self.tty and self.last_text:
            self.stream.write(self.last_text)
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclasses.dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False


def run_sweep(sweep: Sweep, workdir: str, backend: Backend, parallel: int = 1, grace_s: float = 600.0,
              poll_s: float = 0.5) -> Outcome:
    """Run every trial without an ok row in DIR/results.csv, `parallel` at a time."""
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"--parallel {parallel!r} must be a positive integer (trials run at once).")
    os.makedirs(os.path.join(workdir, "trials"), exist_ok=True)
    table = ResultsTable(os.path.join(workdir, "results.csv"))
    done = table.ok_ids()
    ids = {t.id for t in sweep.trials}
    stale = done - ids
    if stale:
        print(f"warning: results.csv has ok rows for {len(stale)} trial(s) not in this sweep (an earlier design?): "
              f"{sorted(stale)[:3]}...; the fit uses only this sweep's trials.", file=sys.stderr)
    outcome = Outcome(skipped=sum(t.id in done for t in sweep.trials))
    todo = [t for t in sweep.trials if t.id not in done]
    if not todo:
        print(f"all {len(sweep.trials)} trials already have ok rows in {table.path}", file=sys.stderr)
        return outcome
    shared = list(sweep.prepare(workdir)) if sweep.prepare else []
    with open(os.path.join(workdir, "sweep.json"), "w") as f:
        json.dump({"experiment": sweep.module, "shared_overrides": shared,
                   "trials": [dataclasses.asdict(t) for t in sweep.trials]}, f, indent=1)

    # A trial that finished while its runner was killed before writing its row: record it, do not retrain.
    queue = []
    for t in todo:
        summary = finished_summary(trial_dir(workdir, t))
        if summary is not None and _finite(summary.get("final_eval_loss")):
            table.append(_row(t, OK, summary=summary, error="recovered: finished before its row was written"))
            outcome.ok += 1
        else:
            queue.append(t)

    stop = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = _Progress()
    running: dict[str, tuple[Trial, object, float, str, int]] = {}
    started = time.time()
    flops_known = all(t.flops for t in sweep.trials)
    if flops_known:  # longest first: the last trials to finish are short, so the slots stay busy
        queue.sort(key=lambda t: -t.flops)
    done_work, total_work = 0.0, sum((t.flops if flops_known else 1.0) for t in queue)

    def show(force: bool = False) -> None:
        # ETA: the remaining work (planned FLOPs, else trials) at this session's rate so far.
        rate = done_work / (time.time() - started) if done_work else 0.0
        eta = (total_work - done_work) / rate if rate else float("nan")
        counts = (outcome.ok + outcome.skipped, outcome.failed, len(running), len(queue))
        progress.show(counts, f"sweep: {counts[0]}/{len(sweep.trials)} ok, {counts[1]} failed, {counts[2]} running, "
                              f"{counts[3]} queued | {_fmt_time(time.time() - started)} elapsed, "
                              f"ETA {_fmt_time(eta)}", force)

    try:
        while (queue or running) and not stop:
            while queue and len(running) < parallel and not stop:
                t = queue.pop(0)
                tdir = trial_dir(workdir, t)
                os.makedirs(tdir, exist_ok=True)
                log = os.path.join(tdir, "train.log")
                offset = os.path.getsize(log) if os.path.exists(log) else 0
                handle = backend.start(sweep.module, tdir, [*t.overrides, *shared], log)
                running[t.id] = (t, handle, time.time(), log, offset)
                show()
            for tid, (t, handle, t0, log, offset) in list(running.items()):
                code = backend.poll(handle)
                if code is None:
                    continue
                del running[tid]
                wall = time.time() - t0
                done_work += t.flops if flops_known else 1.0
                summary = finished_summary(trial_dir(workdir, t)) if code == 0 else None
                if summary is not None and _finite(summary.get("final_eval_loss")):
                    table.append(_row(t, OK, summary=summary, wall=wall))
                    outcome.ok += 1
                    progress.message(f"ok      {tid}  eval loss {summary['final_eval_loss']:.4f}  ({_fmt_time(wall)})")
                    continue
                if code == 143:
                    status, error = "preempted", "exit 143: stopped by SIGTERM after checkpointing; a rerun resumes it"
                elif code == 0:
                    status, error = "failed", "exit 0 but no summary.json with a finite final_eval_loss"
                else:
                    status, error = "failed", f"exit {code}: {_tail(log, offset)}"
                table.append(_row(t, status, wall=wall, error=error))
                outcome.failed += 1
                progress.message(f"{status:<7} {tid}  {error[:300]}  (log: {log})")
            show()
            if running:
                time.sleep(poll_s)
    finally:
        if running:
            outcome.interrupted = True
            _stop_all(backend, running, table, progress, stop, grace_s, poll_s, workdir)
        for s, h in handlers.items():
            signal.signal(s, h)
        show(force=True)
        progress.close()
    outcome.interrupted = outcome.interrupted or bool(stop)
    return outcome


def _stop_all(backend: Backend, running: dict, table: ResultsTable, progress: _Progress, stop: list,
              grace_s: float, poll_s: float, workdir: str) -> None:
    """SIGTERM every running trial and wait for it to checkpoint; a second Ctrl-C or the grace period
    ends in SIGKILL. Trials that stopped get no row (a rerun resumes them); one that happened to finish does."""
    progress.message(f"stopping {len(running)} running trial(s) (SIGTERM; they checkpoint and exit) ...")
    signals_seen = len(stop)
    for t, handle, *_ in running.values():
        backend.terminate(handle)
    deadline, killed = time.time() + grace_s, False
    while running:
        for tid, (t, handle, t0, log, offset) in list(running.items()):
            code = backend.poll(handle)
            if code is None:
                continue
            del running[tid]
            summary = finished_summary(trial_dir(workdir, t)) if code == 0 else None
            if summary is not None and _finite(summary.get("final_eval_loss")):
                table.append(_row(t, OK, summary=summary, wall=time.time() - t0))
        if running and not killed and (time.time() > deadline or len(stop) > signals_seen):
            progress.message("killing the remaining trials (SIGKILL); they resume from their last checkpoint")
            for t, handle, *_ in running.values():
                backend.kill(handle)
            killed = True
        time.sleep(poll_s)


# After the sweep: fit and plots ------------------------------------------------------------------------

def fit_and_plot(workdir: str, sweep: Sweep) -> bool:
    """`python -m t5like.scaling fit` and `plot` on this sweep's ok rows; True if both worked."""
    table = ResultsTable(os.path.join(workdir, "results.csv"))
    ids = {t.id for t in sweep.trials}
    rows = table.rows()
    source = table.path
    if any(r["trial_id"] not in ids for r in rows):  # rows of an earlier design stay out of this fit
        source = os.path.join(workdir, "results_this_sweep.csv")
        with open(source, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
            w.writeheader()
            w.writerows(r for r in rows if r["trial_id"] in ids)
    fit_json, plots = os.path.join(workdir, "fit.json"), os.path.join(workdir, "plots")
    ok = True
    for args in (["fit", source, "--approach", "all", "--out", fit_json],
                 ["plot", source, "--fit", fit_json, "--out", plots]):
        print(f"$ python -m t5like.scaling {' '.join(args)}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "t5like.scaling", *args])
        if proc.returncode != 0:
            print(f"error: `python -m t5like.scaling {args[0]}` exited {proc.returncode}; the trials' results are "
                  f"in {table.path}.", file=sys.stderr)
            ok = False
            break
    return ok


# CLI ---------------------------------------------------------------------------------------------------

def _lock_workdir(workdir: str) -> int:
    """One runner per sweep directory (two would run the same trials); released when this process exits."""
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ValueError(f"--workdir {workdir}: another `launch.sweep` is running there; wait for it or stop it "
                         "(Ctrl-C), then rerun.") from None
    return fd


def list_trials(sweep: Sweep, workdir: str) -> None:
    path = os.path.join(workdir, "results.csv")
    latest = {}
    if os.path.exists(path):
        for r in ResultsTable(path).rows():
            if latest.get(r["trial_id"], {}).get("status") != OK:
                latest[r["trial_id"]] = r
    for t in sweep.trials:
        r = latest.get(t.id)
        state = r["status"] if r else "pending"
        loss = f"  eval loss {float(r['final_eval_loss']):.4f}" if r and r["final_eval_loss"] else ""
        budget = f"  C={t.budget:.3g}" if t.budget else ""
        print(f"{state:<9} {t.id}{budget}{loss}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", help="module with sweep(), e.g. experiments.scaling_tiny")
    ap.add_argument("--workdir", required=True, help="sweep directory: results.csv, trials/ID/, fit.json, plots/")
    ap.add_argument("--parallel", type=int, default=1, help="trials run at once (default 1)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every trial (repeatable); changes the trial ids")
    ap.add_argument("--fit", action=argparse.BooleanOptionalAction, default=None,
                    help="fit and plot after the sweep (default: on for IsoFLOP sweeps)")
    ap.add_argument("--list", action="store_true", help="list the trials and their status; run nothing")
    ap.add_argument("--grace", type=float, default=600.0, help="seconds trials get to checkpoint after Ctrl-C")
    args = ap.parse_args(argv)
    try:
        if args.parallel < 1:
            raise ValueError(f"--parallel {args.parallel} must be >= 1.")
        sweep = load_sweep(args.experiment, tuple(args.extra))
        if args.list:
            list_trials(sweep, args.workdir)
            return 0
        if args.fit and not sweep.isoflop:
            raise ValueError(f"--fit: {args.experiment}'s trials have no IsoFLOP budgets, so there is no scaling "
                             "law to fit; drop --fit.")
        lock = _lock_workdir(args.workdir)
        print(f"{args.experiment}: {len(sweep.trials)} trials -> {args.workdir} (parallel {args.parallel})",
              file=sys.stderr)
        outcome = run_sweep(sweep, args.workdir, LocalBackend(), args.parallel, grace_s=args.grace)
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
    if (args.fit if args.fit is not None else sweep.isoflop) and outcome.ok + outcome.skipped > 0:
        if not fit_and_plot(args.workdir, sweep):
            code = 1
    os.close(lock)
    return code


if __name__ == "__main__":
    sys.exit(main())
