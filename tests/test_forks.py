"""Cooldown forks (issue 28): a fork's schedule is the wsd run's, a fork resumes exactly after a kill, the
runner waits for the parent's step; and the eval loss's standard error over sequences."""
import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from t5like import train
from t5like.config import OptimConfig, apply_overrides
from t5like.losses import ratio_stderr
from t5like.metrics import read_metrics
from t5like.optim import cross_entropy, make_schedule
from t5like.plugins import Plugin
from t5like.scaling.design import plan_isoflop, sequence_lengths


# The plan: a fork's learning rate is the separately planned wsd run's ----------------------------------

def test_fork_schedule_equals_the_wsd_run_of_its_tokens():
    from experiments import scaling_tiny
    base = scaling_tiny.config()
    design = dataclasses.replace(scaling_tiny.design(), budgets=(2e11, 8e11), cooldown_forks=True, seeds=(7,))
    plan = plan_isoflop(base, design)
    trials = {t.id: t for t in plan.trials}
    forks = [t for t in plan.trials if t.parent]
    assert forks and len({t.parent for t in forks}) < len(forks), "some size is shared by two budgets"
    assert {t.seed for t in plan.trials} == {base.seed, 7} and all(trials[f.parent].seed == f.seed for f in forks)
    shared = [f for f in forks if f.seed == base.seed and sum(g.parent == f.parent for g in forks) > 1]
    for fork in shared[:2] + [forks[-1]]:  # two forks of one stable run, and a repeat's (eager schedules are slow)
        parent = trials[fork.parent]
        assert parent.budget is None and fork.budget is not None
        pcfg, fcfg = apply_overrides(base, list(parent.overrides)), apply_overrides(base, list(fork.overrides))
        assert fork.fork_step in pcfg.checkpoint.keep_steps and fork.fork_step <= pcfg.train.steps
        # The separately planned run: wsd over the fork's tokens, with its peak lr, warmup and decay fraction.
        seq, target = sequence_lengths(fcfg)
        steps = fork.tokens // ((seq + target) * fork.batch_size)
        alone = OptimConfig(**{**dataclasses.asdict(base.optim), "schedule": "wsd",
                               "learning_rate": fcfg.optim.learning_rate, "warmup_steps": fcfg.optim.warmup_steps,
                               "wsd_decay_fraction": design.cooldown_fraction})
        want = np.asarray(make_schedule(alone, steps)(jnp.arange(steps)))
        k = fork.fork_step
        got = np.concatenate([np.asarray(make_schedule(pcfg.optim, pcfg.train.steps)(jnp.arange(k))),
                              np.asarray(make_schedule(fcfg.optim, fcfg.train.steps)(jnp.arange(k, steps)))])
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert want[k - 1] == pytest.approx(alone.learning_rate) and want[-1] < 0.5 * alone.learning_rate
        assert steps - k == round(design.cooldown_fraction * steps), "the cooldown is the last fraction of the run"
    with pytest.raises(ValueError, match=r"design.cooldown_fraction=0.96 must be in \(0, 1 - warmup_fraction"):
        plan_isoflop(base, dataclasses.replace(design, cooldown_fraction=0.96))
    with pytest.raises(ValueError, match="design.seeds=.* includes the base config's seed=0"):
        plan_isoflop(base, dataclasses.replace(design, seeds=(0, 7)))


# A fork trains exactly as the wsd run from scratch, and resumes exactly after a kill --------------------

@pytest.fixture(scope="module")
def tok(tmp_path_factory, tok_path):
    return {"path": tok_path, "root": tmp_path_factory.mktemp("forks")}


def config(tok, workdir, *extra):
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    return train.parse_args(module.config, [
        "size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=2",
        "train.eval_every=0", "train.progress=false", "train.peak_flops=1e11", "train.log_every=1",
        "optim.warmup_steps=1", "optim.wsd_decay_fraction=0.5", "mesh.data=1", "mesh.fsdp=-1",
        f"data.tokenizer_path={tok['path']}", f"workdir={workdir}", *extra])


class Crash(Plugin):
    """A kill right after step `at` is saved (the checkpoint is finalised when the run's finally closes it)."""

    def __init__(self, at):
        self.at = at

    def on_save(self, step):
        if step == self.at:
            raise KeyboardInterrupt(f"killed after saving step {step}")


