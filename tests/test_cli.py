"""The command line and console (issue 22): --help, value errors, the seed's range, an early mesh check, eval
losses on stderr and a closing line that says what each loss is, and no "Downloading" for local data."""
import os

import pytest

from t5like import train
from t5like.config import flat_keys
from t5like.data import DataConfig, get_tokenizer, make_iterator

EXPERIMENT = __import__("experiments.gpt2_small", fromlist=["config"])
# As tests/test_init_from.py's runs, whose compiled steps the shared compilation cache then holds.
KEYS = ("size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1",
        "mesh.data=1", "mesh.fsdp=-1", "optim.schedule=constant", "optim.warmup_steps=0", "checkpoint.async_save=false")


def error_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train.main(EXPERIMENT.config, argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_help_lists_the_experiment_arguments_and_describes_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(EXPERIMENT.config, ["--help", "size=tiny"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "size=base" in out and "one of base | tiny" in out
    lines = {line.split()[0].split("=", 1)[0]: line for line in out.splitlines()
             if line.startswith("  ") and "=" in line}
    for key in flat_keys(EXPERIMENT.config("tiny")):
        assert len(lines[key].split(None, 1)) == 2, f"{key} has no description: {lines[key]!r}"
    assert "model.d_model=128 " in lines["model.d_model"]  # the values of size=tiny
    assert "[relu | gelu | gelu_exact | gated_gelu | swiglu]" in lines["model.activation"]


def test_a_bad_integer_says_an_integer():
    with pytest.raises(ValueError, match=r"train.steps='ten' is not a valid int; give an integer, e.g. train.steps=100"):
        train.parse_args(EXPERIMENT.config, ["train.steps=ten"])
    with pytest.raises(ValueError, match=r"optim.b1='x' is not a valid float; give a number"):
        train.parse_args(EXPERIMENT.config, ["optim.b1=x"])


@pytest.mark.parametrize("seed", ["1e30", str(2 ** 64), str(2 ** 32), "-1"])
def test_seed_outside_what_the_generators_take_is_refused(seed):
    cfg = train.parse_args(EXPERIMENT.config, ["size=tiny", f"seed={seed}"])
    with pytest.raises(ValueError, match=r"seed=-?\d+ must be an integer in \[0, 4294967295\]"):
        cfg.validate()
    train.parse_args(EXPERIMENT.config, ["size=tiny", f"seed={2 ** 32 - 1}"]).validate()


def test_a_mesh_the_devices_cannot_fill_fails_before_the_tokenizer(tmp_path, capsys):
    err = error_of([*KEYS, "mesh.fsdp=3", f"workdir={tmp_path / 'run'}"], capsys)
    assert "mesh (data, fsdp, context, tensor)=(1, 3, 1, 1) has 3 devices but 8 are available" in err, err
    assert not os.path.exists(tmp_path / "run" / "tokenizer")  # no tokenizer trained first


def test_eval_losses_reach_the_console_and_the_closing_line_names_them(tok_path, tmp_path, capsys):
    result = train.main(EXPERIMENT.config, [*KEYS, "train.steps=2", "train.eval_every=1", "train.progress=true",
                                            f"data.tokenizer_path={tok_path}", f"workdir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert "step 1: eval loss " in err and "over 1 held-out batch (accuracy" in err, err
    assert f"step 2: eval loss {result.eval_loss:.3f} over 1 held-out batch" in err, err
    assert "eval_loss=" in err  # in the progress bar's postfix after the first eval
    assert result.closing_line().startswith(f"last train batch loss {result.loss:.3f} (step 2); eval loss "
                                            f"{result.eval_loss:.3f} over 1 held-out batch (workdir")


def test_local_data_shows_no_downloading(tok_path, tmp_path, capfd):
    """datasets' "Downloading data" bar (shown for many local files) is misleading: nothing is downloaded."""
    cfg = DataConfig(source="stdlib", max_files=400, cache_dir=str(tmp_path / "cache"), tokenizer_path=tok_path)
    tokenizer = get_tokenizer(cfg, str(tmp_path), 2048)
    capfd.readouterr()
    make_iterator(cfg, tokenizer, "train", batch_size=8, seed=0)
    err = capfd.readouterr().err
    assert "tokenizing" in err and "Downloading" not in err, err  # other progress still shows
