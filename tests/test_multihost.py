"""Multi-host training with real processes joined by jax.distributed (gloo on CPU), and gs:// workdirs on a
real Cloud Storage API server (tests/gcs.py). Each "host" is a process with its own simulated devices."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from gcs import free_port
from t5like.metrics import read_metrics
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
# The two-slice reference runs longer, so the SIGTERM test can resume against it (every run here has a constant
# learning rate, so a 12-step run's losses are the first 12 of a 20-step run's).
LONG_STEPS = 20
EXPERIMENT = {"decoder": "gpt2_small", "encoder_decoder": "t5_base"}
# The two-process decoder runs are two slices (processes play slices on CPU): data parallel over DCN, FSDP inside.
TWO_SLICES = ("mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=-1")


@pytest.fixture(scope="module")
def tok(tmp_path_factory, tok_path):
    return {"path": tok_path, "root": tmp_path_factory.mktemp("multihost")}


def run_args(workdir, *extra):
    # A given peak: no matmul timed at each start.
    return ["size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=2",
            "train.eval_every=0", "train.progress=false", f"train.steps={STEPS}", "checkpoint.every=3",
            "optim.schedule=constant", "train.peak_flops=1e11", f"workdir={workdir}", *extra]


def start(tok, family, workdir, *, processes=1, devices=4, env=None, extra=(), tokenizer=True):
    """`processes` copies of the experiment, wired as hosts of one run; returns the Popen objects."""
    port = free_port()
    procs = []
    for i in range(processes):
        flags = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        cmd = [sys.executable, "-m", f"experiments.{EXPERIMENT[family]}",
               *run_args(workdir, *extra, *([f"data.tokenizer_path={tok['path']}"] if tokenizer else [])),
               *(flags if processes > 1 else [])]
        e = dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONUNBUFFERED="1",
                 **(env or {}))
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs, expect=0, timeout=600) -> list[str]:
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append(out)
    for p, out in zip(procs, outs):
        assert p.returncode == expect, f"exit {p.returncode}:\n{out[-3000:]}"
    return outs


def losses(workdir) -> dict[int, float]:
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered metric rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(tok):
    """Uninterrupted decoder runs: one process with 4 devices (FSDP over 4), 12 steps, and 2 processes with 2
    devices each as 2 slices (data over DCN, FSDP over each slice's 2), 20 steps."""
    one, two = tok["root"] / "one", tok["root"] / "two"
    finish(start(tok, "decoder", one) + start(tok, "decoder", two, processes=2, devices=2,
                                              extra=(*TWO_SLICES, f"train.steps={LONG_STEPS}")))
    return {"one": losses(one), "two": losses(two), "two_dir": two}


def test_two_hosts_match_one_host_decoder(reference):
    one, two = reference["one"], reference["two"]
    assert sorted(two) == list(range(1, LONG_STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    summary = json.loads((reference["two_dir"] / "summary.json").read_text())
    assert summary["step"] == LONG_STEPS and summary["final_eval_loss"] > 0


def test_two_hosts_match_one_host_encoder_decoder(tok):
    one, two = tok["root"] / "ed_one", tok["root"] / "ed_two"
    procs = start(tok, "encoder_decoder", one) + start(tok, "encoder_decoder", two, processes=2, devices=2)
    finish(procs)
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step


def test_sigterm_to_one_host_saves_all_at_one_step_and_resumes_exactly(tok, reference):
    # The two-slice reference's run, 20 steps so the notice always lands before the end; no periodic checkpoint.
    extra = [*TWO_SLICES, "checkpoint.every=1000", f"train.steps={LONG_STEPS}"]
    workdir = tok["root"] / "preempt"
    procs = start(tok, "decoder", workdir, processes=2, devices=2, extra=extra)
    deadline = time.time() + 300
    while max(losses(workdir), default=0) < 4:
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # only host 1 is told
    outs = finish(procs, expect=143)
    saved = [int(o.split("SIGTERM: saved step ")[1].split()[0]) for o in outs]
    assert saved[0] == saved[1] and 4 <= saved[0] < LONG_STEPS, outs
    assert os.listdir(workdir / "checkpoints") == [str(saved[0])]
    finish(start(tok, "decoder", workdir, processes=2, devices=2, extra=extra))
    assert losses(workdir) == reference["two"]  # bitwise, every step once


@pytest.fixture(scope="module")
def gs_runs(tok, gcs_server):
    """Two runs on gs:// workdirs, side by side (separate prefixes, separate processes): two hosts SIGKILLed after
    checkpoint 3 or 6, and one host, training its own tokenizer into gs://, SIGKILLed after checkpoint 3. Each
    is then rerun to the end."""
    cwd_before = set(os.listdir(ROOT))
    kill_after = random.Random(0).choice([3, 6])
    runs = {"two": dict(prefix="mh_kill", processes=2, devices=2, tokenizer=True, ckpt=kill_after),
            "one": dict(prefix="sh_run", processes=1, devices=4, tokenizer=False, ckpt=3)}

    def launch(run):
        return start(tok, "decoder", f"gs://{gcs_server.bucket}/{run['prefix']}", processes=run["processes"],
                     devices=run["devices"], env=gcs_server.env, tokenizer=run["tokenizer"],
                     extra=TWO_SLICES if run["processes"] == 2 else ())

    def committed(run):  # the step's own marker, written after its items' markers (state/, config/)
        return f"{run['prefix']}/checkpoints/{run['ckpt']}/commit_success.txt" in gcs_server.list_objects(run["prefix"])

    for run in runs.values():
        run["procs"] = launch(run)
    pending = dict(runs)
    deadline = time.time() + 300
    while pending:  # both watched at once: each is killed as soon as its checkpoint is committed
        assert time.time() < deadline, f"no checkpoint appeared: {sorted(pending)}"
        for name, run in list(pending.items()):
            if committed(run):
                for p in run["procs"]:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                del pending[name]
            else:
                for p in run["procs"]:
                    assert p.poll() is None, p.stdout.read()[-3000:]
        time.sleep(0.05)
    reruns = {name: launch(run) for name, run in runs.items()}
    for name, procs in reruns.items():
        runs[name]["outs"] = finish(procs)
    runs["cwd_before"] = cwd_before
    return runs


def test_sigkill_on_gs_workdir_two_hosts_resumes_bitwise(tok, reference, gcs_server, gs_runs):
    """Two slices (TWO_SLICES) killed after a checkpoint resume to the uninterrupted run's losses, bitwise."""
    outs = gs_runs["two"]["outs"]
    assert "resumed from" in outs[0]
    got = losses(f"gs://{gcs_server.bucket}/mh_kill")
    assert got == {step: reference["two"][step] for step in range(1, STEPS + 1)}


def test_gs_workdir_single_host_trains_resumes_and_generates(tok, gcs_server, gs_runs):
    prefix = "sh_run"
    workdir = f"gs://{gcs_server.bucket}/{prefix}"
    out = gs_runs["one"]["outs"][0]
    assert "resumed from" in out
    got = losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1))
    objects = gcs_server.list_objects(prefix)
    for name in ("config.json", "summary.json", "metrics.jsonl", "tokenizer/spm.model"):
        assert f"{prefix}/{name}" in objects, name
    assert any(n.startswith(f"{prefix}/tensorboard/") for n in objects)
    assert set(os.listdir(ROOT)) == gs_runs["cwd_before"] and not os.path.exists(prefix)  # nothing landed locally
    gen = subprocess.run([sys.executable, "-m", "t5like.generate", "--workdir", workdir, "--prompt", "def main(",
                          "--max-new-tokens", "4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **gcs_server.env))
    assert gen.returncode == 0 and "=== prompt 0 ===" in gen.stdout, gen.stderr[-2000:]


def test_bad_multihost_input_is_a_clear_error(tok, gcs_server):
    def run(*flags, workdir, env=None):
        cmd = [sys.executable, "-m", "experiments.gpt2_small", *run_args(workdir), *flags]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, XLA_FLAGS=xla_flags(1),
                                         **(env or {})))

    def result(proc, timeout=120):
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err

    # The three checks are independent processes, started together; the first mostly waits on its timeout.
    t = time.time()
    timeout = run("--coordinator", f"localhost:{free_port()}", "--num-processes", "2", "--process-id", "1",
                  "--coordinator-timeout", "3", workdir=tok["root"] / "bad_timeout")
    bad_id = run("--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2",
                 workdir=tok["root"] / "bad_id")
    no_bucket = run(workdir="gs://no-such-bucket/run", env=gcs_server.env)
    code, err = result(timeout)
    assert code == 2 and "did not accept a connection within 3 s" in err and "Traceback" not in err, err
    assert time.time() - t < 60
    code, err = result(bad_id)
    assert code == 2 and "--process-id=2 must be in [0, --num-processes=2)" in err, err
    code, err = result(no_bucket)
    assert code == 2 and "bucket gs://no-such-bucket does not exist" in err, err


SLOW_HOST = '''
import contextlib, sys, time
import jax
from experiments.gpt2_small import config
from t5like import distributed, train
from t5like.plugins import Plugin

class SlowHost(Plugin):
    """Host 1 reaches its first step 35 s after host 0, as a host that compiles slower does."""
    def phase(self, name, step):
        if name == "compile" and jax.process_index() == 1:
            time.sleep(35)
        return contextlib.nullcontext()

coordinator, process_id, *keys = sys.argv[1:]
distributed.initialize(distributed.Cluster(coordinator, 2, int(process_id)).validate())
train.train(train.parse_args(config, keys), [SlowHost()])
'''


def test_a_host_that_compiles_35_s_later_does_not_fail_the_run(tok, tmp_path):
    """On CPU the first collective's gloo rendezvous gives up after 30 s; hosts now meet in a barrier once their
    steps are compiled. Before: host 0 failed its first step ("Gloo context initialization failed")."""
    script = tmp_path / "slow_host.py"
    script.write_text(SLOW_HOST)
    port = free_port()
    keys = run_args(tmp_path / "w", f"data.tokenizer_path={tok['path']}", "mesh.data=1", "mesh.fsdp=-1")
    keys = [k for k in keys if not k.startswith("train.steps=")] + ["train.steps=2"]
    procs = [subprocess.Popen([sys.executable, str(script), f"localhost:{port}", str(i), *keys], cwd=ROOT,
                              env=dict(os.environ, XLA_FLAGS=xla_flags(2), PYTHONUNBUFFERED="1",
                                       PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        finish(procs, timeout=180)
    finally:
        for p in procs:
            p.kill()
    assert sorted(losses(tmp_path / "w")) == [1, 2]
