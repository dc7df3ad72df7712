"""Run an experiment on a Cloud TPU VM slice, the way a careful researcher does it by hand.

    python -m launch.tpu run experiments.llama_1b --name llama1b --tpu v5p-8 --zone us-east5-a \\
        --project P --workdir gs://BUCKET/llama1b [--spot | --reserved] [--queued] [--dry-run]
    python -m launch.tpu status|logs|stop|delete --name llama1b --zone us-east5-a --project P [--dry-run]

`run`: check the config (and that its train step fits the slice, by compiling it for that topology
here: launch/compile.py), check that no slice has the run's name (the launcher deletes only what it
created), build a wheel of this checkout, create the slice (or a queued resource), wait until it is
ready, copy the wheel to every worker and pip install it with its `tpu` extra in a venv, kill
leftovers holding the TPU and remove libtpu's lockfile, then run
    python -m experiments.NAME key=value ... workdir=gs://BUCKET/RUN
on every worker (each host joins through jax.distributed.initialize() in the trainer), streaming
worker 0's log. Every worker's log goes to WORKDIR/logs/ and to --logs here. When the slice is
preempted or a worker fails, it re-creates (or reuses) the slice and reruns the same command, which
resumes from the checkpoint in the workdir, up to --max-restarts times. The slice is deleted at the
end unless --keep. --dry-run prints the commands (stdout) and runs none; without a project it shows
--project=PROJECT_ID.
`--num-slices K` (K > 1) runs on K slices joined over the data-centre network: one queued resource with
K nodes NAME-0 ... NAME-{K-1} (K > 1 implies --queued), the config's mesh.dcn_data x mesh.dcn_fsdp = K,
the code shipped to every node, and every worker of slice i told the multislice environment
(MEGASCALE_COORDINATOR_ADDRESS = slice 0 worker 0's internal IP, MEGASCALE_NUM_SLICES = K,
MEGASCALE_SLICE_ID = i, MEGASCALE_PORT = 8080: launch/gcloud.py megascale_env).
`--local-pod N` runs the per-worker command as N local processes instead of on a slice (tests).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from typing import Optional

from launch import gcloud
from launch.gcloud import Slice
from launch.pods import CloudPod, LocalPod, call, echo
from launch.tpu_types import TpuType, check_zone, check_zone_form, parse_tpu_type

# The trainer's exit status after a SIGTERM and a save (t5like.train.PREEMPTED_EXIT_CODE; not imported,
# to keep the launcher free of jax until a config is loaded).
PREEMPTED_EXIT_CODE = 143
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class UsageError(ValueError):
    pass


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.tpu", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="create a slice, run an experiment on every worker, delete it")
    run.add_argument("experiment", help="experiment module, e.g. experiments.llama_1b")
    run.add_argument("overrides", nargs="*", help="key=value config overrides")
    run.add_argument("--tpu", help="slice type: v5p-32, v5e-16 (= v5litepod-16), v6e-8, v4-32, ...")
    run.add_argument("--workdir", required=True, help="gs://BUCKET/RUN (required on multi-host slices)")
    capacity = run.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (can be preempted)")
    capacity.add_argument("--reserved", action="store_true", help="the project's reservation")
    run.add_argument("--queued", action="store_true", help="a queued resource: waits for capacity")
    run.add_argument("--num-slices", type=int, default=1, metavar="K",
                     help="K slices of --tpu joined over DCN (one queued resource of K nodes; implies --queued); "
                          "the config's mesh.dcn_data x mesh.dcn_fsdp must be K")
    run.add_argument("--runtime-version", help="TPU VM image; default by generation (launch/tpu_types.py)")
    run.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    run.add_argument("--max-restarts", type=int, default=3, help="re-create/rerun after preemption or failure")
    run.add_argument("--ready-timeout", type=float, default=None,
                     help="seconds to wait for READY (default 1800; 86400 with --queued)")
    run.add_argument("--skip-compile-check", action="store_true", help="do not compile for the slice first")
    run.add_argument("--any-zone", action="store_true", help="do not check the zone against the zone table")
    run.add_argument("--logs", help="local folder for every worker's log (default tpu_logs/NAME)")
    run.add_argument("--local-pod", type=int, metavar="N", help="run on N local processes instead (tests)")
    run.add_argument("--local-devices", type=int, default=2, help="CPU devices per local process")
    for name, text in (("status", "the slice's state"), ("logs", "the last lines of every worker's log"),
                       ("stop", "SIGTERM the run: it saves and exits"), ("delete", "delete the slice")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--queued", action="store_true", help="the slice was made as a queued resource")
        s.add_argument("--num-slices", type=int, default=1, metavar="K",
                       help="the run had K slices (implies --queued): logs and stop reach every node")
    for s in [run, *(sub.choices[n] for n in ("status", "logs", "stop", "delete"))]:
        s.add_argument("--name", required=True, help="the run's (and the slice's) name")
        s.add_argument("--zone", help="default: gcloud config get-value compute/zone")
        s.add_argument("--project", help="default: gcloud config get-value project")
        s.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    return p


# Checks, all before any command runs ---------------------------------------------------------------

# A dry run shows its plan without a project: this stands in for it, visibly.
PROJECT_PLACEHOLDER = "PROJECT_ID"


def gcloud_default(flag: str, key: str, placeholder: Optional[str] = None) -> str:
    """The flag's value, or gcloud's configured default; else the placeholder (dry runs) or a clear error."""
    result = subprocess.run(gcloud.config_value(key), capture_output=True, text=True)
    value = result.stdout.strip() if result.returncode == 0 else ""
    if (not value or value == "(unset)") and placeholder:
        print(f"# no {flag} given and gcloud has no default ({key}): the plan shows {flag}={placeholder}; a real run "
              f"needs {flag}=... or `gcloud config set {key} VALUE`.", file=sys.stderr)
        return placeholder
    if not value or value == "(unset)":
        raise UsageError(f"no {flag} given and gcloud has no default ({key} is unset); pass {flag}=..., "
                         f"or set one with `gcloud config set {key} VALUE`.")
    return value


def load_run_config(args):
    """The experiment's config with the overrides and the launcher's workdir, validated."""
    from launch.compile import load_config
    given = [o for o in args.overrides if o.startswith("workdir=")]
    if given and given[-1] != f"workdir={args.workdir}":
        raise UsageError(f"{given[-1]} disagrees with --workdir={args.workdir}; give the workdir once, as --workdir.")
    overrides = [o for o in args.overrides if not o.startswith("workdir=")] + [f"workdir={args.workdir}"]
    return load_config(args.experiment, overrides), overrides


BUCKET_RULES = ("bucket names are 3-63 characters (222 with dots, 63 between dots) of lowercase letters, digits, "
                "'-', '_' and '.', start and end with a letter or digit, and neither start with 'goog' nor "
                "contain 'google' (cloud.google.com/storage/docs/buckets#naming)")


def bucket_problem(bucket: str) -> Optional[str]:
    """What breaks Cloud Storage's bucket naming rules, or None."""
    bad = sorted(set(re.sub(r"[a-z0-9_.-]", "", bucket)))
    parts = bucket.split(".")
    return ("is empty" if not bucket
            else f"has capital letters (bucket names are lowercase: {bucket.lower()!r}?)" if bucket != bucket.lower()
            else f"has the characters {bad!r}" if bad
            else "is shorter than 3 characters" if len(bucket) < 3
            else "is longer than 63 characters" if len(bucket) > (222 if len(parts) > 1 else 63)
            else "has an empty or longer than 63 characters part between dots" if any(not 0 < len(p) <= 63 for p in parts)
            else "does not start and end with a letter or digit" if not (bucket[0].isalnum() and bucket[-1].isalnum())
            else "looks like an IP address" if re.fullmatch(r"[\d.]+", bucket)
            else "starts with 'goog'" if bucket.startswith("goog")
            else "contains 'google'" if "google" in bucket or "g00gle" in bucket else None)


