"""Resume and damaged checkpoints (issue 22): each test fails on the code before its fix.

The first part trains in-process (the gpt2_small experiment at size=tiny, a few steps); the second runs hosts
as real processes joined by jax.distributed, and a gs:// workdir on the test Cloud Storage server (tests/gcs.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from gcs import free_port
from t5like import train
from t5like.metrics import read_metrics
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory, tok_path):
    return {"path": tok_path, "root": tmp_path_factory.mktemp("resume")}


def run_args(tok, workdir, *extra):
    return ["size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1",
            "train.eval_every=0", "train.progress=false", "train.peak_flops=1e11", "optim.schedule=constant",
            f"data.tokenizer_path={tok['path']}", f"workdir={workdir}", *extra]


def config(tok, workdir, *extra):
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    return train.parse_args(module.config, run_args(tok, workdir, "mesh.data=1", "mesh.fsdp=-1", *extra))


def run_main_error(tok, workdir, *extra, capsys) -> str:
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    with pytest.raises(SystemExit) as e:
        train.main(module.config, run_args(tok, workdir, "mesh.data=1", "mesh.fsdp=-1", *extra))
    assert e.value.code == 2
    return capsys.readouterr().err


# In-process runs --------------------------------------------------------------------------------------

ADAFACTOR = ("optim.name=adafactor", "optim.weight_decay=0", "checkpoint.every=2")


@pytest.fixture(scope="module")
def finished(tok, tmp_path_factory):
    """A finished 4-step Adafactor run (no weight decay) with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train.train(config(tok, workdir, "train.steps=4", *ADAFACTOR))
    return workdir


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def truncate_state(step_dir):
    """Cut every array file of a step's state to half its size, as a torn copy would leave it."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs if "/d/" in d + "/"]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(max(os.path.getsize(f) // 2, 1))


def test_torn_last_metrics_line_is_dropped_on_resume(tok, finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 99.25')  # a kill mid-write: no closing brace, no newline
    capsys.readouterr()
    train.train(config(tok, workdir, "train.steps=6", *ADAFACTOR))
    err = capsys.readouterr().err
    assert "resumed from" in err and str(workdir / "metrics.jsonl") in err and "line" in err, err
    steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "99.25" not in (workdir / "metrics.jsonl").read_text()


def test_bad_metrics_line_before_the_last_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 7.9}\n{"step": 2, "lo\n{"step": 3, "loss": 7.5}\n')
    with pytest.raises(ValueError) as e:
        read_metrics(str(tmp_path))
    assert str(path) in str(e.value) and "line 2" in str(e.value)


def test_config_change_that_reshapes_optimizer_state_is_a_mismatch_not_damage(tok, finished, tmp_path, capsys,
                                                                            monkeypatch):
    workdir = copy_run(finished, tmp_path / "run")
    changed = ("train.steps=6", "optim.name=adafactor", "optim.weight_decay=0.01", "checkpoint.every=2")
    err = run_main_error(tok, workdir, *changed, capsys=capsys)
    assert "optim.weight_decay: 'off' -> 'on'" in err and "unreadable" not in err, err
    # Past the up-front check (as a key it does not cover would be), restore itself tells the tree apart from
    # damage: refused before reading an array, nothing set aside, nothing called damaged.
    monkeypatch.setattr(train, "check_workdir", lambda cfg: None)
    err = run_main_error(tok, workdir, *changed, capsys=capsys)
    assert "different opt_state tree" in err and "optim.weight_decay" in err, err
    assert "unreadable" not in err and "Delete" not in err, err
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "unreadable_checkpoints").exists()


def test_read_only_uses_fall_back_from_a_damaged_step_and_move_nothing(tok, finished, tmp_path, capsys):
    import jax
    from t5like import generate
    from t5like.checkpoint import Checkpointer, checkpoint_dir
    from t5like.inference import load_for_inference
    from t5like.config import CheckpointConfig
    from t5like.hf.__main__ import main as hf_main

    workdir = copy_run(finished, tmp_path / "run")
    truncate_state(workdir / "checkpoints" / "4")
    capsys.readouterr()
    _, model, _ = load_for_inference(str(workdir))
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "unreadable" in err and "using step 2" in err, err
    from flax import nnx
    got = nnx.state(model).to_pure_dict()
    ckpt = Checkpointer(checkpoint_dir(str(workdir)), CheckpointConfig(async_save=False))
    want = ckpt.restore_params(2, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                               got))
    ckpt.close()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)
    # The command lines and init_from go through the same loader.
    assert generate.main(["--workdir", str(workdir), "--prompt", "def", "--max-new-tokens", "2"]) == 0
    assert hf_main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").exists()
    result = train.train(config(tok, tmp_path / "tuned", "train.steps=1", f"checkpoint.init_from={workdir}"))
    assert result.step == 1
    err = capsys.readouterr().err
    assert err.count("using step 2") == 3, err
    # A read-only use of another run's workdir moves nothing.
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    assert not (workdir / "unreadable_checkpoints").exists()
    # With no step left that reads back: a ValueError (the command lines print `error: ...`), not a traceback.
    truncate_state(workdir / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"no checkpoint .* reads back \(steps \[4, 2\] are damaged\)"):
        generate.main(["--workdir", str(workdir), "--prompt", "def", "--max-new-tokens", "2"])


# Hosts as processes, and a gs:// workdir ------------------------------------------------------------------

MH_STEPS = 9
MH_ARGS = ("mesh.data=1", "mesh.fsdp=-1", "checkpoint.every=3")  # fsdp: each host writes its own shards


def start(tok, workdir, steps, *, processes=1, devices=4, env=None, extra=()):
    """`processes` copies of the experiment, wired as hosts of one run; returns the Popen objects."""
    port = free_port()
    procs = []
    for i in range(processes):
        flags = ["--coordinator", f"localhost:{port}", "--num-processes", str(processes), "--process-id", str(i)]
        cmd = [sys.executable, "-m", "experiments.gpt2_small",
               *run_args(tok, workdir, *MH_ARGS, f"train.steps={steps}", *extra), *(flags if processes > 1 else [])]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dict(os.environ, XLA_FLAGS=xla_flags(devices), PYTHONUNBUFFERED="1",
                                               **(env or {}))))
    return procs


def wait_all(runs: dict, timeout=300) -> dict:
    """{name: [(exit code, output) per host]}; a host still running at the deadline is killed (exit None), so a
    run whose hosts wait for each other forever fails its own test instead of stalling the others."""
    import time
    deadline = time.monotonic() + timeout
    results = {}
    for name, procs in runs.items():
        results[name] = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
                results[name].append((p.returncode, out))
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                out, _ = p.communicate()
                results[name].append((None, out))
    return results


def check_ok(result):
    for code, out in result:
        assert code == 0, f"exit {code}:\n{out[-3000:]}"
    return [out for _, out in result]


def losses(workdir) -> dict[int, float]:
    rows = [r for r in read_metrics(str(workdir)) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered metric rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def delete_object(gcs_server, name):
    import urllib.parse
    import urllib.request
    req = urllib.request.Request(f"{gcs_server.url}/storage/v1/b/{gcs_server.bucket}/o/"
                                 f"{urllib.parse.quote(name, safe='')}", method="DELETE")
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="module")
def hosts(tok, gcs_server):
    """Runs, at most three processes at a time (the hosts of a run must not fall far apart on a loaded machine):
      ref      one host, 4 devices, 9 steps, uninterrupted
      more     ref's workdir as it stood at step 3 (a one-host run), resumed on two hosts (2 devices each) to 9
      dmg      more's run, then host 1's shards of step 9 cut short and summary.json deleted; rerun to 9
      gs       one host on a gs:// workdir, 6 steps; the array objects of step 6 are then deleted; rerun to 9
      mix_*    a two-source mixture: two hosts to step 3, then one host to 9; and one host to 9 uninterrupted"""
    root = tok["root"]
    gs = f"gs://{gcs_server.bucket}/resume_dmg"
    mix = mixture_args(root)
    first = wait_all({"ref": start(tok, root / "ref", MH_STEPS),
                      "mix_two": start(tok, root / "mix", 3, processes=2, devices=2, extra=mix)})
    check_ok(first["ref"])
    check_ok(first["mix_two"])
    more = root / "more"
    shutil.copytree(root / "ref", more, ignore=shutil.ignore_patterns(".lock"))
    for step in ("6", "9"):
        shutil.rmtree(more / "checkpoints" / step)
    (more / "summary.json").unlink()
    second = wait_all({"more": start(tok, more, MH_STEPS, processes=2, devices=2),
                       "gs_first": start(tok, gs, 6, env=gcs_server.env)})
    check_ok(second["gs_first"])
    more_ok = all(code == 0 for code, _ in second["more"])
    victims = gcs_server.list_objects("resume_dmg/checkpoints/6/state/ocdbt.process_0/d/")
    assert victims
    for name in victims:
        delete_object(gcs_server, name)
    dmg = {}
    more_losses = losses(more) if more_ok else {}
    if more_ok:  # else more's own test reports why
        torn = more / "checkpoints" / "9" / "state" / "ocdbt.process_1" / "d"
        assert os.listdir(torn)
        for f in os.listdir(torn):
            with open(torn / f, "r+b") as fh:
                fh.truncate(os.path.getsize(torn / f) // 2)
        (more / "summary.json").unlink()
        dmg = {"dmg": start(tok, more, MH_STEPS, processes=2, devices=2)}
    third = wait_all({**dmg, "mix_one": start(tok, root / "mix", MH_STEPS, extra=mix)})
    fourth = wait_all({"gs": start(tok, gs, MH_STEPS, env=gcs_server.env),
                       "mix_ref": start(tok, root / "mix_ref", MH_STEPS, extra=mix)})
    return {"ref": losses(root / "ref"), "root": root, "gs": gs, "more": more_losses,
            "second": {**second, **third, **fourth}}


def mixture_args(root) -> tuple[str, ...]:
    """A two-source mixture: the standard library's source and a folder of generated text files."""
    docs = root / "mix_docs"
    docs.mkdir()
    for i in range(12):
        (docs / f"doc{i}.txt").write_text("".join(f"river {j} stone {i * j} quartz lantern\n" for j in range(60)))
    sources = [{"name": "py", "source": "stdlib", "max_files": 40, "weight": 3},
               {"name": "docs", "source": "files", "paths": [str(docs / "*.txt")], "weight": 1}]
    return (f"data.mixture={json.dumps(sources)}",)


