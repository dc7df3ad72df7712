"""Long, independent training runs that a test module starts before its first test, at the lowest CPU priority.

Most in-process tests keep one core busy. A run started at nice 19 takes an idle one, and yields to the tests
whenever they need it. Its test waits for it as it would have waited for a run it started itself, so nothing
a test checks changes; only when the CPU time is spent does.

A test module opts in with `background_runs(background, selected)`, called before its first test with its
selected tests (name -> the fixtures each uses); it starts the runs those tests need (`background.start`).
Its tests collect them with `background.wait`. Only single-process runs belong here: a starved multi-host
run could miss jax.distributed's heartbeats.
"""
from __future__ import annotations

import ctypes
import signal
import subprocess
from pathlib import Path
from typing import Callable


def _die_with_parent() -> None:
    """A run ends with the pytest process that started it, even one killed before it could clean up: an
    orphaned run would go on using a core."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Background:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.Popen] = {}
        self.made: dict[str, object] = {}

    def once(self, name: str, make: Callable[[Path], object]):
        """make(ROOT/name), once per session: what a module's runs and its fixtures both use (task files,
        a tokenizer)."""
        if name not in self.made:
            (self.root / name).mkdir()
            self.made[name] = make(self.root / name)
        return self.made[name]

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def start(self, name: str, cmd: list[str], **popen) -> None:
        """Run `cmd` at nice 19; its output goes to a file (nobody reads a pipe while it runs)."""
        assert name not in self.procs, f"background run {name!r} started twice"
        with open(self.log(name), "w") as log:
            self.procs[name] = subprocess.Popen(["nice", "-n", "19", *cmd], stdout=log, stderr=subprocess.STDOUT,
                                                preexec_fn=_die_with_parent, **popen)

    def wait(self, name: str, timeout: float = 900) -> str:
        """Wait for a run to end -> its output; a failed run fails the test that waits for it."""
        proc = self.procs[name]
        proc.wait(timeout=timeout)
        out = self.log(name).read_text()
        assert proc.returncode == 0, f"background run {name!r} exited {proc.returncode}:\n{out[-3000:]}"
        return out

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