def check_workdir(workdir: str) -> None:
    """A gs:// workdir must be a path Cloud Storage accepts, or the run fails on the slice, minutes and
    money later. Local paths pass (a single-host slice keeps them on its disk)."""
    if "://" not in workdir and not workdir.startswith("gs:"):
        return
    if not workdir.startswith("gs://"):
        raise UsageError(f"--workdir={workdir!r}: a remote workdir is a Cloud Storage path, gs://BUCKET/RUN "
                         "(two slashes after gs:).")
    bucket, _, path = workdir[len("gs://"):].partition("/")
    problem = bucket_problem(bucket)
    if problem:
        raise UsageError(f"--workdir={workdir!r}: the bucket name {bucket!r} {problem}; {BUCKET_RULES}. "
                         "Use e.g. --workdir=gs://my-bucket/RUN.")
    # cloud.google.com/storage/docs/objects#naming: no control characters (CR, LF), no '.' or '..'
    # parts; and not the characters gcloud and gcsfs read as wildcards or URL fragments.
    parts = path.rstrip("/").split("/") if path.rstrip("/") else []
    bad = sorted({c for c in path if ord(c) < 32 or ord(c) == 127 or c in "#[]*?"})
    if bad or any(p in ("", ".", "..") for p in parts) or len(path.encode()) > 900:
        raise UsageError(f"--workdir={workdir!r}: the run's path {path!r} is not one Cloud Storage (and gcloud "
                         f"storage) take as is: " + (f"characters {bad!r}; " if bad else "") +
                         "no empty, '.' or '..' parts, no control characters or # [ ] * ?, at most 900 bytes "
                         "(the run adds its files' names). Use e.g. --workdir=gs://my-bucket/my-run.")


