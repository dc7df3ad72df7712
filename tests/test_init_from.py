"""checkpoint.init_from (issue 22): a fine-tune takes the source's model and tokenizer unless the command line
sets them, refuses every model difference that changes the function (all of them named), and resumes without
its source. Training runs are in-process, tiny (the gpt2_small experiment at size=tiny) and 1-2 steps long."""
import dataclasses
import math
import os
import shutil

import numpy as np
import pytest
from flax import nnx, traverse_util

from t5like import finetune, train
from t5like.checkpoint import read_config
from t5like.inference import load_for_inference



# Data and run keys only: no model.* key anywhere.
RUN_KEYS = ("size=tiny", "data.max_files=40", "data.seq_len=32", "train.batch_size=8", "train.eval_steps=1",
            "train.eval_every=0", "train.progress=false", "mesh.data=1", "mesh.fsdp=-1", "optim.schedule=constant",
            "optim.warmup_steps=0", "checkpoint.async_save=false")


def parse(workdir, *extra):
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    return train.parse_args(module.config, [*RUN_KEYS, f"workdir={workdir}", *extra])


def flat_params(workdir) -> dict:
    return traverse_util.flatten_dict(nnx.state(load_for_inference(str(workdir))[1]).to_pure_dict())


@pytest.fixture(scope="module")
def imported_gpt2(tmp_path_factory):
    """A random transformers GPT-2 (odd shapes: 3 heads, a 1001-id vocabulary, 64 positions) with a byte-level
    BPE tokenizer, imported by `python -m t5like.hf import`'s function."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from t5like.hf.__main__ import import_checkpoint
    from test_hf import byte_bpe
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=48, n_head=3, n_layer=2, vocab_size=1001, n_positions=64, bos_token_id=0, eos_token_id=0)
    ).save_pretrained(str(root / "hf"))
    byte_bpe(str(root / "hf"), 600, ["<|endoftext|>"])
    import_checkpoint(str(root / "hf"), str(root / "run"))
    return str(root / "run")


def test_imported_checkpoint_fine_tunes_with_no_model_keys(imported_gpt2, tmp_path):
    cfg = parse(tmp_path / "ft", f"checkpoint.init_from={imported_gpt2}", "train.steps=1")
    result = train.train(cfg)
    src = read_config(imported_gpt2)
    assert cfg.model == dataclasses.replace(src.model, dropout=cfg.model.dropout)  # dropout is the experiment's
    assert cfg.data.tokenizer_path == src.data.tokenizer_path
    assert result.step == 1 and math.isfinite(result.loss) and math.isfinite(result.eval_loss)
    # Every parameter came from the import and took one Adam step (each entry moves about lr = 2e-3): a fresh
    # init would be ~0.1 away.
    before, after = flat_params(imported_gpt2), flat_params(tmp_path / "ft")
    assert before.keys() == after.keys()
    for k in before:
        assert np.abs(np.asarray(after[k]) - np.asarray(before[k])).max() < 0.01, k


def test_function_changing_overrides_are_refused_naming_every_one(imported_gpt2, tmp_path):
    cfg = parse(tmp_path / "ft", f"checkpoint.init_from={imported_gpt2}", "model.activation=relu",
                "model.norm_placement=post", "model.scale_embeddings=true", "model.norm_eps=1e-6",
                "model.scale_attention=false", "model.embedding_norm=true")
    with pytest.raises(ValueError) as e:
        train.train(cfg)
    message = str(e.value)
    for diff in ("model.activation='relu' here but 'gelu' there", "model.norm_placement='post' here but 'pre' there",
                 "model.scale_embeddings=True here", "model.norm_eps=1e-06 here but 1e-05 there",
                 "model.scale_attention=False here", "model.embedding_norm=True here"):
        assert diff in message, message
    assert not os.path.exists(tmp_path / "ft" / "checkpoints")  # refused before any work


def test_shape_differences_are_all_listed_and_fine_tuning_settings_may_differ(imported_gpt2, tmp_path):
    cfg = parse(tmp_path / "ft", f"checkpoint.init_from={imported_gpt2}", "model.d_ff=96", "model.vocab_size=1024")
    with pytest.raises(ValueError) as e:
        finetune.init_from_plan(cfg)
    message = str(e.value)
    assert "model.d_ff=96 here but 192 there" in message and "model.vocab_size=1024 here but 1001 there" in message
    assert "decoder/layers/mlp/wi has shape (2, 48, 192) there but (2, 48, 96) here" in message
    assert "embed/embedding has shape (1001, 48) there but (1024, 48) here" in message, message
    # Compute-only settings and dropout are the fine-tune's own.
    free = parse(tmp_path / "ft", f"checkpoint.init_from={imported_gpt2}", "model.dropout=0.0", "model.remat=full",
                 "model.dtype=bfloat16", "model.scan_unroll=1", "model.attention_impl=xla")
    assert finetune.init_from_plan(free)


@pytest.fixture(scope="module")
def source_run(tok_path, tmp_path_factory):
    """A 1-step run of the tiny GPT-2 (learned positions, GELU, pre-norm LayerNorm, eps 1e-5)."""
    src = tmp_path_factory.mktemp("source") / "run"
    train.train(parse(src, f"data.tokenizer_path={tok_path}", "train.steps=1"))
    return src


def test_same_shapes_computing_another_function_are_refused(source_run, tok_path, tmp_path):
    """Each of these loads every parameter with its shape, and makes another model of them."""
    cfg = parse(tmp_path / "ft", f"data.tokenizer_path={tok_path}", f"checkpoint.init_from={source_run}",
                "model.activation=relu", "model.norm_placement=post", "model.scale_embeddings=true",
                "model.norm_eps=1e-6", "model.scale_attention=false", "model.rope_theta=500")
    with pytest.raises(ValueError) as e:
        train.train(cfg)
    message = str(e.value)
    for key in ("activation", "norm_placement", "scale_embeddings", "norm_eps", "scale_attention"):
        assert f"model.{key}=" in message, message
    assert "rope_theta" not in message and "has shape" not in message  # unused with learned positions
    assert not os.path.exists(tmp_path / "ft" / "checkpoints")


def test_fine_tune_resumes_after_its_source_moved_and_a_fresh_start_without_it_fails(source_run, tok_path, tmp_path,
                                                                                       capsys):
    src, ft = tmp_path / "src", tmp_path / "ft"
    shutil.copytree(source_run, src)
    train.train(parse(ft, f"data.tokenizer_path={tok_path}", f"checkpoint.init_from={src}", "train.steps=1"))
    shutil.move(src, tmp_path / "moved")
    capsys.readouterr()
    result = train.train(parse(ft, f"data.tokenizer_path={tok_path}", f"checkpoint.init_from={src}", "train.steps=2"))
    assert result.step == 2 and "resumed from" in capsys.readouterr().err
    # A fresh start still checks its source first, before any work.
    module = __import__("experiments.gpt2_small", fromlist=["config"])
    with pytest.raises(SystemExit):
        train.main(module.config, [*RUN_KEYS, f"workdir={tmp_path / 'fresh'}", f"checkpoint.init_from={src}",
                                   f"data.tokenizer_path={tok_path}"])
    err = capsys.readouterr().err
    assert f"checkpoint.init_from='{src}'" in err and "has no config.json" in err, err
    assert not os.path.exists(tmp_path / "fresh")
