"""The Ray backend: each trial is a Ray actor that starts the same trial process as the local backend.

    python -m launch.sweep experiments.NAME --workdir DIR --backend ray                    # a local Ray cluster
    python -m launch.sweep experiments.NAME --workdir DIR --backend ray --ray-address auto  # join a running one

The driver (the `launch.sweep` process) keeps results.csv and the progress line; the actors only run
trials. An actor holds the trial's resources (`Resources`: CPUs, GPUs, or a whole TPU slice through Ray's
`TPU-<type>-head` resource) for the trial's life. If its worker dies mid-trial, Ray restarts the actor and
re-runs the trial (up to `max_retries` times), which resumes from its own checkpoint. Ctrl-C on the
driver SIGTERMs every trial (they checkpoint and exit 143); a SIGKILLed driver takes its actors with it
(Ray ends a dead driver's actors; the trial gets SIGTERM from its dying parent). Trial workdirs must be
where every node can reach them: the same local disk on a one-node cluster, else gs://. That includes a
cooldown fork's parent, whose checkpoint step the fork copies on whichever node it lands (the driver starts
the fork once that step is saved: launch/runner.py).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
from typing import Optional

from launch.trial import child_env


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one trial asks Ray for."""
    cpus: float = 1.0
    gpus: float = 0.0
    tpu: Optional[str] = None     # a whole slice, e.g. "v5p-32": Ray's "TPU-v5p-32-head" resource

    def need(self) -> dict:
        need = {"CPU": self.cpus, "GPU": self.gpus}
        if self.tpu:
            need[f"TPU-{self.tpu}-head"] = 1.0
        return {k: v for k, v in need.items() if v > 0}

    def validate(self) -> None:
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"--trial-cpus {self.cpus} / --trial-gpus {self.gpus} must be >= 0.")
        if not self.need():
            raise ValueError("each Ray trial must ask for something: give --trial-cpus > 0, --trial-gpus or "
                             "--trial-tpu.")


