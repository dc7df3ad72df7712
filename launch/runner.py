"""The scheduler: run every trial without an ok row, `parallel` at a time, on a backend.

Rows are written by this process only (launch/table.py). A rerun skips trials with an ok row and records,
without retraining, a trial that finished while its runner was dead. Ctrl-C (or SIGTERM) stops the
running trials cleanly: see `_stop_all`.

Cooldown forks (Trial.parent, Trial.fork_step) wait here, whatever the backend: a fork starts only once its
parent's checkpoint step is saved, with checkpoint.fork_from=DIR/trials/PARENT and checkpoint.fork_step
added to its overrides; the slots meanwhile go to trials that can start. A fork whose parent ended (failed,
or finished earlier without that step) gets a failed row naming the parent; a rerun retries both.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time

from etils import epath

from launch.backends import Backend
from launch.plan import Sweep, trial_dir
from launch.progress import Progress, fmt_time
from launch.table import OK, ResultsTable
from launch.trial import ok_summary, row
from t5like.storage import is_remote, step_saved


@dataclasses.dataclass
class Outcome:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    interrupted: bool = False


@dataclasses.dataclass
class _Running:
    trial: object
    handle: object
    t0: float


def run_sweep(sweep: Sweep, workdir: str, backend: Backend, parallel: int = 1, grace_s: float = 600.0,
              poll_s: float = 0.5) -> Outcome:
    """Run every trial without an ok row in DIR/results.csv, `parallel` at a time."""
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"--parallel {parallel!r} must be a positive integer (trials run at once).")
    workdir = str(workdir)
    epath.Path(workdir, "trials").mkdir(parents=True, exist_ok=True)
    table = ResultsTable(os.path.join(workdir, "results.csv"))
    done = table.ok_ids()
    stale = done - {t.id for t in sweep.trials}
    if stale:
        print(f"warning: results.csv has ok rows for {len(stale)} trial(s) not in this sweep (an earlier design or "
              f"base config; they stay in the table): {sorted(stale)[:3]}...; the fit uses only this sweep's trials.",
              file=sys.stderr)
    outcome = Outcome(skipped=sum(t.id in done for t in sweep.trials))
    todo = [t for t in sweep.trials if t.id not in done]
    if not todo:
        print(f"all {len(sweep.trials)} trials already have ok rows in {table.path}", file=sys.stderr)
        return outcome
    shared = list(sweep.prepare(workdir)) if sweep.prepare else []
    epath.Path(workdir, "sweep.json").write_text(json.dumps(
        {"experiment": sweep.module, "shared_overrides": shared,
         "trials": [dataclasses.asdict(t) for t in sweep.trials]}, indent=1))

    # A trial that finished while its runner was killed before writing its row: record it, do not retrain.
    queue = []
    for t in todo:
        summary = ok_summary(trial_dir(workdir, t))
        if summary is not None:
            table.append(row(t, OK, summary=summary, error="recovered: finished before its row was written"))
            outcome.ok += 1
        else:
            queue.append(t)

    stop = []
    handlers = {s: signal.signal(s, lambda signum, _: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress()
    running: dict[str, _Running] = {}
    started = time.time()
    flops_known = all(t.flops for t in sweep.trials)
    # A fork trains only its steps after the fork step: that share of its whole run's FLOPs is its work.
    work = (lambda t: t.flops * (1 - (t.fork_step or 0) / t.steps)) if flops_known else (lambda t: 1.0)
    if flops_known:  # longest first (stable runs before their forks): the last to finish are short
        queue.sort(key=lambda t: (t.parent is not None, -work(t)))
    done_work, total_work = 0.0, sum(work(t) for t in queue)

    def show(force: bool = False) -> None:
        # ETA: the remaining work (planned FLOPs, else trials) at this session's rate so far.
        rate = done_work / (time.time() - started) if done_work else 0.0
        eta = (total_work - done_work) / rate if rate else float("nan")
        counts = (outcome.ok + outcome.skipped, outcome.failed, len(running), len(queue))
        progress.show(counts, f"sweep: {counts[0]}/{len(sweep.trials)} ok, {counts[1]} failed, {counts[2]} running, "
                              f"{counts[3]} queued | {fmt_time(time.time() - started)} elapsed, "
                              f"ETA {fmt_time(eta)}", force)

    by_id = {t.id: t for t in sweep.trials}
    ready = _Readiness(by_id, workdir)
    try:
        while (queue or running) and not stop:
            while queue and len(running) < parallel and not stop:
                t = next((t for t in queue if ready(t)), None)
                if t is None:
                    break
                queue.remove(t)
                running[t.id] = _Running(t, backend.start(sweep.module, trial_dir(workdir, t),
                                                          [*t.overrides, *shared, *_fork_overrides(t, by_id, workdir)]),
                                         time.time())
                show()
            for t in [t for t in queue if t.parent and t.parent not in running and by_id[t.parent] not in queue
                      and not ready(t, fresh=True)]:
                queue.remove(t)  # its parent ended without the step it forks from
                error = (f"parent {t.parent} ended without saving step {t.fork_step} (its latest row in "
                         f"{table.path} says why); a rerun retries the parent, then this fork")
                table.append(row(t, "failed", error=error))
                outcome.failed += 1
                done_work += work(t)
                progress.message(f"failed  {t.id}  {error}")
            for tid, r in list(running.items()):
                code = backend.poll(r.handle)
                if code is None:
                    continue
                del running[tid]
                wall = time.time() - r.t0
                done_work += work(r.trial)
                summary = ok_summary(trial_dir(workdir, r.trial)) if code == 0 else None
                if summary is not None:
                    table.append(row(r.trial, OK, summary=summary, wall=wall))
                    outcome.ok += 1
                    progress.message(f"ok      {tid}  eval loss {summary['final_eval_loss']:.4f}  ({fmt_time(wall)})")
                    continue
                if code == 143:
                    status, error = "preempted", "exit 143: stopped by SIGTERM after checkpointing; a rerun resumes it"
                elif code == 0:
                    status, error = "failed", "exit 0 but no summary.json with a finite final_eval_loss"
                else:
                    status, error = "failed", f"exit {code}: {backend.tail(r.handle)}"
                table.append(row(r.trial, status, wall=wall, error=error))
                outcome.failed += 1
                progress.message(f"{status:<7} {tid}  {error[:300]}  (log: {backend.log(r.handle)})")
            show()
            if running or queue:
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


class _Readiness:
    """Whether a trial can start: it is no fork, or its parent has saved the step it forks from. A saved
    step stays saved; an unsaved one is looked up again at most every `every_s` on gs:// (one request per
    waiting fork), at every poll on a local disk."""

    def __init__(self, by_id: dict, workdir: str):
        self.by_id, self.workdir, self.saved, self.asked = by_id, workdir, set(), {}
        self.every_s = 10.0 if is_remote(workdir) else 0.0

    def __call__(self, t, fresh: bool = False) -> bool:
        if not t.parent or t.id in self.saved:
            return True
        if not fresh and time.time() - self.asked.get(t.id, -math.inf) < self.every_s:
            return False
        self.asked[t.id] = time.time()
        if step_saved(os.path.join(trial_dir(self.workdir, self.by_id[t.parent]), "checkpoints"), t.fork_step):
            self.saved.add(t.id)
        return t.id in self.saved


def _fork_overrides(t, by_id: dict, workdir: str) -> list[str]:
    if not t.parent:
        return []
    return [f"checkpoint.fork_from={trial_dir(workdir, by_id[t.parent])}", f"checkpoint.fork_step={t.fork_step}"]


def _stop_all(backend: Backend, running: dict, table: ResultsTable, progress: Progress, stop: list,
              grace_s: float, poll_s: float, workdir: str) -> None:
    """SIGTERM every running trial and wait for it to checkpoint; a second Ctrl-C or the grace period
    ends in SIGKILL. Trials that stopped get no row (a rerun resumes them); one that happened to finish does."""
    progress.message(f"stopping {len(running)} running trial(s) (SIGTERM; they checkpoint and exit) ...")
    signals_seen = len(stop)
    for r in running.values():
        backend.terminate(r.handle)
    deadline, killed = time.time() + grace_s, False
    while running:
        for tid, r in list(running.items()):
            code = backend.poll(r.handle)
            if code is None:
                continue
            del running[tid]
            summary = ok_summary(trial_dir(workdir, r.trial)) if code == 0 else None
            if summary is not None:
                table.append(row(r.trial, OK, summary=summary, wall=time.time() - r.t0))
        if running and not killed and (time.time() > deadline or len(stop) > signals_seen):
            progress.message("killing the remaining trials (SIGKILL); they resume from their last checkpoint")
            for r in running.values():
                backend.kill(r.handle)
            killed = True
        time.sleep(poll_s)
