"""launch.compile: the trainer's own train step compiled ahead of time for a TPU topology, on this CPU
machine, through libtpu's compile-only devices; and launch.tpu refusing a plan that does not fit."""
import json
import os
import subprocess
import sys

import pytest

from t5like.accounting import param_counts
from t5like.config import model_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import libtpu  # noqa: F401  (jax[tpu] brings it)
    HAVE_LIBTPU = True
except ImportError:
    HAVE_LIBTPU = False
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='needs libtpu: pip install "jax[tpu]"')

# Any big model on one v5e chip (16 GiB): 1.2B parameters in fp32 with AdamW is ~19 GB of state alone.
TOO_BIG = ["model.d_model=4096", "model.num_heads=32", "model.d_ff=16384", "model.num_layers=4",
           "model.vocab_size=32000"]


def env():
    # The compile runs as the user runs it: a fresh process, no simulated CPU devices needed.
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return {**e, "PYTHONPATH": ROOT}


def start(*argv):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@needs_libtpu
def test_tiny_presets_compile_for_a_small_v5e_slice():
    runs = {name: start("-m", "launch.compile", f"experiments.{name}", "size=tiny", "--topology", "v5e-4")
            for name in ("gpt2_small", "t5_base")}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 1, out                       # one JSON line, nothing else on stdout
        assert "WARNING" not in err and "metadata" not in err.lower(), err  # libtpu kept quiet
        r = json.loads(lines[0])
        assert r["topology"] == "v5e-4" and r["accelerator_type"] == "v5litepod-4" and r["num_devices"] == 4
        assert r["fits"] is True and r["hbm_bytes_per_device"] == 16 * 1024 ** 3
        # The tiny configs replicate params (mesh data=-1): every device holds params + AdamW's two moments.
        preset = {"gpt2_small": "gpt2_small", "t5_base": "t5_v1_1_base"}[name]
        state_bytes = 3 * 4 * param_counts(model_preset(preset, "tiny"))["total"]
        assert state_bytes <= r["argument_bytes"] < 2 * state_bytes, (name, r, state_bytes)
        assert r["per_device_bytes"] >= r["argument_bytes"] and r["flops_per_step"] > 0 and r["compile_s"] > 0


@needs_libtpu
def test_a_plan_that_cannot_fit_is_refused():
    """A 1.2B model on one v5e chip: launch.compile says fits=false; launch.tpu's dry run refuses the plan."""
    proc = start("-m", "launch.tpu", "run", "experiments.quickstart", *TOO_BIG, "--name", "too-big",
                 "--tpu", "v5e-1", "--zone", "us-west4-a", "--project", "p", "--workdir", "gs://bkt/too-big",
                 "--dry-run")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    assert not any(line.startswith("gcloud ") for line in out.splitlines()), out   # no plan printed
    check = json.loads(err.split("compile check: ", 1)[1].splitlines()[0])
    assert check["fits"] is False and check["topology"] == "v5e-1" and check["num_devices"] == 1
    assert check["per_device_bytes"] > check["hbm_bytes_per_device"]
    assert "error: this plan does not fit" in err and "GiB" in err and "mesh.fsdp" in err and "remat" in err