def test_fork_equals_the_wsd_run_and_resumes_exactly_after_a_kill(tok, tmp_path):
    # The separately trained run: wsd over 8 steps (warmup 1, stable to 4, cooldown 4).
    alone = train.train(config(tok, tmp_path / "alone", "optim.schedule=wsd", "train.steps=8"))
    # The stable run: constant lr, step 4 kept although keep=1 and every=3 would have dropped it.
    train.train(config(tok, tmp_path / "stable", "optim.schedule=constant", "train.steps=7", "checkpoint.every=3",
                       "checkpoint.keep=1", "checkpoint.keep_steps=4"))
    assert sorted(os.listdir(tmp_path / "stable" / "checkpoints")) == ["4", "7"]
    fork = config(tok, tmp_path / "fork", "optim.schedule=wsd", "train.steps=8", "checkpoint.every=2",
                  f"checkpoint.fork_from={tmp_path / 'stable'}", "checkpoint.fork_step=4")
    with pytest.raises(KeyboardInterrupt):
        train.train(fork, plugins=[Crash(6)])
    assert sorted(os.listdir(tmp_path / "fork" / "checkpoints")) == ["4", "6"]
    result = train.train(fork)  # resumes from its own step 6; the parent is no longer read
    ref = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "alone")) if "loss" in r}
    got = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "fork")) if "loss" in r}
    assert sorted(got) == [5, 6, 7, 8]
    np.testing.assert_allclose([got[s] for s in got], [ref[s] for s in got], rtol=1e-6)
    assert result.eval_loss == pytest.approx(alone.eval_loss, rel=1e-6)
    assert result.summary["final_eval_loss_stderr"] == pytest.approx(alone.summary["final_eval_loss_stderr"], rel=1e-5)
    assert 0 < result.summary["final_eval_loss_stderr"] < 0.5

    # A fork whose schedule does not continue the parent's is refused before anything is copied.
    bad = config(tok, tmp_path / "bad", "optim.schedule=wsd", "train.steps=8", "optim.warmup_steps=2",
                 f"checkpoint.fork_from={tmp_path / 'stable'}", "checkpoint.fork_step=4")
    with pytest.raises(ValueError, match="optim.warmup_steps=2 here but 1 there"):
        train.train(bad)
    missing = dataclasses.replace(fork, workdir=str(tmp_path / "missing"),
                                  checkpoint=dataclasses.replace(fork.checkpoint, fork_step=5))
    with pytest.raises(ValueError, match="no saved checkpoint step 5"):
        train.train(missing)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints" / "4")


# The standard error over eval sequences ---------------------------------------------------------------

