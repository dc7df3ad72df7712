"""The Ray backend and the device-aware local backend, with real processes and a real local Ray cluster.

The trials are test_sweep.py's fake experiment (sleeps instead of training, checkpoints every step, obeys
SIGTERM with exit 143), so the faults are cheap to provoke. One Ray cluster (2 CPUs) serves the module;
each test runs `python -m launch.sweep ... --backend ray --ray-address GCS` as its own driver process.
"""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest

from test_sweep import FAKE, ROOT, check_each_trial_once, events, finish, mid_way, rows, wait_until
from xla import default_optimization, xla_flags

ray = pytest.importorskip("ray")


SLICE = {"TPU_NAME": "t5like-test-slice", "TPU_ACCELERATOR_TYPE": "v4-8"}


@pytest.fixture(scope="module")
def cluster():
    """2 CPUs, on a node Ray also takes for a one-host v4-8 slice: the env KubeRay sets on a TPU pod (its
    processes inherit it), and the resources Ray gives a slice's worker 0 (it has no chips to find itself)."""
    saved = {k: os.environ.get(k) for k in SLICE}
    os.environ.update(SLICE)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 resources={"TPU-v4-8-head": 1, SLICE["TPU_NAME"]: 1})
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def sweep(tmp_path):
    """Returns launch(workdir, *args, **env): a `launch.sweep` driver on the fake experiment."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fake_exp.py").write_text(FAKE)
    (mods / "devices_exp.py").write_text(DEVICES)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mods), ROOT]))

    def launch(workdir, *args, module="fake_exp", **env_extra):
        cmd = [sys.executable, "-m", "launch.sweep", module, "--workdir", str(workdir), "--no-fit", *args]
        return subprocess.Popen(cmd, cwd=ROOT, env=dict(env, **env_extra), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return launch


def ray_args(address, *more):
    return ["--backend", "ray", "--ray-address", address, *more]


def comparable(workdir):
    """results.csv without the columns that depend on when and how fast a trial ran."""
    return sorted(({k: v for k, v in r.items() if k not in ("wall_time_s", "finished_at")} for r in rows(workdir)),
                  key=lambda r: r["trial_id"])


def trial_pid(workdir, tid):
    """The pid of the process training trial `tid` (found by its workdir on its command line)."""
    needle = f"workdir={os.path.join(str(workdir), 'trials', tid)}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            pass
    return None


def parent_pid(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("PPid:")).split()[1])


def test_ray_gives_the_local_backends_rows_and_records_a_raising_trial(sweep, cluster, tmp_path):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    # The two sweeps are independent (own workdirs, sleeping trials): run them side by side.
    local_proc = sweep(local, "--parallel", "2", FAKE_TRIALS="4", FAKE_FAIL="t2")
    ray_proc = sweep(on_ray, *ray_args(cluster), "--env", "FAKE_STEP_S=0.05", FAKE_TRIALS="4", FAKE_FAIL="t2")
    code, out = finish(local_proc)
    assert code == 1, out
    code, out = finish(ray_proc, timeout=300)
    assert code == 1, out
    assert "ray backend, parallel 2" in out  # what fits on the 2-CPU cluster
    got = comparable(on_ray)
    assert [r["status"] for r in got] == ["ok", "ok", "failed", "ok"]
    failed = got[2]
    assert "boom: this trial was told to fail" in failed["error"] and "exit 1" in failed["error"]
    for r in got:
        if r["status"] == "ok":
            assert float(r["final_eval_loss"]) > 0 and float(r["final_train_loss"]) > float(r["final_eval_loss"])
    # Same rows, losses included, as the local backend (the errors differ only in the log path they quote).
    want = comparable(local)
    for a, b in zip(got, want):
        a.pop("error"), b.pop("error")
    assert got == want


def test_ray_worker_killed_mid_trial_is_retried_and_resumes(sweep, cluster, tmp_path):
    wd = tmp_path / "sweep"
    proc = sweep(wd, *ray_args(cluster, "--parallel", "1"), "--env", "FAKE_STEP_S=0.3", FAKE_TRIALS="1")
    state = wd / "trials" / "t0" / "state.json"
    wait_until(lambda: state.exists() and json.loads(state.read_text())["step"] >= 2, proc, timeout=120)
    worker = parent_pid(trial_pid(wd, "t0"))  # the Ray worker running the trial's actor
    assert worker != proc.pid
    os.kill(worker, signal.SIGKILL)
    code, out = finish(proc, timeout=300)
    assert code == 0, out
    assert [(r["trial_id"], r["status"]) for r in rows(wd)] == [("t0", "ok")]
    ev = events(wd, "t0")
    starts = [e for e in ev if e.startswith("start")]
    assert len(starts) == 2 and starts[0] == "start 0" and int(starts[1].split()[1]) >= 2, ev  # resumed
    assert any(e.startswith("preempted") for e in ev), ev  # the orphan checkpointed on its parent's death
    check_each_trial_once(wd, 1)


def test_ray_driver_sigkill_then_rerun_and_ctrl_c(sweep, cluster, tmp_path):
    wd = tmp_path / "sweep"
    args = ray_args(cluster, "--parallel", "2")
    proc = sweep(wd, *args, "--env", "FAKE_STEP_S=0.15")
    wait_until(lambda: (wd / "results.csv").exists() and len(rows(wd)) >= 2 and mid_way(wd), proc, timeout=120)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ok_before = {r["trial_id"] for r in rows(wd) if r["status"] == "ok"}
    assert 2 <= len(ok_before) < 6

    # Rerun, and Ctrl-C it once a trial is mid-way: the running trials checkpoint and stop, no row for them.
    proc = sweep(wd, *args, "--env", "FAKE_STEP_S=0.3")
    starts = lambda: [sum(e.startswith("start") for e in events(wd, f"t{i}")) for i in range(6)]  # noqa: E731
    before = starts()
    wait_until(lambda: starts() != before and mid_way(wd), proc, timeout=120)
    proc.send_signal(signal.SIGINT)
    code, out = finish(proc, timeout=300)
    assert code == 130, out
    assert all(r["status"] == "ok" for r in rows(wd)), rows(wd)
    assert any(e.startswith("preempted") for i in range(6) for e in events(wd, f"t{i}"))

    code, out = finish(sweep(wd, *args), timeout=300)
    assert code == 0, out
    check_each_trial_once(wd, 6)
    for tid in ok_before:  # finished trials were not started again
        assert sum(e.startswith("start") for e in events(wd, tid)) == 1, events(wd, tid)


def test_whole_slice_trials_take_the_slice_head_and_run_on_its_hosts(sweep, cluster, tmp_path):
    wd = tmp_path / "sweep"
    code, out = finish(sweep(wd, *ray_args(cluster, "--trial-cpus", "0", "--trial-tpu", "v4-8"), FAKE_TRIALS="2"),
                       timeout=300)
    assert code == 0, out
    assert "ray backend, parallel 1" in out  # one slice: one trial at a time
    check_each_trial_once(wd, 2)


def test_bad_backend_address_and_resources_fail_fast(sweep, cluster, tmp_path):
    code, out = finish(sweep(tmp_path / "a", "--backend", "slurm"))
    assert code == 2 and "--backend 'slurm' is not a backend; use one of local, ray" in out, out
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Four independent drivers (own workdirs), started together: the 5 s wait for the absent head and the
    # local cluster's start overlap instead of adding up.
    procs = {
        "b": sweep(tmp_path / "b", *ray_args(f"127.0.0.1:{port}", "--ray-timeout", "5")),
        "c": sweep(tmp_path / "c", *ray_args(cluster, "--trial-cpus", "64")),
        "d": sweep(tmp_path / "d", *ray_args(cluster, "--trial-tpu", "v5p-32")),
        # No address: the driver starts a local cluster of this machine's cores, and checks against it.
        "e": sweep(tmp_path / "e", "--backend", "ray", "--trial-cpus", "64"),
    }
    code, out = finish(procs["b"], timeout=120)
    assert code == 2 and f"127.0.0.1:{port}: no Ray head answered within 5 s" in out, out
    code, out = finish(procs["c"], timeout=120)
    assert code == 2 and "no node of the Ray cluster" in out and "'CPU': 64.0" in out, out
    code, out = finish(procs["d"], timeout=120)
    assert code == 2 and "TPU-v5p-32-head" in out, out
    code, out = finish(procs["e"], timeout=180)
    assert code == 2 and "no node of the Ray cluster (local, 1 node(s))" in out, out
    for d in "bcde":
        assert not (tmp_path / d / "results.csv").exists()  # nothing ran


DEVICES = '''
"""Two trials that write down the devices and cores they saw."""
import json, os, sys
from t5like.scaling.design import Trial

def sweep():
    return [Trial(f"d{i}", (f"x={i}",)) for i in range(2)]

if __name__ == "__main__":
    import jax
    wd = dict(a.split("=", 1) for a in sys.argv[1:])["workdir"]
    with open(os.path.join(wd, "devices.json"), "w") as f:
        json.dump({"jax": [d.id for d in jax.devices()], "host_devices": os.environ["T5LIKE_DEVICES"].split(","),
                   "cores": sorted(os.sched_getaffinity(0)), "omp": os.environ["OMP_NUM_THREADS"]}, f)
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump({"step": 1, "final_loss": 1.0, "final_eval_loss": 1.0}, f)
'''


def test_local_parallel_2_splits_8_devices_and_the_cores(sweep, tmp_path):
    wd = tmp_path / "sweep"
    eight = xla_flags(8)
    code, out = finish(sweep(wd, "--parallel", "2", module="devices_exp", XLA_FLAGS=eight), timeout=300)
    assert code == 0, out
    assert "8 CPU device(s)" in out and "each of 2 trial slots gets 4 simulated CPU device(s)" in out
    seen = [json.loads((wd / "trials" / f"d{i}" / "devices.json").read_text()) for i in range(2)]
    assert [len(s["jax"]) for s in seen] == [4, 4]  # each trial's JAX sees its share
    assert sorted(seen[0]["host_devices"] + seen[1]["host_devices"]) == [str(i) for i in range(8)]  # disjoint
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= 2:  # its own cores too
        assert not set(seen[0]["cores"]) & set(seen[1]["cores"])
        assert sorted(seen[0]["cores"] + seen[1]["cores"]) == cores
        assert [int(s["omp"]) for s in seen] == [len(s["cores"]) for s in seen]
    assert "trial devices: 0,1,2,3" in (wd / "trials" / "d0" / "train.log").read_text() or \
        "trial devices: 4,5,6,7" in (wd / "trials" / "d0" / "train.log").read_text()

    code, out = finish(sweep(tmp_path / "odd", "--parallel", "3", module="devices_exp", XLA_FLAGS=eight))
    assert code == 2 and "--parallel 3 does not divide this host's 8 CPU devices" in out and "[1, 2, 4, 8]" in out, out
    assert not (tmp_path / "odd" / "results.csv").exists()


REAL = '''
"""Two real tiny training trials (a grid over the seed), a few steps each. One learning rate: the trials are one
program, so the session's compilation cache compiles it once for both sweeps."""
import dataclasses
from t5like import train
from t5like.scaling.design import grid
import experiments.scaling_tiny as tiny

