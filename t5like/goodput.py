"""Goodput: where a run's wall time goes, kept in the workdir across restarts. A plugin of the trainer's seam
(t5like/plugins.py), on for every run; `python -m t5like.goodput WORKDIR` prints a job's account.

Each process (an "attempt": the first start, and every resume after a kill or preemption) times the trainer's
phases (Plugin.phase) and rewrites WORKDIR/goodput/attempt-NNNN.json (host 0): after every phase in a local
workdir; in a gs:// one, at every logged step, save and at the end (a write is a request there). A killed
attempt's time after its last record counts as downtime. The categories:

  startup   from the trainer's start to its loop, less restore: tokenizer, data, model set-up
  restore   reading the checkpoint
  compile   compiling the train and eval steps before the first step (on several hosts, with the wait
            for the slowest to compile)
  data      waiting for the next batch
  step      the training steps: dispatch, and waiting for the device to finish them
  eval      evaluations
  save      checkpoint saves, and waiting for the last one at the end
  other     the rest of the attempt (logging, the summary)

Across attempts (`account`): the steps an attempt ran past the checkpoint the next one resumed from were run
twice; their step time is `lost` (preemption). The time between one attempt's last record and the next one's
start is `downtime` (the part of the killed attempt after its last record, and the restart). The total is the
wall time from the first attempt's start to the last record; goodput = (step - lost) / total, the share of wall
time spent on steps whose results were kept. As MaxText's goodput, with the workdir in place of Cloud Logging.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time

import jax
from etils import epath

from t5like import storage
from t5like.config import Config
from t5like.plugins import Plugin

PHASES = ("restore", "compile", "data", "step", "eval", "save")
CATEGORIES = ("startup", *PHASES, "other")


def goodput_dir(workdir: str) -> str:
    return storage.join(workdir, "goodput")


def _attempt_paths(workdir: str) -> list[epath.Path]:
    folder = epath.Path(goodput_dir(workdir))
    return sorted(folder.glob("attempt-*.json")) if folder.exists() else []


def read_attempts(workdir: str, first: int | None = None) -> list[dict]:
    """Every attempt's record, in order; with `first`, only the first that many. A running attempt reads just
    the ended ones': host 0 may be rewriting its own record while another host reads the folder."""
    return [json.loads(p.read_text()) for p in _attempt_paths(workdir)[:first]]


def _step_time_at(attempt: dict, step: int) -> float:
    """The attempt's step seconds up to and including `step` (from its saves: a resume starts at a save)."""
    if step <= attempt["start_step"]:
        return 0.0
    kept = [s for saved, s in attempt["saves"] if saved <= step]
    return kept[-1] if kept else 0.0


def account(attempts: list[dict]) -> dict:
    """The job's time by category (seconds), lost and downtime, the total and goodput, over all attempts."""
    if not attempts:
        return {}
    seconds = {c: sum(a["seconds"].get(c, 0.0) for a in attempts) for c in CATEGORIES}
    lost, lost_steps, downtime = 0.0, 0, 0.0
    for a, b in zip(attempts, attempts[1:]):
        resumed = b["start_step"]
        lost += max(0.0, a["seconds"]["step"] - _step_time_at(a, resumed))
        lost_steps += max(0, a["last_step"] - resumed)
        downtime += max(0.0, b["start"] - a["end"])
    total = attempts[-1]["end"] - attempts[0]["start"]
    return {"goodput": max(0.0, seconds["step"] - lost) / total if total > 0 else 0.0, "total_s": total,
            "seconds": seconds, "lost_s": lost, "lost_steps": lost_steps, "downtime_s": downtime,
            "attempts": len(attempts), "steps": attempts[-1]["last_step"]}


