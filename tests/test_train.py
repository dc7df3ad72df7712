"""Training end to end: exact resume after SIGKILL, kill during save, SIGTERM, mesh parity, NaN stop,
fine-tuning from another run, and bad input that must not touch an existing run. (Learning:
benchmarks/learning.py.)"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from t5like import train
from t5like.config import Config
from t5like.data import DataConfig, get_tokenizer
from t5like.metrics import read_metrics
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = {"decoder": "gpt2_small", "encoder": "bert_base", "encoder_decoder": "t5_base"}
STEPS = 20
# MFU against a given peak: no 0.7 s matmul measured at the start of each of the many runs here.
PEAK = "train.peak_flops=1e11"


def make_shared(root) -> dict:
    """One tokenizer for every run here (the subprocesses share conftest's session compilation cache)."""
    data = DataConfig(source="stdlib", max_files=60, tokenizer_train_chars=300_000)
    get_tokenizer(data, str(root / "tok"), vocab_size=2048)
    return {"tokenizer": str(root / "tok" / "tokenizer" / "spm.model"), "root": root}


@pytest.fixture(scope="module")
def shared(background):
    return background.once("train", make_shared)


def fast(shared, *extra):
    return ["size=tiny", "data.max_files=60", "data.seq_len=64", "train.batch_size=8", "train.eval_steps=2",
            "train.eval_every=0", "train.progress=false", f"data.tokenizer_path={shared['tokenizer']}",
            f"train.steps={STEPS}", "checkpoint.every=3", PEAK, *extra]


def command(shared, family, workdir, *extra) -> tuple[list[str], dict]:
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", f"experiments.{EXPERIMENTS[family]}", *fast(shared, f"workdir={workdir}", *extra)]
    return cmd, env


def launch(shared, family, workdir, *extra):
    cmd, env = command(shared, family, workdir, *extra)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def run_to_end(shared, family, workdir, *extra) -> str:
    return finish(launch(shared, family, workdir, *extra))


def losses(workdir) -> dict[int, float]:
    """The training loss of each step. A resumed run truncates metrics.jsonl back to its checkpoint, so
    every step appears once, in order."""
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), f"duplicated or unordered metric rows: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def reference(shared, background):
    """Uninterrupted single-device runs, one per family, started before the first test (`background_runs`)."""
    runs = {}
    for family in EXPERIMENTS:
        background.wait(f"ref_{family}")
        runs[family] = losses(shared["root"] / f"ref_{family}")
        assert sorted(runs[family]) == list(range(1, STEPS + 1))
    return runs


def saving_step(ckpt) -> int | None:
    """The step of a checkpoint being written (Orbax's temporary directory) at or after step 3, if any."""
    if ckpt.is_dir():
        for name in os.listdir(ckpt):
            if "orbax-checkpoint-tmp" in name and int(name.split(".")[0]) >= 3:
                return int(name.split(".")[0])
    return None


@pytest.fixture(scope="module")
def interrupted(shared):
    """Runs interrupted side by side, then each rerun to the end: the encoder and the encoder-decoder SIGKILLed
    at a random step, the decoder SIGKILLed while a checkpoint is being written (a harder SIGKILL, so the decoder
    needs no random-step run of its own), and the decoder sent SIGTERM after step 4.
    Each run is its own process on its own workdir, so running them together changes none of them."""
    from t5like.checkpoint import latest_step
    root = shared["root"]
    jobs = {f"kill_{family}": dict(family=family, workdir=root / f"killed_{family}", extra=(), signal=signal.SIGKILL,
                                   at=random.Random(family).randint(5, STEPS - 4))
            for family in EXPERIMENTS if family != "decoder"}
    jobs["kill_in_save"] = dict(family="decoder", workdir=root / "killed_in_save", extra=("checkpoint.every=1",),
                                signal=signal.SIGKILL, at=None)
    jobs["sigterm"] = dict(family="decoder", workdir=root / "preempted", extra=("checkpoint.every=1000",),
                           signal=signal.SIGTERM, at=4)
    for job in jobs.values():
        job["proc"] = launch(shared, job["family"], job["workdir"], *job["extra"])
    pending = set(jobs)
    deadline = time.time() + 400
    polls = 0
    while pending:
        assert time.time() < deadline, f"not interrupted in time: {sorted(pending)}"
        for name in sorted(pending):
            job = jobs[name]
            if job["at"] is None:  # watch for a save in progress every ms, to kill inside it
                job["killed_step"] = saving_step(job["workdir"] / "checkpoints")
                hit = job["killed_step"] is not None
            else:  # step counts from metrics.jsonl, every 20 ms
                hit = polls % 20 == 0 and max(losses(job["workdir"]), default=0) >= job["at"]
            if hit:
                job["proc"].send_signal(job["signal"])
                pending.discard(name)
            elif job["proc"].poll() is not None:  # its test reports this
                job["ended_early"] = True
                pending.discard(name)
        polls += 1
        time.sleep(0.001)
    for job in jobs.values():
        job["out"], _ = job["proc"].communicate(timeout=120)
        job["returncode"] = job["proc"].returncode
        ckpt = job["workdir"] / "checkpoints"
        job["checkpoints"] = {n for n in os.listdir(ckpt) if (ckpt / n).is_dir()} if ckpt.is_dir() else set()
    save = jobs["kill_in_save"]
    save["latest"] = latest_step(str(save["workdir"]))  # before the rerun
    reruns = {name: launch(shared, job["family"], job["workdir"], *job["extra"]) for name, job in jobs.items()}
    for name, proc in reruns.items():
        jobs[name]["rerun_out"] = finish(proc)
        jobs[name]["losses"] = losses(jobs[name]["workdir"])
    return jobs