def test_eval_stderr_is_the_standard_error_over_sequences():
    rng = np.random.default_rng(0)
    B, L, V = 6, 5, 11
    batches = []
    for b in range(3):  # accumulated over batches, as evaluate() sums them
        logits = rng.normal(size=(B, L, V)) * 2
        targets = rng.integers(0, V, size=(B, L))
        weights = np.ones((B, L))
        if b == 2:
            weights[-1] = 0  # a padded row counts in no sum
        nbytes = rng.integers(1, 6, size=(B, L)) * weights
        batches.append((logits, targets, weights, nbytes))
    totals = None
    for logits, targets, weights, nbytes in batches:
        _, sums = cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights),
                                target_bytes_BL=jnp.asarray(nbytes))
        sums = {k: float(v) for k, v in sums.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    # Independently: each sequence's loss from a log-softmax in numpy.
    seq_loss, seq_tokens, seq_bytes = [], [], []
    for logits, targets, weights, nbytes in batches:
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
        for i in range(B):
            if weights[i].sum():
                seq_loss.append((nll[i] * weights[i]).sum())
                seq_tokens.append(weights[i].sum())
                seq_bytes.append(nbytes[i].sum())
    s, n = np.array(seq_loss), len(seq_loss)
    per_seq_mean = s / np.array(seq_tokens)  # equal lengths: the textbook standard error of the mean
    assert ratio_stderr(totals, "weight") == pytest.approx(per_seq_mean.std(ddof=1) / np.sqrt(n), rel=1e-4)
    b = np.array(seq_bytes)  # unequal byte counts: the ratio estimator's standard error
    r = s.sum() / b.sum()
    want = np.sqrt(n / (n - 1) * ((s - r * b) ** 2).sum()) / b.sum()
    assert ratio_stderr(totals, "byte") == pytest.approx(want, rel=1e-4)
    assert totals["rows_weight"] == n == B * 3 - 1


# The runner: a fork waits for its parent's step, on any backend -------------------------------------------

FAKE_FORKS = '''
"""Fake trials (no JAX): a stable run 'saves' checkpoints/STEP for its keep_steps as it goes; a fork needs
its parent's step when it starts."""
import json, os, sys, time
from t5like.scaling.design import Trial


def sweep():
    t = lambda tid, *o, **kw: Trial(tid, tuple(o), params=1000, tokens=1000, flops=1e6, steps=6, **kw)
    return [t("stable", "fake.keep=2,5"), t("late", budget=1e18, parent="stable", fork_step=5),
            t("early", budget=1e17, parent="stable", fork_step=2),
            t("broken", "fake.fail=1", "fake.keep=2"), t("orphan", budget=1e17, parent="broken", fork_step=2)]


if __name__ == "__main__":
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    wd = args["workdir"]
    if "checkpoint.fork_from" in args:
        step_dir = os.path.join(args["checkpoint.fork_from"], "checkpoints", args["checkpoint.fork_step"])
        assert os.path.isdir(step_dir), f"started before its parent saved {step_dir}"
    if args.get("fake.fail"):
        raise RuntimeError("boom")
    keep = [int(s) for s in args.get("fake.keep", "").split(",") if s]
    for step in range(1, 7):
        time.sleep(0.15)
        if step in keep:
            os.makedirs(os.path.join(wd, "checkpoints", f"{step}.tmp"))
            os.rename(os.path.join(wd, "checkpoints", f"{step}.tmp"), os.path.join(wd, "checkpoints", str(step)))
    with open(os.path.join(wd, "summary.json"), "w") as f:
        json.dump({"step": 6, "final_loss": 2.0, "final_eval_loss": 2.0, "final_eval_loss_stderr": 0.01}, f)
'''


def test_runner_starts_a_fork_once_its_parent_saved_its_step(tmp_path, monkeypatch):
    import csv
    from launch.backends import LocalBackend
    from launch.plan import load_sweep
    from launch.runner import run_sweep
    (tmp_path / "fake_forks.py").write_text(FAKE_FORKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), root]))
    wd = str(tmp_path / "sweep")
    outcome = run_sweep(load_sweep("fake_forks"), wd, LocalBackend(2), parallel=2, poll_s=0.05)
    assert (outcome.ok, outcome.failed) == (3, 2)
    with open(os.path.join(wd, "results.csv"), newline="") as f:
        table = {r["trial_id"]: r for r in csv.DictReader(f)}
    assert {k: table[k]["status"] for k in table} == {"stable": "ok", "late": "ok", "early": "ok",
                                                      "broken": "failed", "orphan": "failed"}
    assert (table["late"]["parent"], table["late"]["fork_step"]) == ("stable", "5")
    assert table["late"]["eval_loss_stderr"] == "0.01"
    assert "parent broken ended without saving step 2" in table["orphan"]["error"]
    log = open(os.path.join(wd, "trials", "late", "train.log")).read()
    assert f"checkpoint.fork_from={os.path.join(wd, 'trials', 'stable')} checkpoint.fork_step=5" in log


def test_a_gcs_step_counts_once_committed_and_copies_whole(gcs_server):
    from test_scaling_gcs import download, upload
    from t5like.storage import GCS_COMMIT_MARKER, copy_step, step_saved
    root = f"gs://{gcs_server.bucket}"
    files = {"state/d/abc": b"\x00\x01", "state/_METADATA": b"{}", "config/x.json": b"[]"}
    for name, data in files.items():
        upload(gcs_server, f"stable/checkpoints/4/{name}", data)
    assert not step_saved(f"{root}/stable/checkpoints", 4)  # orbax has not committed it: no fork may start
    upload(gcs_server, f"stable/checkpoints/4/{GCS_COMMIT_MARKER}", b"")
    assert step_saved(f"{root}/stable/checkpoints", 4) and not step_saved(f"{root}/stable/checkpoints", 5)
    copy_step(f"{root}/stable/checkpoints", f"{root}/fork/checkpoints", 4)
    for name, data in {**files, GCS_COMMIT_MARKER: b""}.items():
        assert download(gcs_server, f"fork/checkpoints/4/{name}") == data
    assert step_saved(f"{root}/fork/checkpoints", 4)