def report(acc: dict) -> str:
    """One paragraph: goodput, then each category's seconds and share."""
    if not acc:
        return "no goodput records"
    total = acc["total_s"] or 1.0
    parts = [f"{c} {s:.1f}s ({s / total:.0%})" for c, s in acc["seconds"].items() if s > 0]
    return (f"goodput {acc['goodput']:.1%} of {acc['total_s']:.1f}s over {acc['attempts']} attempt(s) to step "
            f"{acc['steps']}: {', '.join(parts)}; lost to restarts {acc['lost_s']:.1f}s ({acc['lost_steps']} "
            f"steps redone), downtime {acc['downtime_s']:.1f}s")


class Goodput(Plugin):
    """Times the trainer's phases and keeps this attempt's record in WORKDIR/goodput (host 0 writes it)."""

    def __init__(self, cfg: Config):
        self.workdir, self.start = cfg.workdir, time.time()
        self.seconds = dict.fromkeys(CATEGORIES, 0.0)
        self.saves: list[list] = []   # [step, step seconds so far] at each save: what a resume keeps
        self.start_step, self.last_step, self.loop_started = 0, 0, None
        self.path, self.index = None, 0
        self.every_phase = not storage.is_remote(cfg.workdir)  # a local record costs ~0.1 ms; a gs:// one a request

    def check_start(self, resuming: bool) -> None:
        self.index = len(_attempt_paths(self.workdir))  # the attempts before this one (counted, not parsed)
        if jax.process_index() == 0:
            self.path = storage.join(goodput_dir(self.workdir), f"attempt-{self.index:04d}.json")

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        t = time.time()
        if name != "restore" and self.loop_started is None:
            self.loop_started, self.start_step, self.last_step = t, step - 1, step - 1
            self.seconds["startup"] = t - self.start - self.seconds["restore"]
        try:
            yield
        finally:
            self.seconds[name] += time.time() - t
            if name == "step":
                self.last_step = step
            elif name == "save":
                self.saves.append([step, self.seconds["step"]])
            if self.every_phase or name == "save":
                self._write()

    def on_log(self, step: int, row: dict) -> None:
        if not self.every_phase:
            self._write()

    def record(self) -> dict:
        end = time.time()
        timed = sum(v for k, v in self.seconds.items() if k != "other")
        return {"start": self.start, "end": end, "start_step": self.start_step, "last_step": self.last_step,
                "seconds": {**self.seconds, "other": max(0.0, end - self.start - timed)}, "saves": self.saves}

    def _write(self) -> None:
        if self.path is not None:
            storage.write_atomic(self.path, json.dumps(self.record()))

    def account(self) -> dict:
        """The job so far: the earlier attempts' records and this one's."""
        return account([*read_attempts(self.workdir, self.index), self.record()])

    def on_eval(self, step: int, params) -> dict:
        acc = self.account()
        return {"goodput": acc["goodput"], **{f"time/{c}_s": s for c, s in acc["seconds"].items()},
                "time/lost_s": acc["lost_s"], "time/downtime_s": acc["downtime_s"]}

    def summary(self, abstract_params) -> dict:
        acc = self.account()
        return {"goodput": acc["goodput"], "time_s": {**acc["seconds"], "lost": acc["lost_s"],
                                                       "downtime": acc["downtime_s"], "total": acc["total_s"]},
                "lost_steps": acc["lost_steps"], "attempts": acc["attempts"]}

    def on_finish(self, summary: dict) -> None:
        self._write()
        if jax.process_index() == 0:
            print(report(account(read_attempts(self.workdir))), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(prog="python -m t5like.goodput", description="A run's time by category, "
                                     "over all its restarts, from WORKDIR/goodput.")
    parser.add_argument("workdir")
    parser.add_argument("--json", action="store_true", help="print the account as JSON")
    args = parser.parse_args(argv)
    acc = account(read_attempts(args.workdir))
    if not acc:
        print(f"error: {goodput_dir(args.workdir)} holds no records; is {args.workdir!r} a t5like workdir?",
              file=sys.stderr)
        sys.exit(2)
    print(json.dumps(acc, indent=2) if args.json else report(acc))


if __name__ == "__main__":
    main()
