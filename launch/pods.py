"""Where the per-worker command runs: a Cloud TPU slice (through gcloud), or N local processes.

Both give the run loop in launch/tpu.py the same four steps:
    pod.up()          create (or re-create) and prepare: ready, code shipped, venv, leftovers cleaned
    pod.run(cmd)      run cmd on every worker, stream worker 0's log, keep every log; -> exit codes
    pod.healthy()     after a failure: is the pod still there (a worker failed) or gone (preempted)?
    pod.down()        delete
LocalPod runs the exact per-worker command as N processes joined by jax.distributed (the
--coordinator flags), each with its own simulated CPU devices: the test hook for the run loop.
"""
from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import gcloud
from launch.devices import with_device_count
from launch.gcloud import Slice


def echo(argv: list[str]) -> None:
    print("+ " + shlex.join(argv), file=sys.stderr, flush=True)


def call(argv: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    echo(argv)
    result = subprocess.run(argv, text=True, stdout=subprocess.PIPE if capture else None)
    if check and result.returncode:
        raise RuntimeError(f"command failed with exit code {result.returncode}: {shlex.join(argv)}")
    return result


def call_all(argvs: list[list[str]], check: bool = True) -> list[int]:
    """Run the commands at once (one per slice); -> their exit codes."""
    procs = []
    for argv in argvs:
        echo(argv)
        procs.append(subprocess.Popen(argv, text=True))
    codes = [p.wait() for p in procs]
    bad = [(argv, c) for argv, c in zip(argvs, codes) if c]
    if check and bad:
        raise RuntimeError(f"command failed with exit code {bad[0][1]}: {shlex.join(bad[0][0])}")
    return codes


def _stream(src, dst) -> threading.Thread:
    def pump():
        for line in src:
            dst.write(line)
            dst.flush()
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


class CloudPod:
    READY = {False: "READY", True: "ACTIVE"}  # tpu-vm state / queued-resource state

    def __init__(self, s: Slice, wheel: str, log_dir: str, local_logs: str, ready_timeout: float,
                 poll_s: float = 30.0):
        self.s, self.wheel, self.log_dir, self.local_logs = s, wheel, log_dir, local_logs
        self.ready_timeout, self.poll_s = ready_timeout, poll_s
        self.created = False
        self.coordinator = ""  # K > 1 slices: slice 0 worker 0's internal IP, once they exist

    @property
    def nodes(self) -> list:
        """Per-node commands go to the slice by name, or to each node NAME-i of a K-slice queued resource."""
        return self.s.nodes if self.s.num_slices > 1 else [None]

    def state(self) -> str:
        result = call(gcloud.describe_state(self.s), check=False, capture=True)
        return result.stdout.strip() if result.returncode == 0 else "GONE"

    def up(self, fresh: bool) -> None:
        if fresh:
            if self.created:
                self.down()
            self.create()
            deadline = time.monotonic() + self.ready_timeout
            while (state := self.state()) != self.READY[self.s.queued]:
                if state in ("FAILED", "SUSPENDED", "PREEMPTED", "TERMINATED") or time.monotonic() > deadline:
                    raise RuntimeError(f"slice {self.s.name} is {state}, not ready after "
                                       f"{self.ready_timeout:.0f} s (--ready-timeout).")
                time.sleep(self.poll_s)
            if self.s.num_slices > 1:
                self.coordinator = call(gcloud.coordinator_ip(self.s), capture=True).stdout.strip()
                if not self.coordinator:
                    raise RuntimeError(f"no internal IP for {self.s.nodes[0]} (slice 0), the multislice "
                                       "coordinator.")
            for node in self.nodes:
                call(gcloud.scp_to_all(self.s, self.wheel, "~/", node=node))
            call_all([gcloud.ssh(self.s, gcloud.setup_script(os.path.basename(self.wheel)), node=n)
                      for n in self.nodes])
        for node in self.nodes:
            call(gcloud.ssh(self.s, gcloud.CLEANUP_SCRIPT, node=node))

    def create(self) -> None:
        """Only a slice this launcher made is ever deleted: a create that fails (the name is taken, no
        quota) leaves whatever holds the name alone. Interrupted mid-create, the slice may be half made;
        the name was free when the run began (check_name_free), so it is ours to delete."""
        self.created = True
        try:
            call(gcloud.create(self.s))
        except RuntimeError as e:
            self.created = False
            raise RuntimeError(f"{e}\nCould not create slice {self.s.name!r} (gcloud says why, above); nothing "
                               "was deleted. If the name is taken, that slice is not this run's: pick another "
                               "--name, or delete it yourself with `python -m launch.tpu delete`.") from None

    def run(self, worker_command: list[str], attempt: int) -> list[int]:
        tail = subprocess.Popen(gcloud.ssh(self.s, gcloud.tail_script(), worker="0", node=self.nodes[0]), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        _stream(tail.stdout, sys.stdout)
        try:
            # Every slice at once: each waits in jax.distributed.initialize() for the others.
            codes = call_all(gcloud.run_all(self.s, worker_command, self.log_dir, self.coordinator), check=False)
        finally:
            tail.terminate()
            tail.wait()
        if self.log_dir.startswith("gs://"):
            call(gcloud.copy(self.log_dir, os.path.join(self.local_logs, f"attempt-{attempt}")), check=False)
        return codes

    def healthy(self) -> bool:
        return self.state() == self.READY[self.s.queued]

    def down(self) -> None:
        if not self.created:   # never one this launcher did not make
            return
        call(gcloud.delete(self.s), check=False)
        self.created = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class LocalPod:
    """N local processes, each `worker_command + --coordinator ... --process-id i`, K CPU devices each."""

    def __init__(self, num_workers: int, devices_per_worker: int, local_logs: str, log_dir: str):
        self.n, self.k, self.local_logs, self.log_dir = num_workers, devices_per_worker, local_logs, log_dir
        self.procs: list[subprocess.Popen] = []

    def up(self, fresh: bool) -> None:
        os.makedirs(self.local_logs, exist_ok=True)

    def run(self, worker_command: list[str], attempt: int) -> list[int]:
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": with_device_count(os.environ.get("XLA_FLAGS", ""), self.k)}  # other flags kept
        logs = []
        for i in range(self.n):
            argv = [*worker_command, "--coordinator", f"localhost:{port}", "--num-processes", str(self.n),
                    "--process-id", str(i)]
            echo(argv)
            log = open(os.path.join(self.local_logs, f"worker-{i}.log"), "a")
            log.write(f"=== attempt {attempt}: {shlex.join(argv)}\n")
            log.flush()
            logs.append(log)
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            with open(os.path.join(self.local_logs, f"worker-{i}.pid"), "w") as f:
                f.write(str(proc.pid))
        done = threading.Event()
        follower = threading.Thread(target=self._follow, args=(os.path.join(self.local_logs, "worker-0.log"), done),
                                    daemon=True)
        follower.start()
        codes = self._wait()
        done.set()
        follower.join()
        for log in logs:
            log.close()
        self._save_logs()
        return codes

    def _wait(self) -> list[int]:
        """Wait for all; when one fails, the others would wait forever in a collective: end them too,
        as deleting a slice would."""
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                self.procs = []
                return codes
            if any(c not in (None, 0) for c in codes):
                for p in self.procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
                for p in self.procs:
                    p.wait()
            time.sleep(0.2)

    def _follow(self, path: str, done: threading.Event) -> None:
        with open(path) as f:
            f.seek(0, os.SEEK_END)
            while True:
                line = f.readline()
                if line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                elif done.is_set():
                    return
                else:
                    time.sleep(0.1)

    def _save_logs(self) -> None:
        """Every worker's log into the workdir's logs/ (gs:// or local), as the cloud workers do."""
        from etils import epath
        dst = epath.Path(self.log_dir)
        dst.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            with open(os.path.join(self.local_logs, f"worker-{i}.log")) as f:
                (dst / f"worker-{i}.log").write_text(f.read())

    def healthy(self) -> bool:
        return True  # local processes: a failure is a worker failure; the "slice" is always there

    def down(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait()
        self.procs = []