def check_slice(args) -> Optional[TpuType]:
    """The cheap checks: slice type, workdir, restarts (no config loaded yet)."""
    for flag, n in (("--local-pod", args.local_pod), ("--local-devices", args.local_devices)):
        if n is not None and n < 1:
            what = "worker processes" if flag == "--local-pod" else "CPU devices per worker"
            raise UsageError(f"{flag}={n}: it is the number of local {what}, 1 or more (e.g. {flag} 2).")
    if args.num_slices < 1:
        raise UsageError(f"--num-slices={args.num_slices} must be 1 or more (e.g. --num-slices 2).")
    if args.num_slices > 1 and args.local_pod is not None:
        raise UsageError(f"--num-slices={args.num_slices} runs on Cloud TPU slices; --local-pod plays one slice "
                         "(processes as slices: tests/test_multihost.py). Drop one of them.")
    if args.local_pod is None and not args.tpu:
        raise UsageError("--tpu is required (e.g. --tpu v5p-32), unless --local-pod N.")
    tpu = parse_tpu_type(args.tpu) if args.tpu else None
    check_workdir(args.workdir)
    hosts = args.local_pod if args.local_pod is not None else tpu.hosts * args.num_slices
    if hosts > 1 and not args.workdir.startswith("gs://"):
        raise UsageError(f"--workdir={args.workdir!r} is a local path, but {args.tpu or 'the pod'} has {hosts} hosts, "
                         "each with its own disk: checkpoints must be in one place all hosts reach. Use "
                         "--workdir=gs://BUCKET/RUN.")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts={args.max_restarts} must be >= 0.")
    return tpu


def check_config(args, tpu: Optional[TpuType]) -> list[str]:
    """The experiment's config parses and validates, and its mesh covers the slice; -> overrides."""
    cfg, overrides = load_run_config(args)
    if args.local_pod is None:
        from launch.compile import check_slices
        try:  # the DCN axes make the K slices; the others cover one slice's chips
            check_slices(cfg.mesh, tpu, args.num_slices)
        except ValueError as e:
            raise UsageError(str(e)) from None
        return overrides
    devices = args.local_pod * args.local_devices
    from t5like.sharding import mesh_shape
    try:
        mesh_shape(cfg.mesh, devices)
    except ValueError as e:
        raise UsageError(f"the config's mesh does not match the slice ({devices} devices): {e}") from None
    return overrides