class TrialActor:
    """Runs one trial process on its node; `stop` may arrive while `run` waits (a threaded actor).

    A whole-slice trial (`--trial-tpu`) lands on worker 0 of a slice, through its `TPU-<type>-head`
    resource, and runs the trial on every host of that slice (Ray's pattern, see
    ray/_private/accelerators/tpu.py: one actor per host, resources {"TPU": chips, <slice name>: 1}); JAX
    on a TPU VM joins the hosts itself. A slice runs or stops whole: one host failing stops the others.
    """

    def __init__(self):
        self.trial, self.hosts = None, []

    def run(self, module: str, tdir: str, overrides: list[str], env: dict, whole_slice: bool = False,
            host: int = 0):
        if whole_slice:
            return self._run_on_slice(module, tdir, overrides, env)
        from launch.trial import start_trial
        self.trial = start_trial(module, tdir, overrides, dict(os.environ, **env), upload_log=host == 0)
        self.trial.proc.wait()
        code = self.trial.poll()  # frees the trial lock, uploads a gs:// trial's log
        return code, self.trial.tail(), f"{socket.gethostname()}:{self.trial.log}"

    def _run_on_slice(self, module, tdir, overrides, env):
        import ray
        from ray.util import tpu
        hosts, chips = tpu.get_current_pod_worker_count() or 1, tpu.get_num_tpu_chips_on_node()
        # every host of the slice carries {slice name: 1}; "TPU": all its chips (Ray refuses 0: a chipless node)
        need = {tpu.get_current_pod_name(): 1, **({"TPU": chips} if chips else {})}
        per_host = ray.remote(TrialActor).options(num_cpus=0, max_concurrency=2, resources=need)
        self.hosts = [per_host.remote() for _ in range(hosts)]
        refs = [h.run.remote(module, tdir, overrides, env, host=i) for i, h in enumerate(self.hosts)]
        results, pending = {}, list(refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            try:
                results[refs.index(ref)] = ray.get(ref)
            except ray.exceptions.RayError as e:
                results[refs.index(ref)] = (-1, f"ray: {type(e).__name__}: {e}", "?")
            if results[refs.index(ref)][0] != 0 and pending:
                self.stop(signal.SIGTERM)
        for h in self.hosts:
            ray.kill(h)
        failed = [results[i] for i in sorted(results) if results[i][0] != 0]
        return failed[0] if failed else results[0]

    def stop(self, sig: int) -> None:
        for h in self.hosts:
            h.stop.remote(sig)
        if self.trial is not None and self.trial.proc.poll() is None:
            self.trial.proc.send_signal(sig)


@dataclasses.dataclass
class _RayHandle:
    actor: object
    ref: object
    result: Optional[tuple] = None


def probe(address: str, timeout_s: float) -> None:
    """Fail fast, with a clear error, when HOST:PORT does not answer (ray.init would retry for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} must be auto or HOST:PORT (the head's GCS port, "
                         "default 6379).")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"--ray-address {address}: no Ray head answered within {timeout_s:g} s ({e}); start one "
                         f"with `ray start --head --port={port}` there, or check the address.") from None


class RayBackend:
    def __init__(self, address: Optional[str], resources: Resources, extra_env: Optional[dict] = None,
                 timeout_s: float = 30.0, num_cpus: Optional[int] = None, max_retries: int = 3):
        import ray
        resources.validate()
        if address not in (None, "auto"):
            probe(address, timeout_s)
        try:
            if address is None:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level="warning")
            else:
                ray.init(address=address, log_to_driver=False, logging_level="warning")
        except ConnectionError as e:
            raise ValueError(f"--ray-address {address}: cannot join a Ray cluster ({e}); start one with "
                             "`ray start --head`, or leave out --ray-address for a local one.") from None
        self.ray, self.resources, self.address = ray, resources, address or "local"
        self.nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        need = resources.need()
        if not any(all(node.get(k, 0) >= v for k, v in need.items()) for node in self.nodes):
            largest = max(self.nodes, key=lambda n: n.get("CPU", 0))
            have = {k: largest.get(k, 0) for k in need}
            ray.shutdown()
            raise ValueError(f"each trial asks for {need}, but no node of the Ray cluster ({self.address}, "
                             f"{len(self.nodes)} node(s)) has that much (the node with most CPUs has {have}); "
                             "lower --trial-cpus/--trial-gpus, give a --trial-tpu type the cluster has, or add "
                             "such a node (the check counts the nodes up now; Ray would otherwise wait forever).")
        # PYTHONPATH so the actor's worker can import launch/ and the experiment (same paths on every node);
        # --env values reach the actor too (it writes the trial's gs:// log) and through it the trial.
        env = child_env(extra_env or {}, base={"PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        self.env = env
        options = {"num_cpus": resources.cpus, "num_gpus": resources.gpus, "max_concurrency": 2,
                   "max_restarts": max_retries, "max_task_retries": max_retries,
                   "runtime_env": {"env_vars": {"PYTHONPATH": env["PYTHONPATH"], **(extra_env or {})}}}
        if resources.tpu:
            options["resources"] = {f"TPU-{resources.tpu}-head": 1}
        self.actor_cls = ray.remote(TrialActor).options(**options)

    def capacity(self) -> int:
        """How many trials fit on the cluster's nodes at once."""
        need = self.resources.need()
        return max(1, sum(int(min(node.get(k, 0) // v for k, v in need.items())) for node in self.nodes))

    def start(self, module: str, tdir: str, overrides: list[str]) -> _RayHandle:
        actor = self.actor_cls.remote()
        return _RayHandle(actor, actor.run.remote(module, tdir, overrides, self.env, bool(self.resources.tpu)))

    def poll(self, handle: _RayHandle) -> Optional[int]:
        if handle.result is None:
            ready, _ = self.ray.wait([handle.ref], timeout=0)
            if not ready:
                return None
            try:
                handle.result = self.ray.get(handle.ref)
            except self.ray.exceptions.RayError as e:  # retries used up, or the actor could not start
                handle.result = (-1, f"ray: {type(e).__name__}: {e}", "?")
            self.ray.kill(handle.actor)  # frees its resources
        return handle.result[0]

    def tail(self, handle: _RayHandle) -> str:
        return handle.result[1] if handle.result else ""

    def log(self, handle: _RayHandle) -> str:
        return handle.result[2] if handle.result else "?"

    def terminate(self, handle: _RayHandle) -> None:
        if handle.result is None:
            handle.actor.stop.remote(signal.SIGTERM)

    def kill(self, handle: _RayHandle) -> None:
        if handle.result is None:
            try:
                self.ray.get(handle.actor.stop.remote(signal.SIGKILL), timeout=10)
            except self.ray.exceptions.RayError:
                pass  # the actor is gone already; its trial got SIGTERM from the dying worker
            handle.result = (-9, "killed", "?")
            self.ray.kill(handle.actor, no_restart=True)

    def close(self) -> None:
        self.ray.shutdown()
