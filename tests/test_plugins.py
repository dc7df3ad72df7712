"""The trainer's seam (t5like/plugins.py): a plugin of the caller's own sees every hook at the right steps,
adds metrics and summary entries, freezes what it says, and a resumed run skips fresh-init hooks."""
import contextlib

import jax
import numpy as np

from t5like import train
from t5like.checkpoint import load_params
from t5like.metrics import read_metrics
from t5like.models import abstract_model
from t5like.plugins import Plugin


def config(tok_path, workdir, steps):
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    return train.parse_args(module.config, [
        "size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1",
        "train.eval_every=2", "train.log_every=1", "train.progress=false", f"data.tokenizer_path={tok_path}",
        "checkpoint.every=3", "optim.schedule=constant", "train.peak_flops=1e11", f"train.steps={steps}",
        f"workdir={workdir}"])


class Recorder(Plugin):
    """Records every hook; trains only the decoder's final norm; adds an eval metric and a summary entry."""

    def __init__(self):
        self.events = []
        self.trainable = lambda path: path[:2] == ("decoder", "final_norm")

    def check_start(self, resuming):
        self.events.append(("check_start", resuming))

    def check_data(self, train_iter):
        self.events.append(("check_data",))

    def init_params(self, params):
        self.events.append(("init_params",))
        return params

    def on_log(self, step, row):
        self.events.append(("log", step, "loss" in row))

    def on_eval(self, step, params):
        self.events.append(("eval", step))
        return {"recorder/step_seen": float(step)}

    def on_eval_row(self, step, row):
        self.events.append(("eval_row", step, "recorder/step_seen" in row))

    def on_save(self, step):
        self.events.append(("save", step))

    @contextlib.contextmanager
    def phase(self, name, step):
        self.events.append(("phase", name, step))
        yield

    def summary(self, abstract_params):
        return {"recorder": "was here"}

    def on_finish(self, summary):
        self.events.append(("finish", summary["recorder"]))


def test_a_plugin_sees_every_hook_and_freezes_what_it_says(tok_path, tmp_path):
    workdir = tmp_path / "run"
    first = Recorder()
    result = train.train(config(tok_path, workdir, 6), plugins=[first])
    hooks = [e for e in first.events if e[0] != "phase"]
    assert hooks[:3] == [("check_start", False), ("check_data",), ("init_params",)]
    assert [e[1] for e in first.events if e[0] == "log"] == [1, 2, 3, 4, 5, 6]
    assert [e[1] for e in first.events if e[0] == "eval"] == [2, 4, 6]
    assert [e[1] for e in first.events if e[0] == "save"] == [3, 6]
    assert [e[1:] for e in first.events if e[0] == "eval_row"] == [(2, True), (4, True), (6, True)]
    phases = [e[1:] for e in first.events if e[0] == "phase"]
    assert phases[:4] == [("restore", 0), ("compile", 1), ("data", 1), ("step", 1)] and ("step", 2) in phases
    assert {("save", 3), ("save", 6), ("eval", 2), ("eval", 6)} <= set(phases)
    assert first.events[-1] == ("finish", "was here")
    evals = [r for r in read_metrics(str(workdir)) if "eval_loss" in r]
    assert [(r["step"], r["recorder/step_seen"]) for r in evals] == [(2, 2.0), (4, 4.0), (6, 6.0)]
    assert result.summary["recorder"] == "was here"
    # Only the final norm trains: between the checkpoints of steps 3 and 6 nothing else moved.
    at3, at6 = (_params(result.config, step) for step in (3, 6))
    moved = sorted(k for k in at3 if not np.array_equal(at3[k], at6[k]))
    assert moved == [("decoder", "final_norm", "bias"), ("decoder", "final_norm", "scale")]
    assert result.summary["trainable_params"] == sum(at6[k].size for k in moved)

    second = Recorder()
    resumed = train.train(config(tok_path, workdir, 9), plugins=[second])
    assert resumed.step == 9
    assert ("check_start", True) in second.events and ("init_params",) not in second.events
    assert [e[1] for e in second.events if e[0] == "save"] == [9]


def _params(cfg, step) -> dict:
    _, abstract = abstract_model(cfg.model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract.to_pure_dict())
    return _flat(load_params(cfg.workdir, target, step=step))


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): np.asarray(v)})
    return out