@pytest.mark.parametrize("family", sorted(EXPERIMENTS))
def test_exact_resume_after_sigkill(reference, interrupted, family):
    job = interrupted["kill_in_save" if family == "decoder" else f"kill_{family}"]
    assert not job.get("ended_early"), job["out"][-3000:]
    assert "resumed from" in job["rerun_out"]
    got = job["losses"]
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == pytest.approx(reference[family][step], abs=1e-5), step
    bitwise = all(got[s] == reference[family][s] for s in got)
    assert bitwise, "CPU resume should be bitwise identical"


def test_kill_during_save_restarts_from_previous_checkpoint(reference, interrupted):
    job = interrupted["kill_in_save"]
    killed_step, latest = job["killed_step"], job["latest"]
    assert killed_step is not None, "never caught a save in progress"
    assert not job.get("ended_early"), job["out"][-3000:]
    assert latest is not None and latest < killed_step  # the half-written step is never picked
    assert f"at step {latest}" in job["rerun_out"]
    got = job["losses"]
    for step in range(1, STEPS + 1):
        assert got[step] == reference["decoder"][step], step


def test_sigterm_saves_and_exits_cleanly(reference, interrupted):
    job = interrupted["sigterm"]
    out = job["out"]
    assert not job.get("ended_early"), out[-3000:]
    assert job["returncode"] == train.PREEMPTED_EXIT_CODE, out[-2000:]
    assert "SIGTERM: saved step" in out and "Traceback" not in out
    saved = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert 4 <= saved < STEPS and str(saved) in job["checkpoints"]  # on disk before the rerun
    assert f"at step {saved}" in job["rerun_out"]
    assert job["losses"][STEPS] == reference["decoder"][STEPS]


def in_process_config(shared, family, workdir, *extra) -> Config:
    module = __import__(f"experiments.{EXPERIMENTS[family]}", fromlist=["config"])
    return train.parse_args(module.config, fast(shared, f"workdir={workdir}", *extra))


def test_mfu_is_against_the_given_peak(shared, reference):
    """train.peak_flops replaces the table and the CPU measurement: every row's MFU is the step's FLOPs over
    its time and that peak (one process, so the CPU peak counts once)."""
    workdir = shared["root"] / "ref_decoder"
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["peak_flops_source"] == "train.peak_flops"
    flops_per_step = summary["flops"] / summary["step"]
    rows = [r for r in read_metrics(workdir) if "loss" in r]
    assert len(rows) == STEPS
    for r in rows:
        assert r["mfu"] == pytest.approx(flops_per_step / r["step_time"] / 1e11, rel=1e-9), r


def test_mesh_parity_in_training(shared, reference):
    """20 steps on 8 simulated devices, fsdp=4 x tensor=2, follow the single-device loss curve."""
    workdir = shared["root"] / "mesh"
    cfg = in_process_config(shared, "decoder", workdir, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2",
                            "checkpoint.every=1000")
    train.train(cfg)
    got = losses(workdir)
    np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                               [reference["decoder"][s] for s in range(1, STEPS + 1)], atol=1e-4)


def test_finetune_from_another_run_params_only(shared, reference):
    workdir = shared["root"] / "finetune"
    cfg = in_process_config(shared, "decoder", workdir, "train.steps=2", "mesh.data=1", "mesh.fsdp=-1",
                            f"checkpoint.init_from={shared['root'] / 'ref_decoder'}")
    train.train(cfg)
    got = losses(workdir)
    assert got[1] < reference["decoder"][1] - 0.5  # starts from trained params...
    assert read_metrics(workdir)[0]["lr"] == 0.0   # ...with a fresh optimizer and schedule


