"""A Ray cluster on Cloud TPU VMs for `launch.sweep --backend ray`: the gcloud commands, printed or run.

    python -m launch.ray_cluster up    --name iso --project P --zone us-east5-a --tpu v5p-32 --slices 4 \\
                                       --version v2-alpha-tpuv5 [--spot] [--run]
    python -m launch.ray_cluster sweep --name iso --project P --zone us-east5-a --tpu v5p-32 [--run] -- \\
                                       experiments.scaling_isoflop --workdir gs://BUCKET/isoflop
    python -m launch.ray_cluster down  --name iso --project P --zone us-east5-a --slices 4 [--run]

The cluster: one CPU VM NAME-head runs the Ray head and the sweep driver (it holds results.csv's writer
and the progress line); each of --slices TPU VMs NAME-0..N-1 joins it on every host. Ray finds the TPU
chips itself and gives worker 0 of each slice the resource `TPU-<type>-head`, so `--trial-tpu TYPE`
gives each trial one whole slice. The project travels as a `git archive` of HEAD (commit first) and is
installed with pip on every host. Workdirs must be gs:// so every host sees the trials' checkpoints.
Without --run the commands are printed, one per line, to run by hand.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import subprocess
import sys

RAY = "ray[default]>=2.60,<2.61"
ARCHIVE = "/tmp/t5like-src.tar.gz"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,40}$")
_TPU = re.compile(r"^v\d+[a-z]*-\d+$")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    name: str
    project: str
    zone: str
    tpu: str = "v5p-8"                  # accelerator type of each slice
    slices: int = 1
    version: str = "v2-alpha-tpuv5"     # TPU VM runtime image
    head_machine: str = "n2-standard-8"
    spot: bool = False

    def validate(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"--name {self.name!r}: use lowercase letters, digits and '-', starting with a letter.")
        if not _TPU.match(self.tpu):
            raise ValueError(f"--tpu {self.tpu!r} is not a TPU accelerator type; e.g. v5p-32, v6e-8, v4-16.")
        if self.slices < 1:
            raise ValueError(f"--slices {self.slices} must be >= 1.")
        if not self.project or not self.zone:
            raise ValueError("--project and --zone are required (the gcloud project and zone of the TPUs).")

    @property
    def head(self) -> str:
        return f"{self.name}-head"

    def head_address(self) -> str:
        """The head's internal DNS name: known before the VM exists, reachable from every VM in the VPC."""
        return f"{self.head}.{self.zone}.c.{self.project}.internal:6379"

    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


def _install(extra: str) -> str:
    return (f"mkdir -p ~/t5like && tar xzf ~/t5like-src.tar.gz -C ~/t5like && "
            f"pip install -q -e ~/t5like {shlex.quote(RAY)} {extra}".strip())


def up_commands(spec: ClusterSpec) -> list[list[str]]:
    spec.validate()
    cmds = [["git", "archive", "--format=tar.gz", "-o", ARCHIVE, "HEAD"],
            ["gcloud", "compute", "instances", "create", spec.head, *spec.where(),
             f"--machine-type={spec.head_machine}", "--image-family=ubuntu-2204-lts",
             "--image-project=ubuntu-os-cloud", "--scopes=cloud-platform"],
            ["gcloud", "compute", "scp", ARCHIVE, f"{spec.head}:~/t5like-src.tar.gz", *spec.where()],
            ["gcloud", "compute", "ssh", spec.head, *spec.where(), "--command",
             _install("") + " && ray start --head --port=6379 --num-cpus=0 --disable-usage-stats"]]
    for i in range(spec.slices):
        tpu = f"{spec.name}-{i}"
        cmds += [["gcloud", "compute", "tpus", "tpu-vm", "create", tpu, *spec.where(),
                  f"--accelerator-type={spec.tpu}", f"--version={spec.version}", *(["--spot"] if spec.spot else [])],
                 ["gcloud", "compute", "tpus", "tpu-vm", "scp", ARCHIVE, f"{tpu}:~/t5like-src.tar.gz",
                  "--worker=all", *spec.where()],
                 ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, "--worker=all", *spec.where(), "--command",
                  _install(shlex.quote("jax[tpu]>=0.10.2,<0.11")) +
                  f" && ray start --address={spec.head_address()} --disable-usage-stats"]]
    return cmds


def sweep_command(spec: ClusterSpec, sweep_args: list[str]) -> list[str]:
    """The sweep, driven from the head: one whole slice per trial."""
    spec.validate()
    if not sweep_args:
        raise ValueError("give the sweep after --, e.g. -- experiments.scaling_isoflop --workdir gs://BUCKET/isoflop")
    driver = ["python", "-m", "launch.sweep", *sweep_args, "--backend", "ray", "--ray-address", "auto",
              "--trial-cpus", "0", "--trial-tpu", spec.tpu]
    return ["gcloud", "compute", "ssh", spec.head, *spec.where(), "--command", f"cd ~/t5like && {shlex.join(driver)}"]


def down_commands(spec: ClusterSpec) -> list[list[str]]:
    spec.validate()
    cmds = [["gcloud", "compute", "tpus", "tpu-vm", "delete", f"{spec.name}-{i}", *spec.where(), "--quiet", "--async"]
            for i in range(spec.slices)]
    return cmds + [["gcloud", "compute", "instances", "delete", spec.head, *spec.where(), "--quiet"]]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sweep_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(prog="python -m launch.ray_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "sweep", "down"))
    ap.add_argument("--name", required=True)
    ap.add_argument("--project", required=True)
    ap.add_argument("--zone", required=True)
    ap.add_argument("--tpu", default=ClusterSpec.tpu, help="accelerator type of each slice, e.g. v5p-32")
    ap.add_argument("--slices", type=int, default=1, help="TPU slices (one trial runs per slice)")
    ap.add_argument("--version", default=ClusterSpec.version, help="TPU VM runtime version")
    ap.add_argument("--head-machine", default=ClusterSpec.head_machine)
    ap.add_argument("--spot", action="store_true", help="spot TPUs (preemptible; trials resume after preemption)")
    ap.add_argument("--run", action="store_true", help="run the commands (default: print them)")
    args = ap.parse_args(argv)
    spec = ClusterSpec(args.name, args.project, args.zone, args.tpu, args.slices, args.version,
                       args.head_machine, args.spot)
    try:
        cmds = {"up": lambda: up_commands(spec), "down": lambda: down_commands(spec),
                "sweep": lambda: [sweep_command(spec, sweep_args)]}[args.action]()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if args.run and subprocess.run(cmd).returncode != 0:
            print(f"error: `{shlex.join(cmd)}` failed; fix it and rerun (finished steps are safe to repeat, "
                  "except create, which fails if the VM exists).", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