def assert_matches_reference(got, ref):
    assert sorted(got) == list(range(1, MH_STEPS + 1))
    for step in ref:  # one host vs two: the same batches, summed in another order
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step


def test_one_host_run_resumes_on_two_hosts_with_the_same_batches(hosts):
    outs = check_ok(hosts["second"]["more"])
    assert all("resumed from" in out and "at step 3" in out for out in outs), outs[0][-2000:]
    got = hosts["more"]
    assert all(got[s] == hosts["ref"][s] for s in (1, 2, 3))  # the one-host part, kept
    assert_matches_reference(got, hosts["ref"])


def test_damage_on_one_host_makes_all_hosts_fall_back_to_the_same_step(hosts):
    assert "dmg" in hosts["second"], "the two-host run to be damaged failed: see the one-to-two-host test"
    outs = check_ok(hosts["second"]["dmg"])  # before the fix: the hosts resumed from different steps, then hung
    for out in outs:
        assert "checkpoint step 9" in out and "unreadable on host(s) [1]" in out, out[-3000:]
        assert "resuming from step 6" in out, out[-3000:]
    workdir = hosts["root"] / "more"
    assert_matches_reference(losses(workdir), hosts["ref"])
    assert [n.split("-")[0] for n in os.listdir(workdir / "unreadable_checkpoints")] == ["9"]


