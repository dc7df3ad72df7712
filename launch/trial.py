"""One trial's process and what it leaves behind; shared by every backend.

`start_trial` runs `python -m MODULE workdir=TDIR *overrides` as a child of the calling process (the
runner for the local backend, a Ray worker for the Ray backend), output appended to the trial's
train.log. `finished_summary` and `row` turn the trial's summary.json into a results.csv row.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

from etils import epath

from t5like.storage import is_remote
from t5like.scaling.design import Trial

# Run in the child before the experiment: die with its parent (Linux), so a SIGKILLed runner or Ray worker
# leaves no trial running on its own; the trial gets SIGTERM, checkpoints and exits 143, and a rerun or a
# Ray retry resumes it.
_BOOT = """\
import os, runpy, signal, sys
try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(os.environ["T5LIKE_SWEEP_PID"]):
    sys.exit(143)  # the parent is already gone
if os.environ.get("T5LIKE_CPUS"):  # this trial's share of the cores (launch/devices.py)
    os.sched_setaffinity(0, {int(c) for c in os.environ["T5LIKE_CPUS"].split(",")})
print("trial devices:", os.environ.get("T5LIKE_DEVICES", "all"), "cores:", sorted(os.sched_getaffinity(0)),
      flush=True)
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def child_env(extra: dict, base: Optional[dict] = None) -> dict:
    """The trial's environment (every backend's; here, below them, so backends.py and ray_backend.py
    both import it one way): `python -m launch.sweep` found the experiment on sys.path via the cwd, so
    the trial gets the cwd on PYTHONPATH too; `--env` values on top."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


@dataclasses.dataclass
class TrialProcess:
    proc: subprocess.Popen
    lock_fd: int
    log: str            # local log file of this attempt
    offset: int         # where this attempt's output starts in it
    tdir: str
    upload_log: bool = True   # a gs:// trial's log goes next to its results (host 0 of a slice only)

    def poll(self) -> Optional[int]:
        code = self.proc.poll()
        if code is not None and self.lock_fd >= 0:
            os.close(self.lock_fd)  # the child's copy closed with it; the lock is free again
            self.lock_fd = -1
            if self.upload_log and is_remote(self.tdir):  # the local log is the only copy: keep it with the results
                epath.Path(self.tdir, "train.log").write_bytes(open(self.log, "rb").read())
        return code

    def tail(self, lines: int = 15) -> str:
        return log_tail(self.log, self.offset, lines)


def local_dir(tdir: str) -> str:
    """Where the log and lock of a trial live on this machine: the trial dir itself, or for a gs:// trial a
    directory under the temp dir named after it (flock and O_APPEND need a local file)."""
    if not is_remote(tdir):
        return tdir
    name = hashlib.sha1(tdir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "t5like_trials", f"{os.path.basename(tdir)}-{name}")


def start_trial(module: str, tdir: str, overrides: list[str], env: dict, upload_log: bool = True) -> TrialProcess:
    """Start the trial as a child of this process in its own session (a terminal's Ctrl-C reaches only the
    runner, which then stops the trials cleanly). A per-trial lock, held by the child, keeps two processes
    out of one trial workdir, e.g. a rerun or a Ray retry racing a trial that is still checkpointing."""
    local = local_dir(tdir)
    os.makedirs(local, exist_ok=True)
    epath.Path(tdir).mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(os.path.join(local, ".trial.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for an earlier process of {tdir} to exit ...", file=sys.stderr)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
    env = dict(env, T5LIKE_SWEEP_PID=str(os.getpid()), PYTHONUNBUFFERED="1")
    log = os.path.join(local, "train.log")
    with open(log, "ab") as f:
        offset = f.tell()
        f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m {module} workdir={tdir} "
                f"{' '.join(overrides)}\n".encode())
        f.flush()
        proc = subprocess.Popen([sys.executable, "-c", _BOOT, module, f"workdir={tdir}", *overrides],
                                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, pass_fds=(lock_fd,))
    return TrialProcess(proc, lock_fd, log, offset, tdir, upload_log)


def log_tail(path: str, offset: int, lines: int = 15) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    text = text.replace("\r", "\n")  # progress bars
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])


# What a finished trial left ---------------------------------------------------------------------------

def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _read_jsonl(path: epath.Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill
    return rows


def finished_summary(tdir: str) -> Optional[dict]:
    """The trial's summary.json if it finished, with losses filled from metrics.jsonl where the summary has
    none (a run resumed from its final checkpoint trains no step and reports NaN); else None."""
    path = epath.Path(tdir, "summary.json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, FileNotFoundError, json.JSONDecodeError):
        return None
    if summary.get("preempted"):
        return None
    if not (finite(summary.get("final_loss")) and finite(summary.get("final_eval_loss"))):
        metrics = _read_jsonl(epath.Path(tdir, "metrics.jsonl"))
        train = [r["loss"] for r in metrics if "loss" in r]
        evals = [r["eval_loss"] for r in metrics if "eval_loss" in r and r.get("step") == summary.get("step")]
        if not finite(summary.get("final_loss")) and train:
            summary["final_loss"] = train[-1]
        if not finite(summary.get("final_eval_loss")) and evals:
            summary["final_eval_loss"] = evals[-1]
        last = [r for r in metrics if "eval_loss" in r and r.get("step") == summary.get("step")]
        for key in ("eval_loss_stderr", "eval_bpb", "eval_bpb_stderr"):
            if not finite(summary.get(f"final_{key}")) and last and key in last[-1]:
                summary[f"final_{key}"] = last[-1][key]
    return summary


def ok_summary(tdir: str) -> Optional[dict]:
    """finished_summary, if it has the finite eval loss an ok row needs."""
    s = finished_summary(tdir)
    return s if s is not None and finite(s.get("final_eval_loss")) else None


def row(trial: Trial, status: str, *, summary: Optional[dict] = None, wall: float = float("nan"),
        error: str = "") -> dict:
    s = summary or {}
    eval_loss = s.get("final_eval_loss")
    return {"trial_id": trial.id, "budget": trial.budget, "status": status, "final_eval_loss": eval_loss,
            "loss": eval_loss, "final_train_loss": s.get("final_loss"),
            "params": s.get("params", trial.params), "non_embedding_params": s.get("non_embedding_params",
                                                                                   trial.non_embedding_params),
            "tokens": s.get("tokens", trial.tokens), "flops": s.get("flops", trial.flops),
            "steps": s.get("step", trial.steps), "wall_time_s": round(wall, 2) if finite(wall) else None,
            "overrides": json.dumps(list(trial.overrides)), "error": error[-1500:] if error else None,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "eval_loss_stderr": s.get("final_eval_loss_stderr"),
            "eval_bpb": s.get("final_eval_bpb"), "eval_bpb_stderr": s.get("final_eval_bpb_stderr"),
            "seed": trial.seed, "parent": trial.parent, "fork_step": trial.fork_step}
