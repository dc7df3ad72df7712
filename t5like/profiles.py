"""Profiles (train.profile_steps=FIRST,LAST), as a plugin of the trainer's seam (t5like/plugins.py).

On each host in train.profile_hosts, a jax.profiler trace runs from the start of step FIRST to the end of step
LAST and is written under WORKDIR/profile (gs:// included: the profiler writes through TSL's file systems).
Each step is a StepTraceAnnotation named "train" with its step number, so the profile plugin's step views
and the trace viewer show one box per step around the jitted train_step. Open the trace with
`python -m xprof.server --logdir WORKDIR/profile` (tensorboard-plugin-profile brings XProf) or
`tensorboard --logdir WORKDIR/profile`.
"""
from __future__ import annotations

import contextlib
import sys

import jax

from t5like import storage
from t5like.config import Config
from t5like.plugins import Plugin


def profile_dir(workdir: str) -> str:
    return storage.join(workdir, "profile")


class Profile(Plugin):
    """A jax.profiler trace of the steps in train.profile_steps, on the hosts in train.profile_hosts."""

    def __init__(self, cfg: Config):
        self.first, self.last = cfg.train.profile_steps
        self.hosts, self.workdir = cfg.train.profile_hosts, cfg.workdir
        self.active = False

    def check_start(self, resuming: bool) -> None:
        hosts = jax.process_count()
        bad = [h for h in self.hosts if h >= hosts]
        if bad:
            raise ValueError(f"train.profile_hosts={','.join(map(str, self.hosts))} names host {bad[0]}, but this run "
                             f"has {hosts} host(s) (0..{hosts - 1}); e.g. train.profile_hosts=0.")

    @contextlib.contextmanager
    def phase(self, name: str, step: int):
        if name not in ("compile", "step") or not self.first <= step <= self.last \
                or jax.process_index() not in self.hosts:
            yield
            return
        if not self.active:  # the first profiled step of this process (a resumed run may start inside the range)
            jax.profiler.start_trace(profile_dir(self.workdir))
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield
        if step == self.last:
            self._stop()

    def _stop(self) -> None:
        # The steps run asynchronously: wait for every computation in flight, so the last step is in the trace.
        jax.block_until_ready(jax.live_arrays())
        jax.profiler.stop_trace()
        self.active = False
        print(f"profile of steps {self.first}..{self.last} written to {profile_dir(self.workdir)} (open it with "
              f"python -m xprof.server --logdir {profile_dir(self.workdir)})", file=sys.stderr)

    def on_finish(self, summary: dict) -> None:
        if self.active:  # preempted inside the range: keep what was traced
            self._stop()
