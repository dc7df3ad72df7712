"""launch.ray_cluster: every gcloud command it emits parses with the installed gcloud (exit 2 = usage error;
with a throwaway config there is no account, so a well-formed command stops with exit 1)."""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from launch.ray_cluster import ClusterSpec, down_commands, main, sweep_command, up_commands

SPEC = ClusterSpec(name="iso", project="my-project", zone="us-east5-a", tpu="v5p-32", slices=1, spot=True)


def gcloud_exit(cmd, config_dir):
    env = dict(os.environ, CLOUDSDK_CONFIG=str(config_dir), CLOUDSDK_CORE_DISABLE_PROMPTS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    return proc.returncode, proc.stderr


@pytest.mark.skipif(shutil.which("gcloud") is None, reason="needs the Google Cloud CLI")
def test_every_gcloud_command_parses(tmp_path):
    cmds = [*up_commands(SPEC), sweep_command(SPEC, ["experiments.scaling_isoflop", "--workdir", "gs://b/iso"]),
            *down_commands(SPEC)]
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert len(gcloud) == 9 and cmds[0][:2] == ["git", "archive"]
    assert any("tpu-vm" in c and "create" in c and "--accelerator-type=v5p-32" in c for c in gcloud)
    assert "--trial-tpu v5p-32" in sweep_command(SPEC, ["experiments.scaling_isoflop"])[-1]
    # The check can fail: a misspelt flag is a usage error.
    bad = [c if c != "--worker=all" else "--workers=all" for c in up_commands(SPEC)[5]]
    with ThreadPoolExecutor(4) as pool:  # one throwaway config each
        results = list(pool.map(gcloud_exit, [*gcloud, bad], [tmp_path / f"cfg{i}" for i in range(len(gcloud) + 1)]))
    for cmd, (code, err) in zip(gcloud, results):
        assert code != 2, (cmd, err[-2000:])
    assert results[-1][0] == 2, results[-1]


def test_bad_cluster_specs_are_clear_errors(capsys):
    with pytest.raises(ValueError, match="--tpu 'v5p' is not a TPU accelerator type"):
        up_commands(ClusterSpec("iso", "p", "z", tpu="v5p"))
    with pytest.raises(ValueError, match="--name 'Iso_1'"):
        up_commands(ClusterSpec("Iso_1", "p", "z"))
    assert main(["sweep", "--name", "iso", "--project", "p", "--zone", "z"]) == 2
    assert "give the sweep after --" in capsys.readouterr().err
