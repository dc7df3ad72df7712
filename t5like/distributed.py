"""Multi-host start-up: joining the processes of one run before any device is touched.

Three ways a run starts:
  one process       nothing to join (a laptop, one GPU box, a single-host TPU VM).
  a managed cluster a Cloud TPU VM slice, SLURM or Kubernetes: JAX reads the cluster from the
                    environment, so every host runs the same command with no flags.
  explicit          `--coordinator HOST:PORT --num-processes N --process-id I` on the experiment's
                    command line (GPU clusters without a scheduler JAX knows, and the tests here).
The flags differ per host, so they never enter config.json or the resume check.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import time
from typing import Optional

import jax

# How long a host waits for the coordinator to accept connections before it gives up with an error.
# jax.distributed aborts the process (SIGABRT, no Python exception) when its own deadline passes, so we
# check reachability ourselves first and fail cleanly.
DEFAULT_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator: Optional[str] = None   # "HOST:PORT" of process 0
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    timeout_s: int = DEFAULT_TIMEOUT_S

    @property
    def explicit(self) -> bool:
        return self.coordinator is not None

    def validate(self) -> "Cluster":
        given = [self.coordinator is not None, self.num_processes is not None, self.process_id is not None]
        if any(given) and not all(given):
            raise ValueError("--coordinator, --num-processes and --process-id go together; give all three "
                             "(e.g. --coordinator host0:1234 --num-processes 2 --process-id 0) or none.")
        if not self.explicit:
            return self
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"--coordinator={self.coordinator!r} must be HOST:PORT with a port in 1..65535, "
                             "e.g. --coordinator 10.0.0.2:1234 (process 0's address).")
        if self.num_processes < 1:
            raise ValueError(f"--num-processes={self.num_processes} must be >= 1.")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"--process-id={self.process_id} must be in [0, --num-processes={self.num_processes}); "
                             f"number the hosts 0..{self.num_processes - 1}.")
        if self.timeout_s <= 0:
            raise ValueError(f"--coordinator-timeout={self.timeout_s} must be > 0 seconds.")
        return self


def add_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multi-host (per host; not part of the run's config)")
    group.add_argument("--coordinator", metavar="HOST:PORT",
                       help="process 0's address; omit on Cloud TPU VMs, SLURM and Kubernetes, where JAX finds it")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes (hosts) in the run")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    group.add_argument("--coordinator-timeout", type=int, default=DEFAULT_TIMEOUT_S, metavar="S",
                       help=f"seconds to wait for the coordinator (default {DEFAULT_TIMEOUT_S})")


def from_args(args: argparse.Namespace) -> Cluster:
    return Cluster(args.coordinator, args.num_processes, args.process_id, args.coordinator_timeout).validate()


def managed_cluster() -> Optional[str]:
    """The name of a cluster environment JAX can read by itself, or None."""
    if os.environ.get("SLURM_JOB_ID") and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "SLURM"
    if os.environ.get("JOBSET_NAME") or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return "Kubernetes/GKE TPU"
    try:  # jax's own check (files and env, no network); private, so guarded; jax is pinned to 0.10.x
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:
        running_in_cloud_tpu_vm = False
    return "Cloud TPU VM" if running_in_cloud_tpu_vm else None


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"--coordinator={address} did not accept a connection within {timeout_s:.0f} s ({e}). Start "
                    "process 0 (it serves that address), check HOST:PORT and the firewall, or raise "
                    "--coordinator-timeout.") from None
            time.sleep(0.5)


def initialize(cluster: Cluster) -> None:
    """Join the run's processes. Call before anything touches a device."""
    if cluster.explicit:
        if cluster.num_processes == 1:
            return
        if cluster.process_id != 0:
            _wait_for_coordinator(cluster.coordinator, cluster.timeout_s)
        else:
            host = cluster.coordinator.rpartition(":")[0]
            try:
                socket.getaddrinfo(host, None)
            except OSError as e:
                raise ConnectionError(f"--coordinator={cluster.coordinator}: cannot resolve {host!r} ({e}); give "
                                      "process 0's own host name or address.") from None
        jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                                   process_id=cluster.process_id, initialization_timeout=cluster.timeout_s)
    elif managed_cluster():
        jax.distributed.initialize(initialization_timeout=cluster.timeout_s)
    else:
        return
    barrier("joined")  # the first collective (gloo on CPU) then finds every host at most seconds apart


def is_primary() -> bool:
    return jax.process_index() == 0


# Hosts compile at different speeds; a host that reaches a collective first waits there, and on CPU the gloo
# rendezvous of a run's first collective gives up after 30 s (a fixed deadline in XLA). Hosts meet here,
# in the coordination service, whose wait we set, before their first collective.
BARRIER_TIMEOUT_S = 30 * 60
_barriers = 0


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process of the run reaches this barrier (no-op for one process)."""
    global _barriers
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed  # the client orbax's barriers use; jax is pinned
    _barriers += 1  # a barrier id is used once; every host calls barriers in the same order
    jax_distributed.global_state.client.wait_at_barrier(f"t5like/{_barriers}/{name}", int(timeout_s * 1000))
