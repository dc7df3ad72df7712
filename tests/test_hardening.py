"""Regression tests for the defects a review found (issue 14): each fails on the code before its fix.

Training runs here are in-process, tiny (the gpt2_small experiment at size=tiny) and a few steps long."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t5like import train
from t5like.checkpoint import Checkpointer, checkpoint_dir
from t5like.config import CheckpointConfig, Config, MeshConfig, ModelConfig, OptimConfig
from t5like.data import DataConfig, get_tokenizer, make_iterator
from t5like.metrics import read_metrics
from xla import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(tok_path, workdir, *extra):
    return ["size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1",
            "train.eval_every=0", "train.progress=false", f"data.tokenizer_path={tok_path}", "mesh.data=1",
            "mesh.fsdp=-1", f"workdir={workdir}", *extra]


def config(tok_path, workdir, *extra) -> Config:
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    return train.parse_args(module.config, args(tok_path, workdir, *extra))


def run_main(tok_path, workdir, *extra, capsys) -> str:
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    with pytest.raises(SystemExit) as e:
        train.main(module.config, args(tok_path, workdir, *extra))
    assert e.value.code == 2
    return capsys.readouterr().err


# 1. Weight decay means one thing for every optimizer ------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_weight_decay_shrinks_by_lr_times_decay_with_zero_gradients(name):
    from t5like.optim import make_optimizer
    cfg = OptimConfig(name=name, learning_rate=0.1, schedule="constant", warmup_steps=0, weight_decay=0.1,
                      grad_clip=0.0, no_decay=())
    opt, _ = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.full((8, 4), 2.0)}
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    new = optax.apply_updates(params, updates)["w"]
    np.testing.assert_allclose(new, 2.0 * (1 - 0.1 * 0.1), rtol=1e-6)  # (1 - lr * weight_decay), as documented


# 2. The schedule never changes silently on resume --------------------------------------------------

@pytest.fixture(scope="module")
def finished(tok_path, tmp_path_factory):
    """A finished 4-step cosine run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train.train(config(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1"))
    return workdir


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_more_steps_on_a_cosine_run_is_refused_naming_the_key(tok_path, finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    err = run_main(tok_path, workdir, "train.steps=8", "checkpoint.every=2", "optim.warmup_steps=1", capsys=capsys)
    assert "train.steps: 4 -> 8" in err and "cosine" in err and "raise train.steps" not in err, err
    err = run_main(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1",
                   "optim.grad_clip=0", capsys=capsys)
    assert "optim.grad_clip: 'on' -> 'off'" in err, err


def test_resumed_learning_rates_follow_the_original_schedule(tok_path, finished, tmp_path):
    """Resume from step 2 (step 4 removed): every logged lr equals the schedule the run started with."""
    from t5like.optim import make_schedule
    workdir = copy_run(finished, tmp_path / "run")
    shutil.rmtree(workdir / "checkpoints" / "4")
    (workdir / "summary.json").unlink()
    cfg = config(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1")
    train.train(cfg)
    schedule = make_schedule(cfg.optim, cfg.train.steps)
    rows = [r for r in read_metrics(workdir) if "lr" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # 17: the re-done steps are not duplicated
    for r in rows:
        assert r["lr"] == pytest.approx(float(schedule(r["step"] - 1)), rel=1e-6), r


# 3. Gradient accumulation is the full batch's token mean --------------------------------------------

@pytest.mark.parametrize("objective, family", [("lm", "decoder"), ("prefix_lm", "decoder"), ("mlm", "encoder"),
                                               ("span_corruption", "encoder_decoder")])
def test_grad_accumulation_equals_full_batch(tok_path, objective, family):
    from t5like.models import build_model
    data = DataConfig(source="stdlib", max_files=40, seq_len=32, objective=objective, tokenizer_path=tok_path)
    tok = get_tokenizer(data, "", 2048)
    batch = next(make_iterator(data, tok, "train", batch_size=8, seed=0, process_index=0, process_count=1))
    batch["weights"] = batch["weights"] * (np.arange(8) % 3 != 0)[:, None]  # uneven target counts per microbatch
    model_cfg = ModelConfig(family=family, vocab_size=2048, d_model=64, num_heads=4, d_ff=128, num_layers=1,
                            max_len=64, position="learned")
    graphdef, params = nnx.split(build_model(model_cfg))
    params = params.to_pure_dict()
    grads = {}
    for accum in (1, 4):
        cfg = Config(model=model_cfg, data=data, optim=OptimConfig(grad_accum_steps=accum))
        grads[accum], metrics = jax.jit(train.make_grad_fn(graphdef, cfg))(params, batch, None)
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[4])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


# 4. A NaN state is never checkpointed ---------------------------------------------------------------

def test_nan_is_checked_before_every_save(tok_path, tmp_path, capsys):
    workdir = tmp_path / "nan"
    err = run_main(tok_path, workdir, "optim.learning_rate=1e12", "optim.grad_clip=0", "optim.warmup_steps=0",
                   "optim.schedule=constant", "train.log_every=5", "checkpoint.every=2", "train.steps=40",
                   capsys=capsys)
    assert err.startswith("error: loss=") and "Traceback" not in err, err   # 16: a clean error line
    assert "step None" not in err
    ckpt = Checkpointer(checkpoint_dir(str(workdir)), CheckpointConfig(async_save=False))
    cfg = config(tok_path, workdir, "train.steps=40")
    setup = train.build(cfg, next(make_iterator(cfg.data, get_tokenizer(cfg.data, "", 2048), "train", batch_size=8,
                                                seed=0)))
    for step in ckpt.all_steps():
        state, _ = ckpt.restore(step, setup.abstract_state)
        assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state["params"])), step
    ckpt.close()


# 5. Dropout has its own key stream ------------------------------------------------------------------

def test_dropout_keys_differ_from_init_keys():
    rngs = nnx.Rngs(7)
    init_keys = {tuple(np.asarray(jax.random.key_data(rngs.default()))) for _ in range(64)}
    dropout_keys = {tuple(np.asarray(jax.random.key_data(train.dropout_key(7, s)))) for s in range(64)}
    assert not init_keys & dropout_keys


# 6. An unknown device never stops training -----------------------------------------------------------

def test_unknown_device_gives_unknown_mfu_and_dtype_peaks(tmp_path):
    from t5like.metrics import MetricsWriter, peak_flops_per_device
    peak, why = peak_flops_per_device(types.SimpleNamespace(platform="gpu", device_kind="NVIDIA B200"))
    assert peak is None and "B200" in why
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert peak_flops_per_device(h100, "bfloat16")[0] > peak_flops_per_device(h100, "float32")[0] > 0
    writer = MetricsWriter(str(tmp_path))
    writer.write(1, {"loss": 1.0, "mfu": None})
    writer.close()
    assert read_metrics(str(tmp_path)) == [{"step": 1, "loss": 1.0, "mfu": None}]


# 7. No silent replication -----------------------------------------------------------------------------

def test_indivisible_sharding_is_an_error_naming_the_parameter():
    from t5like.models import create_sharded
    from t5like.sharding import Sharder, make_mesh
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    bad_heads = ModelConfig(d_model=96, num_heads=3, head_dim=32, d_ff=128, num_layers=1, vocab_size=512)
    with pytest.raises(ValueError, match=r"parameter decoder/layers/attn/.*'heads', size 3\).*'tensor' \(size 2\)"):
        create_sharded(bad_heads, Sharder(mesh))
    bad_embed = ModelConfig(d_model=98, num_heads=2, d_ff=128, num_layers=1, vocab_size=512, position="learned")
    with pytest.raises(ValueError, match=r"'embed', size 98.*'fsdp' \(size 4\)"):
        create_sharded(bad_embed, Sharder(mesh))
    # Fewer kv heads than tensor shards replicate K/V on purpose (REPLICATE_IF_INDIVISIBLE).
    mqa = ModelConfig(d_model=128, num_heads=4, num_kv_heads=1, d_ff=128, num_layers=1, vocab_size=512)
    create_sharded(mqa, Sharder(mesh))


# 8. The training state comes from the tested sharded-init path, sharded 1/8 under fsdp=8 ---------------

def test_training_state_shards_params_and_adam_moments(tok_path, tmp_path):
    cfg = config(tok_path, tmp_path / "run", "mesh.fsdp=8")
    tok = get_tokenizer(cfg.data, "", 2048)
    setup = train.build(cfg, next(make_iterator(cfg.data, tok, "train", batch_size=8, seed=0)))
    state = setup.init_state()
    adam = state["opt_state"][1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    def large(tree):  # the weight matrices (biases and norm scales stay whole: they have no `embed` dim)
        return [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                if x.size >= 16384 and not str(p[-1]).endswith(("bias']", "scale']"))]
    assert len(large(state["params"])) >= 5
    for tree in (state["params"], adam.mu, adam.nu):
        for path, x in large(tree):
            assert x.addressable_shards[0].data.size * 8 == x.size, (path, x.sharding)


# 10. A run stopped in its last steps still gets its final eval -----------------------------------------

def test_resume_at_last_step_evaluates_and_shorter_rerun_is_an_error(tok_path, finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    (workdir / "summary.json").unlink()
    result = train.train(config(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1"))
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 4 and np.isfinite(summary["final_eval_loss"]) and np.isfinite(summary["final_loss"])
    assert result.eval_loss == summary["final_eval_loss"]
    # No train.peak_flops given: on CPU the peak is measured, and MFU is known.
    assert summary["peak_flops_source"] == "measured fp32 2048^3 matmul"
    assert all(r["mfu"] > 0 for r in read_metrics(workdir) if "loss" in r)
    err = run_main(tok_path, workdir, "train.steps=2", "optim.schedule=constant", "checkpoint.every=2",
                   "optim.warmup_steps=1", capsys=capsys)
    assert "train.steps" in err, err


def test_shorter_rerun_of_a_constant_schedule_run_is_an_error(tok_path, tmp_path, capsys):
    workdir = tmp_path / "run"
    train.train(config(tok_path, workdir, "train.steps=2", "checkpoint.every=2", "optim.schedule=constant"))
    err = run_main(tok_path, workdir, "train.steps=1", "checkpoint.every=2", "optim.schedule=constant",
                   capsys=capsys)
    assert "train.steps=1 is below the step of the latest checkpoint (2)" in err, err


# 11. Only a checkpoint binds a workdir's config ------------------------------------------------------

def test_failed_start_does_not_lock_the_workdir(tok_path, tmp_path, capsys):
    workdir = tmp_path / "run"
    err = run_main(tok_path, workdir, "model.d_model=64", "optim.learning_rate=1e12", "optim.grad_clip=0",
                   "optim.warmup_steps=0", "optim.schedule=constant", "train.steps=20", "checkpoint.every=100",
                   capsys=capsys)
    assert "loss=" in err and not (workdir / "checkpoints" / "20").exists()
    train.train(config(tok_path, workdir, "train.steps=2"))  # the corrected run is not refused
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 128


# 12. A damaged latest checkpoint falls back to the newest readable one --------------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete_item"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(tok_path, finished, tmp_path, capsys, damage):
    workdir = copy_run(finished, tmp_path / "run")
    step_dir = workdir / "checkpoints" / "4"
    if damage == "truncate":
        files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir / "state") for f in fs if "/d/" in d + "/"]
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(max(os.path.getsize(f) // 2, 1))
    else:
        shutil.rmtree(step_dir / "state")
    (workdir / "summary.json").unlink()
    capsys.readouterr()
    train.train(config(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1"))
    err = capsys.readouterr().err
    assert "checkpoint step 4" in err and "unreadable" in err and "at step 2" in err, err
    assert json.loads((workdir / "summary.json").read_text())["step"] == 4
    assert len(os.listdir(workdir / "unreadable_checkpoints")) == 1  # kept for a post-mortem, out of the way


def test_no_readable_checkpoint_is_a_clear_error(tok_path, finished, tmp_path, capsys):
    workdir = copy_run(finished, tmp_path / "run")
    for step in ("2", "4"):
        shutil.rmtree(workdir / "checkpoints" / step / "state")
    err = run_main(tok_path, workdir, "train.steps=4", "checkpoint.every=2", "optim.warmup_steps=1", capsys=capsys)
    assert "no checkpoint" in err and "[4, 2]" in err and "Delete" in err, err


# 13. Two trainers on one workdir ----------------------------------------------------------------------

def test_second_trainer_on_a_workdir_is_refused_and_a_killed_ones_lock_is_not(tok_path, tmp_path, capsys):
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.gpt2_small",
                             *args(tok_path, workdir, "train.steps=100000", "checkpoint.every=100000")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not read_metrics(str(workdir)):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-2000:]
            time.sleep(0.1)
        err = run_main(tok_path, workdir, "train.steps=100000", "checkpoint.every=100000", capsys=capsys)
        assert "in use by another trainer" in err and f"pid {proc.pid}" in err, err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    train.train(config(tok_path, workdir, "train.steps=2", "optim.schedule=constant"))


# 16. Clean errors ------------------------------------------------------------------------------------------

def test_workdir_that_is_a_file_and_help_usage(tok_path, tmp_path, capsys):
    path = tmp_path / "afile"
    path.write_text("x")
    err = run_main(tok_path, path, capsys=capsys)
    assert "is a file, not a directory" in err, err
    out = subprocess.run([sys.executable, "-m", "experiments.gpt2_small", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    assert "usage: python -m experiments.gpt2_small" in out and "--coordinator" in out and "train.steps=" in out


def test_model_too_large_for_memory_is_refused_before_allocating(tok_path, tmp_path, capsys):
    err = run_main(tok_path, tmp_path / "big", "model.d_model=16384", "model.d_ff=65536", "model.num_layers=24",
                   "model.num_heads=128", capsys=capsys)
    assert "GiB on this host" in err and "mesh.fsdp=-1" in err and "Traceback" not in err, err