def test_damaged_checkpoint_on_gs_is_set_aside_and_the_run_resumes(hosts, gcs_server):
    [out] = check_ok(hosts["second"]["gs"])  # before: "folder .../unreadable_checkpoints does not exist", exit 2
    assert "checkpoint step 6" in out and "resuming from step 3" in out, out[-3000:]
    objects = gcs_server.list_objects("resume_dmg/")
    aside = [n for n in objects if n.startswith("resume_dmg/unreadable_checkpoints/6-")]
    assert any(n.endswith("/commit_success.txt") for n in aside) and any("/state/" in n for n in aside), aside
    # Orbax no longer saw the damaged step 6: the rerun saved it afresh, and it reads back.
    assert "resume_dmg/checkpoints/6/commit_success.txt" in objects
    assert_matches_reference(losses(hosts["gs"]), hosts["ref"])


def test_mixture_run_on_two_hosts_resumes_on_one_with_the_same_batches(hosts):
    """Issue 27: a weighted mixture keeps the one-source promise. Two hosts train it to step 3; one host
    resumes at step 3 and ends with the losses of an uninterrupted one-host run of the same mixture."""
    [out] = check_ok(hosts["second"]["mix_one"])
    assert "resumed from" in out and "at step 3" in out, out[-2000:]
    ref = losses(hosts["root"] / "mix_ref")
    got = losses(hosts["root"] / "mix")
    assert sorted(got) == list(range(1, MH_STEPS + 1)) and ref != hosts["ref"]  # a mixture, not the one source
    for step in ref:  # two hosts then one vs one: the same batches, summed in another order
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step
