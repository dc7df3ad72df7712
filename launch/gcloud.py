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
    num_slices: int = 1             # > 1: a multislice queued resource (queued must be True)

    @property
    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    @property
    def nodes(self) -> list[str]:
        """The TPU VMs: the slice itself, or, for K slices, the queued resource's nodes NAME-0 ... NAME-{K-1}
        (--node-prefix=NAME)."""
        return [self.name] if self.num_slices == 1 else [f"{self.name}-{i}" for i in range(self.num_slices)]


def _tpu_vm(verb: str, s: Slice, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *s.where]


def _queued(verb: str, s: Slice, *args: str) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, *s.where]


def _capacity(s: Slice) -> list[str]:
    return {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"]}[s.capacity]


def create(s: Slice) -> list[str]:
    """A TPU VM slice now, or with `queued` a queued resource that becomes one when capacity allows."""
    if s.num_slices > 1:  # K slices: one queued resource, nodes NAME-0 ... NAME-{K-1}
        return _queued("create", s, s.name, f"--node-count={s.num_slices}", f"--node-prefix={s.name}",
                       f"--accelerator-type={s.tpu.accelerator_type}", f"--runtime-version={s.runtime_version}",
                       *_capacity(s))
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
    if s.queued:  # --force also deletes the TPU VMs (every slice) the queued resource made
        return _queued("delete", s, s.name, "--force", "--quiet")
    return _tpu_vm("delete", s, s.name, "--quiet")


def ssh(s: Slice, command: str, worker: str = "all", node: Optional[str] = None) -> list[str]:
    return _tpu_vm("ssh", s, node or s.name, f"--worker={worker}", f"--command={command}")


def scp_to_all(s: Slice, local: str, remote: str, node: Optional[str] = None) -> list[str]:
    return _tpu_vm("scp", s, local, f"{node or s.name}:{remote}", "--worker=all")


def coordinator_ip(s: Slice) -> list[str]:
    """Prints slice 0 worker 0's internal IP: the multislice coordinator every worker is told."""
    return _tpu_vm("describe", s, s.nodes[0], "--format=value(networkEndpoints[0].ipAddress)")


# libtpu's DCN transport (megascale) listens on this port on the coordinator; 8080 is its default, and
# what MaxText's multihost runner sets.
MEGASCALE_PORT = 8080


def megascale_env(coordinator: str, num_slices: int, slice_id: int) -> dict[str, str]:
    """What the TPU runtime reads on every worker of slice `slice_id` of a multislice job. libtpu joins the
    slices over DCN through the coordinator; JAX's TPU cluster detection (jax.distributed.initialize()) takes
    the same address for its own coordinator (its port, 8476), and process id = slice id x hosts per slice +
    worker id, process count = slices x hosts per slice. A queued resource also writes these into the VMs'
    tpu-env metadata; the environment comes first for both readers, so the run says them explicitly."""
    return {"MEGASCALE_COORDINATOR_ADDRESS": coordinator, "MEGASCALE_NUM_SLICES": str(num_slices),
            "MEGASCALE_SLICE_ID": str(slice_id), "MEGASCALE_PORT": str(MEGASCALE_PORT)}


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


def run_script(worker_command: list[str], log_dir: str, env: Optional[dict[str, str]] = None) -> str:
    """Run the per-worker command from the venv, keep its log on the worker and copy it to `log_dir`
    (the workdir's logs/, named by host) when it ends; the pid file lets `stop` reach it. `env`: exported
    first (a multislice job's MEGASCALE_* variables)."""
    cmd = shlex.join(worker_command)
    if env:
        cmd = "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + "; " + cmd
    # The workdir is the user's text: quoted, so a space or a `;` in it is part of the path, never shell.
    where = shlex.quote(log_dir)
    save = (f"gcloud storage cp worker.log {where}/$(hostname).log" if log_dir.startswith("gs://")
            else f"mkdir -p {where} && cp worker.log {where}/$(hostname).log")
    lost = shlex.quote(f"could not copy worker.log to {log_dir}/; it stays on the worker as "
                       "~/t5like/worker.log (`python -m launch.tpu logs` shows its end)")
    return (f"cd {REMOTE_DIR} && . {VENV}/bin/activate && "
            f"{{ {cmd} > worker.log 2>&1 & echo $! > train.pid; wait $!; rc=$?; "
            f"{save} >/dev/null 2>&1 || echo {lost} >&2; exit $rc; }}")


def run_all(s: Slice, worker_command: list[str], log_dir: str, coordinator: str) -> list[list[str]]:
    """The run on every worker of every slice, one ssh per slice (they run at once); with K > 1 slices each
    slice's workers get the multislice environment with their slice id."""
    if s.num_slices == 1:
        return [ssh(s, run_script(worker_command, log_dir))]
    return [ssh(s, run_script(worker_command, log_dir, megascale_env(coordinator, s.num_slices, i)), node=node)
            for i, node in enumerate(s.nodes)]


def tail_script() -> str:
    return f"tail -n +1 -F {REMOTE_DIR}/worker.log"


def logs_script(lines: int = 100) -> str:
    return f"echo \"== $(hostname)\"; tail -n {lines} {REMOTE_DIR}/worker.log"


def stop_script() -> str:
    """SIGTERM the trainer on every worker: all hosts save at one agreed step and exit 143."""
    return f"test -f {REMOTE_DIR}/train.pid && kill -TERM $(cat {REMOTE_DIR}/train.pid) || true"
