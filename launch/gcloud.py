"""The gcloud commands that create, reach and delete a Cloud TPU slice, as argument lists.

Nothing here runs anything: launch/tpu.py runs these (or prints them for --dry-run), and the tests feed
every one to the installed gcloud's parser. The shell snippets run on each TPU VM worker.
"""
from __future__ import annotations

import dataclasses
import shlex
from typing import Optional

from launch.tpu_types import TpuType

REMOTE_DIR = "$HOME/t5like"          # on every worker: the wheel, the venv, the run's log (shell-expanded)
VENV = f"{REMOTE_DIR}/venv"
REMOTE_PYTHON = "3.11"               # jax 0.10 and flax 0.12 need Python >= 3.11


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    zone: str
    project: str
    tpu: Optional[TpuType] = None   # needed to create; status/logs/stop/delete work by name
    runtime_version: str = ""
    capacity: str = "on-demand"     # on-demand | spot | reserved
    queued: bool = False

    @property
    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


def _tpu_vm(verb: str, s: Slice, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *s.where]


def _queued(verb: str, s: Slice, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, *s.where]


def _capacity(s: Slice) -> list[str]:
    return {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[s.capacity]


def create(s: Slice) -> list[str]:
    """A TPU VM slice now, or with `queued` a queued resource that becomes one when capacity allows."""
    if s.queued:
        return _queued("create", s, s.name, f"--node-id={s.name}", f"--accelerator-type={s.tpu.accelerator_type}",
                       f"--runtime-version={s.runtime_version}", *_capacity(s))
    return _tpu_vm("create", s, s.name, f"--accelerator-type={s.tpu.accelerator_type}",
                   f"--version={s.runtime_version}", *_capacity(s))


def describe_state(s: Slice) -> list[str]:
    """Prints READY / CREATING / PREEMPTED ... (TPU VM) or ACTIVE / WAITING_FOR_RESOURCES ... (queued)."""
    if s.queued:
        return _queued("describe", s, s.name, "--format=value(state.state)")
    return _tpu_vm("describe", s, s.name, "--format=value(state)")


def delete(s: Slice) -> list[str]:
    if s.queued:  # --force also deletes the TPU VM the queued resource made
        return _queued("delete", s, s.name, "--force", "--quiet")
    return _tpu_vm("delete", s, s.name, "--quiet")


def ssh(s: Slice, command: str, worker: str = "all") -> list[str]:
    return _tpu_vm("ssh", s, s.name, f"--worker={worker}", f"--command={command}")


def scp_to_all(s: Slice, local: str, remote: str) -> list[str]:
    return _tpu_vm("scp", s, local, f"{s.name}:{remote}", "--worker=all")


def copy(src: str, dst: str) -> list[str]:
    return ["gcloud", "storage", "cp", "--recursive", src, dst]


def config_value(key: str) -> list[str]:
    return ["gcloud", "config", "get-value", key]


# Shell run on every worker ------------------------------------------------------------------------

def setup_script(wheel_name: str) -> str:
    """A venv with the shipped wheel and its extras: tpu (jax[tpu] brings libtpu) and gcp (gs:// files).
    The TPU VM images are Ubuntu 22.04 with Python 3.10, and jax 0.10 needs >= 3.11: uv fetches a
    managed Python for the venv."""
    wheel = f"{REMOTE_DIR}/{wheel_name}"
    uv = "$HOME/.local/bin/uv"
    return (f"set -e; mkdir -p {REMOTE_DIR}; mv -f $HOME/{wheel_name} {wheel}; "
            f"test -x {uv} || python3 -m pip install -q --user uv; "
            f"test -x {VENV}/bin/python || {uv} venv -q --python {REMOTE_PYTHON} {VENV}; "
            f"{uv} pip install -q --python {VENV}/bin/python --reinstall-package t5like \"{wheel}[tpu,gcp]\"")


# The TPU is held through /dev/accel* (v4) or /dev/vfio/* (v5e, v5p, v6e); a process from an earlier
# attempt keeps it busy, and libtpu refuses to start while its lockfile exists.
CLEANUP_SCRIPT = ("sudo fuser -k -9 /dev/accel* /dev/vfio/[0-9]* 2>/dev/null || true; "
                  "sudo rm -f /tmp/libtpu_lockfile; echo cleaned")


def run_script(worker_command: list[str], log_dir: str) -> str:
    """Run the per-worker command from the venv, keep its log on the worker and copy it to `log_dir`
    (the workdir's logs/, named by host) when it ends; the pid file lets `stop` reach it."""
    cmd = shlex.join(worker_command)
    # The workdir is the user's text: quoted, so a space or a `;` in it is part of the path, never shell.
    where = shlex.quote(log_dir)
    save = (f"gcloud storage cp worker.log {where}/$(hostname).log" if log_dir.startswith("gs://")
            else f"mkdir -p {where} && cp worker.log {where}/$(hostname).log")
    lost = shlex.quote(f"could not copy worker.log to {log_dir}/; it stays on the worker as "
                       "~/t5like/worker.log (`python -m launch.tpu logs` shows its end)")
    return (f"cd {REMOTE_DIR} && . {VENV}/bin/activate && "
            f"{{ {cmd} > worker.log 2>&1 & echo $! > train.pid; wait $!; rc=$?; "
            f"{save} >/dev/null 2>&1 || echo {lost} >&2; exit $rc; }}")


def tail_script() -> str:
    return f"tail -n +1 -F {REMOTE_DIR}/worker.log"


def logs_script(lines: int = 100) -> str:
    return f"echo \"== $(hostname)\"; tail -n {lines} {REMOTE_DIR}/worker.log"


def stop_script() -> str:
    """SIGTERM the trainer on every worker: all hosts save at one agreed step and exit 143."""
    return f"test -f {REMOTE_DIR}/train.pid && kill -TERM $(cat {REMOTE_DIR}/train.pid) || true"