def config():
    c = tiny.config()
    return dataclasses.replace(
        c, model=dataclasses.replace(c.model, d_model=32, num_heads=4, d_ff=64, num_layers=1, max_len=32),
        data=dataclasses.replace(c.data, max_files=30, seq_len=32, tokenizer_train_chars=100_000),
        train=dataclasses.replace(c.train, steps=6, batch_size=4, eval_steps=2, log_every=1, progress=False))

def sweep():
    return grid({"optim.learning_rate": [3e-3], "seed": [0, 1]}, config=config())

def prepare(workdir):
    from t5like.data import get_tokenizer
    get_tokenizer(config().data, workdir, config().model.vocab_size)
    return [f"data.tokenizer_path={workdir}/tokenizer/spm.model"]

if __name__ == "__main__":
    train.main(config)
'''


@pytest.mark.slow
def test_real_tiny_sweep_on_ray_matches_local(sweep, cluster, tmp_path):
    """Real training: the Ray backend's table is the local backend's, losses bitwise included."""
    (tmp_path / "mods" / "real_exp.py").write_text(REAL)
    one = xla_flags(1)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    code, out = finish(sweep(local, "--parallel", "2", module="real_exp", XLA_FLAGS=one), timeout=900)
    assert code == 0, out
    code, out = finish(sweep(on_ray, *ray_args(cluster, "--parallel", "2"), "--env", f"XLA_FLAGS={one}",
                             module="real_exp", XLA_FLAGS=one), timeout=900)
    assert code == 0, out
    got, want = comparable(on_ray), comparable(local)
    assert len(got) == 2 and all(r["status"] == "ok" and 0 < float(r["final_eval_loss"]) < 10 for r in got)
    assert len({r["final_eval_loss"] for r in got}) == 2  # the trials differ, so the comparison means something
    assert got == want


GCS_EXP = '''
"""Three trials that write their summary through etils.epath (their workdir is gs://); t2 raises."""
import json, sys
from etils import epath
from t5like.scaling.design import Trial