def test_nan_loss_stops_and_keeps_last_good_checkpoint(shared, capsys):
    workdir = shared["root"] / "nan"
    cfg = in_process_config(shared, "decoder", workdir, "optim.learning_rate=1e12", "optim.grad_clip=0",
                            "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint.every=1", "train.steps=50")
    with pytest.raises(train.NonFiniteLoss, match=r"at step (\d+)") as e:
        train.train(cfg)
    bad_step = int(str(e.value).split("at step ")[1].split(";")[0])
    from t5like.checkpoint import Checkpointer
    from t5like.config import CheckpointConfig
    latest = Checkpointer(str(workdir / "checkpoints"), CheckpointConfig(async_save=False)).latest_step()
    assert latest is None or latest < bad_step
    assert (f"last good checkpoint is step {latest}" if latest is not None else "No checkpoint was saved yet") \
        in str(e.value)


# Bad input: a clear error, and an existing run is left as it was ----------------------------------

@pytest.fixture(scope="module")
def existing_run(shared):
    """A finished run on its own data files, which the tests then break in place."""
    import sysconfig
    docs = shared["root"] / "docs"
    docs.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("argparse.py", "difflib.py", "textwrap.py", "pathlib.py", "shutil.py", "tarfile.py"):
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            (docs / name.replace(".py", ".txt")).write_text(f.read(), encoding="utf-8")
    workdir = shared["root"] / "existing"
    args = ["data.source=files", f"data.paths={docs}/*.txt", "data.validation_fraction=0.3", "train.steps=2",
            "mesh.data=1", "mesh.fsdp=-1"]
    train.train(in_process_config(shared, "decoder", workdir, *args))
    return workdir, docs, args


def snapshot(workdir):
    """Every file of a run and its mtime; the trainer's lock file (which names its holder) is not run data."""
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(workdir) for f in files if f != ".lock"}


def run_main(shared, workdir, args, capsys) -> str:
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    with pytest.raises(SystemExit) as e:
        train.main(module.config, fast(shared, f"workdir={workdir}", *args))
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("breakage, words", [
    ("delete", ["data.paths", "matched no files"]),
    ("empty", ["is empty"]),
    ("latin1", ["is not UTF-8", "offset"]),
])
def test_broken_data_is_a_clear_error_and_touches_no_checkpoint(shared, existing_run, capsys, breakage, words):
    workdir, docs, args = existing_run
    before = snapshot(workdir)
    victim = docs / "textwrap.txt"
    original = victim.read_bytes()
    try:
        if breakage == "delete":
            for f in docs.iterdir():
                f.rename(f.with_suffix(".bak"))
        elif breakage == "empty":
            victim.write_bytes(b"")
        else:
            victim.write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 20)
        err = run_main(shared, workdir, args, capsys)
    finally:
        for f in docs.glob("*.bak"):
            f.rename(f.with_suffix(".txt"))
        victim.write_bytes(original)
    for w in words:
        assert w in err, err
    assert snapshot(workdir) == before


@pytest.mark.parametrize("change, words", [
    (["model.d_model=256"], ["incompatible", "model.d_model: 128 -> 256", "Nothing was overwritten"]),
    (["train.batch_size=16"], ["incompatible", "train.batch_size: 8 -> 16"]),
    (["optim.state_dtype=bfloat16"], ["incompatible", "optim.state_dtype: None -> 'bfloat16'"]),
])
def test_incompatible_config_is_a_clear_error_and_touches_nothing(shared, existing_run, capsys, change, words):
    workdir, _, args = existing_run
    before = snapshot(workdir)
    err = run_main(shared, workdir, args + change, capsys)
    for w in words:
        assert w in err, err
    assert snapshot(workdir) == before


def test_vocab_larger_than_corpus_supports(shared, existing_run, tmp_path, capsys):
    _, docs, args = existing_run
    err = run_main(shared, tmp_path / "run", args + ["data.tokenizer_path=", "model.vocab_size=60000"], capsys)
    assert "vocab_size" in err and "60000" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def background_runs(background, selected):
    """The uninterrupted reference runs, started before the first test (tests/background.py) when a selected
    test uses them. (Whether each family learns is benchmarks/learning.py's: minutes of training steps.)"""
    shared = background.once("train", make_shared)
    if any("reference" in fixtures for fixtures in selected.values()):
        for family in EXPERIMENTS:
            cmd, env = command(shared, family, shared["root"] / f"ref_{family}")
            background.start(f"ref_{family}", cmd, cwd=ROOT, env=env)
