"""Where trials run. The runner (launch/runner.py) talks to a Backend only:

- LocalBackend: child processes of the runner, this host's devices split between them (launch/devices.py).
- RayBackend (launch/ray_backend.py): one Ray actor per trial, anywhere on a Ray cluster, starting the
  same trial process (launch/trial.py) on its node.

Dependencies between trials (a cooldown fork and its stable run) are the runner's: a backend is handed a
fork only once its parent has saved the step it forks from, with the overrides that point it there.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Optional, Protocol

from launch import devices
from launch.trial import TrialProcess, child_env, start_trial

BACKENDS = ("local", "ray")


class Backend(Protocol):
    """Starts trials and reports on them; `start` returns a handle the other methods take."""

    def start(self, module: str, tdir: str, overrides: list[str]) -> object: ...
    def poll(self, handle) -> Optional[int]: ...          # exit code, or None while running
    def tail(self, handle) -> str: ...                    # the end of this attempt's log, for a failed row
    def log(self, handle) -> str: ...                     # where the whole log is
    def terminate(self, handle) -> None: ...              # SIGTERM: checkpoint and exit (143)
    def kill(self, handle) -> None: ...
    def close(self) -> None: ...


@dataclasses.dataclass
class _LocalHandle:
    trial: TrialProcess
    slot: int


class LocalBackend:
    """Each trial a child process of this one, on one of `parallel` device slots of this host."""

    def __init__(self, parallel: int = 1, env: Optional[dict] = None, extra_env: Optional[dict] = None):
        self.env = child_env(extra_env or {}, env)
        self.host = devices.detect(self.env)
        self.slots = devices.split(self.host, parallel, self.env)  # ValueError if parallel does not divide
        self.free = list(range(parallel))
        if parallel > 1:
            print(f"local backend: {self.host.describe()}; {devices.sharing_note(self.host, parallel)}",
                  file=sys.stderr)

    def start(self, module: str, tdir: str, overrides: list[str]) -> _LocalHandle:
        slot = self.free.pop(0)  # the runner never starts more trials than slots
        return _LocalHandle(start_trial(module, tdir, overrides, dict(self.env, **self.slots[slot])), slot)

    def poll(self, handle: _LocalHandle) -> Optional[int]:
        was_running = handle.trial.lock_fd >= 0
        code = handle.trial.poll()
        if code is not None and was_running:
            self.free.append(handle.slot)
            self.free.sort()
        return code

    def tail(self, handle: _LocalHandle) -> str:
        return handle.trial.tail()

    def log(self, handle: _LocalHandle) -> str:
        return handle.trial.log

    def terminate(self, handle: _LocalHandle) -> None:
        if handle.trial.proc.poll() is None:
            handle.trial.proc.send_signal(signal.SIGTERM)

    def kill(self, handle: _LocalHandle) -> None:
        if handle.trial.proc.poll() is None:
            handle.trial.proc.kill()

    def close(self) -> None:
        pass


def make_backend(name: str, parallel: Optional[int], *, ray_address: Optional[str] = None,
                 ray_timeout_s: float = 30.0, resources=None, extra_env: Optional[dict] = None):
    """The backend named on the command line, and how many trials run at once on it."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r} is not a backend; use one of {', '.join(BACKENDS)}.")
    if parallel is not None and parallel < 1:
        raise ValueError(f"--parallel {parallel} must be >= 1 (trials run at once).")
    if name == "local":
        if ray_address is not None:
            raise ValueError(f"--ray-address {ray_address} needs --backend ray.")
        parallel = 1 if parallel is None else parallel
        return LocalBackend(parallel, extra_env=extra_env), parallel
    from launch.ray_backend import RayBackend, Resources
    backend = RayBackend(ray_address, resources or Resources(), extra_env=extra_env, timeout_s=ray_timeout_s)
    return backend, backend.capacity() if parallel is None else parallel