def sweep():
    return [Trial(f"t{i}", (f"fake.i={i}",)) for i in range(3)]

if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    i = int(args["fake.i"])
    print(f"trial {i} training", flush=True)
    if i == 2:
        raise RuntimeError("boom on gs")
    epath.Path(args["workdir"], "summary.json").write_text(json.dumps(
        {"step": 3, "final_loss": 2.0 + i, "final_eval_loss": 1.0 + i}))
'''


def read_gcs(server, name):
    """An object's bytes as the GCS server holds them (its JSON API, not the client under test)."""
    url = f"{server.url}/storage/v1/b/{server.bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media"
    return urllib.request.urlopen(url, timeout=30).read().decode()


def test_ray_sweep_with_its_table_and_trials_on_gcs(sweep, cluster, gcs_server, tmp_path):
    (tmp_path / "mods" / "gcs_exp.py").write_text(GCS_EXP)
    wd = f"gs://{gcs_server.bucket}/ray-sweep"
    env_args = [a for k, v in gcs_server.env.items() for a in ("--env", f"{k}={v}")]
    code, out = finish(sweep(wd, *ray_args(cluster), *env_args, module="gcs_exp", **gcs_server.env), timeout=300)
    assert code == 1, out
    table = read_gcs(gcs_server, "ray-sweep/results.csv")
    got = {r["trial_id"]: r for r in csv.DictReader(table.splitlines())}
    assert [got[t]["status"] for t in ("t0", "t1", "t2")] == ["ok", "ok", "failed"]
    assert [float(got[t]["final_eval_loss"]) for t in ("t0", "t1")] == [1.0, 2.0]
    assert "boom on gs" in got["t2"]["error"]
    assert "trial 2 training" in read_gcs(gcs_server, "ray-sweep/trials/t2/train.log")
    # A rerun skips the ok trials and retries only the failed one.
    code, out = finish(sweep(wd, *ray_args(cluster), *env_args, module="gcs_exp", **gcs_server.env), timeout=300)
    assert code == 1, out
    now = read_gcs(gcs_server, "ray-sweep/results.csv")
    rows_now = list(csv.DictReader(now.splitlines()))
    assert now.startswith(table)  # appended, nothing lost or changed
    assert len(rows_now) == 4 and rows_now[3]["trial_id"] == "t2" and rows_now[3]["status"] == "failed"


def test_fit_and_plots_of_a_gcs_sweep_land_next_to_its_table(gcs_server, tmp_path, monkeypatch):
    """The fit of a gs:// sweep: fit.json and plots/ written next to its table (earlier designs' rows left out)."""
    from launch.plan import load_sweep
    from launch.sweep import fit_and_plot
    from launch.table import OK, ResultsTable
    from launch.trial import row
    from t5like.scaling.data import ChinchillaLaw
    (tmp_path / "fake_exp.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_TRIALS", "12")
    # fit_and_plot's `python -m t5like.scaling` runs inherit these: their time is the fit's iterations, not
    # compiling, so XLA's default optimization (tests/xla.py).
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))
    for name, value in default_optimization().items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("fake_exp", None)
    plan = load_sweep("fake_exp")
    wd = f"gs://{gcs_server.bucket}/fit-sweep"
    table = ResultsTable(f"{wd}/results.csv")
    table.append({"trial_id": "old-design", "budget": 1e18, "status": "ok", "loss": 9.0, "final_eval_loss": 9.0,
                  "params": 1e8, "tokens": 1e9, "flops": 1e18})
    for t in plan.trials:
        loss = float(ChinchillaLaw().loss(t.params, t.tokens))
        table.append(row(t, OK, summary={"final_eval_loss": loss, "final_loss": loss, "step": 6}))
    assert fit_and_plot(wd, plan)
    assert "old-design" not in read_gcs(gcs_server, "fit-sweep/results_this_sweep.csv")
    fit = json.loads(read_gcs(gcs_server, "fit-sweep/fit.json"))
    assert fit["meta"]["n_points"] == 12 and 0.4 < fit["isoflop"]["a"] < 0.6  # the law's a = 0.45
    assert "fit-sweep/plots/isoflop.png" in gcs_server.list_objects("fit-sweep/plots/")
    sys.modules.pop("fake_exp", None)


def test_gpu_and_tpu_hosts_split_into_disjoint_visible_device_sets():
    """The env each slot gets on an 8-GPU and a 4-chip TPU host (the split itself; no such host here)."""
    from launch.devices import HostDevices, split
    gpus = split(HostDevices("gpu", tuple("01234567"), (0, 1)), 4, {})
    assert [s["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0,1", "2,3", "4,5", "6,7"]
    tpu = split(HostDevices("tpu", tuple("0123"), (0, 1)), 2, {})
    assert [s["TPU_VISIBLE_CHIPS"] for s in tpu] == ["0,1", "2,3"]
    assert all(s["TPU_CHIPS_PER_HOST_BOUNDS"] == "1,2,1" and s["TPU_HOST_BOUNDS"] == "1,1,1" for s in tpu)
    assert "TPU_VISIBLE_CHIPS" not in split(HostDevices("tpu", tuple("0123"), (0, 1)), 1, {})[0]  # whole host
    with pytest.raises(ValueError, match="--parallel 3 does not divide this host's 4 TPU devices"):
        split(HostDevices("tpu", tuple("0123"), (0, 1)), 3, {})


def test_device_count_is_set_and_every_other_xla_flag_kept():
    from launch.devices import HostDevices, split, with_device_count
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/d"
    assert with_device_count(flags, 2) == ("--xla_backend_optimization_level=0 --xla_dump_to=/tmp/d "
                                           "--xla_force_host_platform_device_count=2")
    assert with_device_count("", 4) == "--xla_force_host_platform_device_count=4"
    slots = split(HostDevices("cpu", tuple("01234567"), (0, 1)), 2, {"XLA_FLAGS": flags})
    assert all(s["XLA_FLAGS"] == with_device_count(flags, 4) for s in slots)


def test_ray_starts_a_fork_once_its_parent_saved_its_step(sweep, cluster, tmp_path):
    """tests/test_forks.py's fake stable run and forks, on Ray: the driver holds each fork back until its
    parent has saved the step (a fork started early fails its own assert), and fails a failed parent's fork."""
    from test_forks import FAKE_FORKS
    (tmp_path / "mods" / "fake_forks.py").write_text(FAKE_FORKS)
    code, out = finish(sweep(tmp_path / "w", *ray_args(cluster), module="fake_forks"), timeout=300)
    assert code == 1, out
    got = {r["trial_id"]: r for r in rows(tmp_path / "w")}
    assert {k: r["status"] for k, r in got.items()} == {"stable": "ok", "late": "ok", "early": "ok",
                                                        "broken": "failed", "orphan": "failed"}, out
    assert (got["early"]["parent"], got["early"]["fork_step"]) == ("stable", "2")
