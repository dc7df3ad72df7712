"""launch.tpu's run loop on a local pod: the exact per-worker command as N processes joined by
jax.distributed, with a gs:// workdir on the test GCS server (fake-gcs-server); and the preemption path
(one worker SIGKILLed -> the launcher restarts the pod -> the run resumes and ends with the same losses)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from t5like.data import DataConfig, get_tokenizer
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30
pytestmark = pytest.mark.slow   # three 2-process runs


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    data = DataConfig(source="stdlib", max_files=60, tokenizer_train_chars=300_000)
    get_tokenizer(data, str(root / "tok"), vocab_size=2048)
    return {"tokenizer": str(root / "tok" / "tokenizer" / "spm.model"), "root": root}


def overrides(shared):
    # train.progress=true: the workers' logs hold what a user's would, progress bar included.
    return ["size=tiny", "data.max_files=60", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=2",
            "train.eval_every=0", "train.progress=true", f"data.tokenizer_path={shared['tokenizer']}",
            f"train.steps={STEPS}", "checkpoint.every=10", "model.num_layers=1", "model.d_model=32",
            "model.d_ff=64", "model.num_heads=2", "train.peak_flops=1e11"]  # a given peak: no matmul timed at start


def start_pod(shared, gcs, name, max_restarts):
    logs = shared["root"] / name
    argv = [sys.executable, "-m", "launch.tpu", "run", "experiments.gpt2_small", *overrides(shared), "--name", name,
            "--workdir", f"gs://{gcs.bucket}/{name}", "--local-pod", "2", "--local-devices", "2",
            "--max-restarts", str(max_restarts), "--logs", str(logs)]
    # The local pod sets each worker's device count and keeps the rest of the environment: its workers compile
    # with the session's fast-compile setting too (tests/xla.py).
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), **gcs.env, "PYTHONPATH": ROOT, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, logs, env


def read_gs(env, path) -> str:
    """A file from the test bucket, read the way the trainer writes it (etils.epath; the gcs_server
    fixture points this process's clients at the server too)."""
    from etils import epath
    return epath.Path(path).read_text()


def losses(env, workdir) -> dict[int, float]:
    """step -> loss; after a resume the re-run steps appear twice, and the last row of a step wins."""
    out = {}
    for line in read_gs(env, f"{workdir}/metrics.jsonl").splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(scope="module")
def straight(shared, gcs_server):
    """The uninterrupted pod, started and not waited for: the killed pod's test runs beside it."""
    proc, logs, env = start_pod(shared, gcs_server, "tpu-pod-straight", max_restarts=0)
    run = {"proc": proc, "workdir": f"gs://{gcs_server.bucket}/tpu-pod-straight", "env": env, "logs": logs}
    # Its pipes are drained as it runs, so a full pipe never stalls it.
    reader = threading.Thread(target=lambda: run.update(zip(("out", "err"), proc.communicate())), daemon=True)
    reader.start()
    run["reader"] = reader
    yield run
    if proc.poll() is None:
        proc.kill()
        reader.join()


@pytest.fixture(scope="module")
def uninterrupted(straight):
    straight["reader"].join(timeout=900)
    assert straight["proc"].returncode == 0, straight.get("err", "")[-3000:]
    return straight


# First in the file, so the uninterrupted pod (started by `straight`) runs beside this one.
def test_a_killed_worker_restarts_the_pod_and_the_run_ends_with_the_same_losses(shared, gcs_server,
                                                                                 straight, request):
    proc, logs, env = start_pod(shared, gcs_server, "tpu-pod-killed", max_restarts=1)
    deadline = time.monotonic() + 600
    # Killed once the first checkpoint (10 of 30 steps) is committed: its own marker, written after its items'.
    # Before, the test waited for step 15 in the progress bar, and on a loaded machine the asynchronous save of
    # step 10 could still be under way: the pod then restarted from scratch, and nothing resumed.
    marker = "tpu-pod-killed/checkpoints/10/commit_success.txt"
    while marker not in gcs_server.list_objects("tpu-pod-killed/checkpoints/10/"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    os.kill(int((logs / "worker-1.pid").read_text()), signal.SIGKILL)   # the fake preemption
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert "a worker failed" in err and "restart 1/1" in err and "run finished (attempt 1)" in err
    assert "job goodput" in err and "over 2 attempt(s)" in err  # the restart loop's view of the whole job
    assert "resumed from" in (logs / "worker-0.log").read_text()
    uninterrupted = request.getfixturevalue("uninterrupted")
    killed = losses(env, f"gs://{gcs_server.bucket}/tpu-pod-killed")
    assert sorted(killed) == list(range(1, STEPS + 1))
    assert killed == losses(env, uninterrupted["workdir"])


def test_the_per_worker_command_runs_as_a_local_pod(uninterrupted):
    summary = json.loads(read_gs(uninterrupted["env"], f"{uninterrupted['workdir']}/summary.json"))
    assert summary["step"] == STEPS and summary["final_loss"] == summary["final_loss"]  # trained to the end, no NaN
    for i in range(2):   # each worker ran `python -m experiments.gpt2_small ... workdir=gs://...` + its flags
        log = (uninterrupted["logs"] / f"worker-{i}.log").read_text()
        assert f"--process-id {i}" in log and "--num-processes 2" in log and "workdir=gs://" in log
        assert log == read_gs(uninterrupted["env"], f"{uninterrupted['workdir']}/logs/worker-{i}.log")
    assert "run finished (attempt 0)" in uninterrupted["err"]
    assert len(losses(uninterrupted["env"], uninterrupted["workdir"])) == STEPS
