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
from t5like.data import DataConfig, get_tokenizer
from t5like.metrics import read_metrics
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    get_tokenizer(DataConfig(source="stdlib", max_files=40, tokenizer_train_chars=200_000), str(root / "tok"), 2048)
    return {"path": str(root / "tok" / "tokenizer" / "spm.model"), "root": root}


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
    from t5like.checkpoint import Checkpointer, checkpoint_dir, load_for_inference
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