def compile_check(experiment: str, overrides: list[str], tpu: TpuType, num_slices: int = 1) -> dict:
    """launch.compile in a child process (it loads libtpu; the launcher stays light)."""
    argv = [sys.executable, "-m", "launch.compile", experiment, *overrides, "--topology", tpu.name,
            "--num-slices", str(num_slices)]
    # The one long step before the plan (seconds for a small model, about ten minutes for llama_1b): say so.
    print(f"compiling the train step for {tpu.name} ahead of time, to check it fits (libtpu, on this machine; "
          "minutes for a large model; --skip-compile-check skips it)", file=sys.stderr, flush=True)
    echo(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode not in (0, 1) or not lines:
        raise UsageError(f"the compile check failed: {result.stderr.strip()[-2000:]}")
    out = json.loads(lines[-1])
    print(f"compile check: {lines[-1]}", file=sys.stderr)
    if not out["fits"]:
        from launch.compile import advice
        raise UsageError(f"this plan does not fit: {advice(out)} (--skip-compile-check to launch anyway)")
    gib = 1024 ** 3
    print(f"compile check: it fits, {out['per_device_bytes'] / gib:.2f} GiB per device of "
          f"{out['hbm_bytes_per_device'] / gib:.0f} GiB HBM (compiled in {out['compile_s']} s)", file=sys.stderr)
    return out


def check_name_free(s: Slice) -> None:
    """A second run with a name in use must not take over (and at its end delete) the first run's slice."""
    argv = gcloud.describe_state(s)
    echo(argv)
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode == 0:   # it exists; NOT_FOUND (or no login: create fails then) exits non-zero
        kind = "queued resource" if s.queued else "slice"
        manage = f"--name {s.name} --zone {s.zone} --project {s.project}" + (" --queued" if s.queued else "")
        raise UsageError(f"a {kind} named {s.name!r} already exists in {s.zone} (state {result.stdout.strip() or '?'}); "
                         "another run may be using it, and this launcher deletes only what it made. Pick another "
                         f"--name, or delete it first: python -m launch.tpu delete {manage}")


# The plan -----------------------------------------------------------------------------------------

def wheel_name() -> str:
    with open(os.path.join(ROOT, "setup.py")) as f:
        version = re.search(r'version="([^"]+)"', f.read()).group(1)
    return f"t5like-{version}-py3-none-any.whl"


def wheel_command(dist: str) -> list[str]:
    return [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", dist, ROOT]


def worker_command(experiment: str, overrides: list[str], python: str = "python") -> list[str]:
    """What every worker runs; on a TPU VM the trainer finds the other hosts itself."""
    return [python, "-m", experiment, *overrides]


# A dry run cannot know slice 0 worker 0's IP (the slices do not exist yet): this stands in for it.
COORDINATOR_PLACEHOLDER = "SLICE0_WORKER0_IP"


def plan(s: Slice, wheel: str, command: list[str], log_dir: str, local_logs: str, keep: bool,
         coordinator: str = COORDINATOR_PLACEHOLDER) -> list[tuple[str, list[str]]]:
    """One attempt, in order, as (what, argv); the run loop runs the same commands. With K slices each
    per-node step is one line per node (NAME-0 ... NAME-{K-1})."""
    many = s.num_slices > 1
    node = (lambda n: f" (slice {n})") if many else (lambda n: "")
    nodes = [(n if many else None, i) for i, n in enumerate(s.nodes)]
    steps = [("create the slice" if not many else f"create {s.num_slices} slices (one queued resource)",
              gcloud.create(s)),
             ("repeat until READY" if not s.queued else "repeat until ACTIVE", gcloud.describe_state(s))]
    if many:
        steps.append(("slice 0 worker 0's internal IP: MEGASCALE_COORDINATOR_ADDRESS", gcloud.coordinator_ip(s)))
    steps += [(f"ship the code{node(i)}", gcloud.scp_to_all(s, wheel, "~/", node=n)) for n, i in nodes]
    steps += [(f"venv + pip install on every worker{node(i)}",
               gcloud.ssh(s, gcloud.setup_script(os.path.basename(wheel)), node=n)) for n, i in nodes]
    steps += [(f"kill leftovers holding the TPU, remove the libtpu lockfile{node(i)}",
               gcloud.ssh(s, gcloud.CLEANUP_SCRIPT, node=n)) for n, i in nodes]
    steps.append(("stream worker 0's log (in the background)", gcloud.ssh(s, gcloud.tail_script(), worker="0",
                                                                        node=s.nodes[0] if many else None)))
    steps += [(f"run on every worker{node(i)}" + (", all slices at once" if many else ""), argv)
              for i, argv in enumerate(gcloud.run_all(s, command, log_dir, coordinator))]
    if log_dir.startswith("gs://"):
        steps.append(("every worker's log, here", gcloud.copy(log_dir, os.path.join(local_logs, "attempt-0"))))
    if not keep:
        steps.append(("delete the slice" if not many else "delete the queued resource (every slice)",
                      gcloud.delete(s)))
    return steps


def job_goodput(workdir: str) -> None:
    """The whole job's time account so far, from the workdir's records (t5like/goodput.py): every attempt, the
    steps redone after each restart, and the downtime between attempts."""
    from t5like.goodput import account, read_attempts, report
    try:
        print(f"job {report(account(read_attempts(workdir)))}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001  a report: an unreadable workdir must not stop the restart loop
        print(f"goodput: cannot read {workdir}/goodput ({type(e).__name__}: {e})", file=sys.stderr)


def run_loop(pod, command: list[str], max_restarts: int, keep: bool, workdir: str = "") -> int:
    attempt, fresh = 0, True
    try:
        while True:
            pod.up(fresh)
            codes = pod.run(command, attempt)
            if workdir:
                job_goodput(workdir)
            if all(c == 0 for c in codes):
                print(f"run finished (attempt {attempt})", file=sys.stderr)
                return 0
            healthy = pod.healthy()
            if healthy and all(c == PREEMPTED_EXIT_CODE for c in codes):
                print("the run was stopped (SIGTERM, e.g. `launch.tpu stop`) and saved its checkpoint; rerun the "
                      "same command to resume.", file=sys.stderr)
                return PREEMPTED_EXIT_CODE
            what = "a worker failed" if healthy else "the slice was preempted or lost"
            if attempt >= max_restarts:
                print(f"error: {what} (exit codes {codes}) and --max-restarts={max_restarts} are used up; "
                      "rerun the same command to resume from the workdir's checkpoint.", file=sys.stderr)
                return 1
            attempt += 1
            fresh = not healthy
            print(f"{what} (exit codes {codes}); restart {attempt}/{max_restarts}: "
                  f"{'re-creating the slice' if fresh else 'rerunning'}; the run resumes from its checkpoint.",
                  file=sys.stderr)
    except KeyboardInterrupt:
        print(f"interrupted; {'deleting the slice' if not keep else 'the slice is kept'}. The workdir keeps the "
              "last checkpoint: rerun the same command to resume.", file=sys.stderr)
        return 130
    finally:
        if not keep:
            pod.down()


# Entry points -------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    tpu = check_slice(args)
    local_logs = args.logs or os.path.join("tpu_logs", args.name)
    log_dir = args.workdir.rstrip("/") + "/logs"
    if args.local_pod is not None:
        if args.dry_run:
            raise UsageError("--dry-run prints a Cloud TPU plan; it does not combine with --local-pod.")
        overrides = check_config(args, tpu)
        if tpu is not None and not args.skip_compile_check:
            compile_check(args.experiment, overrides, tpu)
        pod = LocalPod(args.local_pod, args.local_devices, local_logs, log_dir)
        return run_loop(pod, worker_command(args.experiment, overrides, sys.executable), args.max_restarts, args.keep,
                        args.workdir)
    zone = args.zone or gcloud_default("--zone", "compute/zone")
    project = args.project or gcloud_default("--project", "project", PROJECT_PLACEHOLDER if args.dry_run else None)
    if args.any_zone:
        check_zone_form(zone)
    elif note := check_zone(tpu, zone):
        print(f"note: {note}", file=sys.stderr)
    overrides = check_config(args, tpu)
    if not args.skip_compile_check:
        compile_check(args.experiment, overrides, tpu, args.num_slices)
    capacity = "spot" if args.spot else "reserved" if args.reserved else "on-demand"
    queued = queued_for(args)
    s = Slice(args.name, zone, project, tpu, args.runtime_version or tpu.generation.runtime_version, capacity,
              queued, args.num_slices)
    dist = os.path.join(local_logs, "dist")
    wheel = os.path.join(dist, wheel_name())
    command = worker_command(args.experiment, overrides)
    if args.dry_run:
        print(f"# {tpu.describe()}" + (f"; x{s.num_slices} slices" if s.num_slices > 1 else ""), file=sys.stderr)
        print("# is the name free? (it must not be found: a slice of that name is refused, never reused or deleted)",
              file=sys.stderr)
        print(shlex.join(gcloud.describe_state(s)))
        print(shlex.join(wheel_command(dist)))
        for what, argv in plan(s, wheel, command, log_dir, local_logs, args.keep):
            print(f"# {what}", file=sys.stderr, flush=True)
            print(shlex.join(argv), flush=True)
        return 0
    check_name_free(s)
    call(wheel_command(dist))
    if not glob.glob(wheel):
        raise RuntimeError(f"the wheel build did not produce {wheel}")
    timeout = args.ready_timeout or (86400.0 if queued else 1800.0)
    pod = CloudPod(s, wheel, log_dir, local_logs, timeout)
    return run_loop(pod, command, args.max_restarts, args.keep, args.workdir)


def queued_for(args) -> bool:
    """K > 1 slices are one queued resource (gcloud makes multislice only that way): --num-slices implies
    --queued, and says so."""
    if args.num_slices > 1 and not args.queued:
        print(f"note: --num-slices={args.num_slices} makes one queued resource of {args.num_slices} nodes "
              f"({args.name}-0 ... {args.name}-{args.num_slices - 1}); --queued is implied.", file=sys.stderr)
    return args.queued or args.num_slices > 1


def cmd_manage(args) -> int:
    zone = args.zone or gcloud_default("--zone", "compute/zone")
    check_zone_form(zone)
    if args.num_slices < 1:
        raise UsageError(f"--num-slices={args.num_slices} must be 1 or more (e.g. --num-slices 2).")
    s = Slice(args.name, zone, args.project or gcloud_default(
        "--project", "project", PROJECT_PLACEHOLDER if args.dry_run else None), queued=queued_for(args),
        num_slices=args.num_slices)
    many = s.num_slices > 1
    argvs = {"status": lambda: [gcloud.describe_state(s)],
             "logs": lambda: [gcloud.ssh(s, gcloud.logs_script(), node=n if many else None) for n in s.nodes],
             "stop": lambda: [gcloud.ssh(s, gcloud.stop_script(), node=n if many else None) for n in s.nodes],
             "delete": lambda: [gcloud.delete(s)]}[args.action]()
    if args.dry_run:
        for argv in argvs:
            print(shlex.join(argv))
        return 0
    return max(call(argv, check=False).returncode for argv in argvs)


OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # key=value overrides may come before or after the flags, as on the experiment's own command line.
    overrides = [a for a in argv if OVERRIDE.match(a)]
    args = parser().parse_args([a for a in argv if not OVERRIDE.match(a)])
    if args.action == "run":
        args.overrides = args.overrides + overrides
    try:
        return cmd_run(args) if args.action == "run" else cmd_manage(args)
    except ValueError as e:  # UsageError and the config's own ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a command failed (after the checks)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
