"""Hugging Face checkpoints <-> t5like run directories.

    python -m t5like.hf import --hf HF_DIR --workdir RUN [--tokenizer DIR] [--fsdp N]
    python -m t5like.hf export --workdir RUN --out HF_DIR

import writes RUN/config.json, an orbax checkpoint at step 0 in RUN/checkpoints (params only) and the
checkpoint's tokenizer in RUN/tokenizer/, so that `python -m t5like.generate --workdir RUN` and training
with `checkpoint.init_from=RUN` accept it. export writes config.json + model.safetensors (+ the tokenizer
files of an imported run) that transformers' AutoModel*.from_pretrained loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional, Sequence

HF_CONFIG = "hf_config.json"  # the imported checkpoint's config.json, kept for its special ids on export


def import_checkpoint(hf_dir: str, workdir: str, *, tokenizer_dir: Optional[str] = None, fsdp: int = -1) -> dict:
    from t5like.checkpoint import checkpoint_dir
    from t5like.data.hf_tokenizer import has_tokenizer

    if not os.path.isdir(hf_dir):
        raise ValueError(f"--hf {hf_dir!r} is not a directory; pass a Hugging Face model directory.")
    tokenizer_dir = tokenizer_dir or hf_dir
    if not has_tokenizer(tokenizer_dir):
        raise ValueError(f"{tokenizer_dir!r} has no tokenizer (tokenizer.json, spiece.model or tokenizer.model); "
                         "generation and fine-tuning need the checkpoint's own: pass --tokenizer DIR.")
    if os.path.exists(os.path.join(workdir, "config.json")) or os.path.exists(checkpoint_dir(workdir)):
        raise ValueError(f"--workdir {workdir!r} already holds a run; nothing was overwritten. Use a new workdir.")

    from flax import nnx

    from t5like.checkpoint import Checkpointer
    from t5like.config import CheckpointConfig, MeshConfig, to_dict
    from t5like.data.hf_tokenizer import HFTokenizer, copy_tokenizer
    from t5like.hf import load_pretrained, read_pretrained_config
    from t5like.hf.io import read_hf_config, write_json
    from t5like.sharding import Sharder, make_mesh
    from t5like.train import write_config

    # Everything that can be refused is checked before any weight is read.
    model_cfg, _, _ = read_pretrained_config(hf_dir)
    tokenizer = HFTokenizer(tokenizer_dir)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"the tokenizer in {tokenizer_dir!r} has {tokenizer.vocab_size} ids but the model's "
                         f"vocab_size is {model_cfg.vocab_size}: they do not belong together; pass the right --tokenizer.")
    mesh = make_mesh(MeshConfig(data=1, fsdp=fsdp))  # weights sharded over every device, never replicated
    cfg, model = load_pretrained(hf_dir, shard=Sharder(mesh))
    tok_out = os.path.join(workdir, "tokenizer")
    os.makedirs(workdir, exist_ok=True)
    copy_tokenizer(tokenizer_dir, tok_out)
    if tokenizer_dir != hf_dir:  # the special ids live in the model's config.json
        write_json(os.path.join(tok_out, "config.json"), read_hf_config(hf_dir))
    cfg = dataclasses.replace(cfg, workdir=workdir, data=dataclasses.replace(
        cfg.data, tokenizer_path=os.path.abspath(tok_out), num_sentinels=tokenizer.num_sentinels)).validate()
    write_json(os.path.join(workdir, HF_CONFIG), read_hf_config(hf_dir))
    write_config(cfg)
    ckpt = Checkpointer(checkpoint_dir(workdir), CheckpointConfig(async_save=False))
    try:
        ckpt.save(0, {"params": nnx.state(model).to_pure_dict()}, {}, to_dict(cfg))
    finally:
        ckpt.close()
    return {"workdir": workdir, "family": cfg.model.family, "tokenizer": tok_out}


def export_checkpoint(workdir: str, out_dir: str) -> str:
    from t5like.inference import load_for_inference
    from t5like.data.hf_tokenizer import FILES, HFTokenizer
    from t5like.hf import save_pretrained
    from t5like.hf.common import special_ids
    from t5like.hf.io import read_json

    if os.path.exists(os.path.join(out_dir, "config.json")):
        raise ValueError(f"--out {out_dir!r} already holds a model (config.json); nothing was overwritten. "
                         "Pass a new directory.")
    cfg, model, tokenizer = load_for_inference(workdir)
    imported = os.path.join(workdir, HF_CONFIG)
    if os.path.isfile(imported):
        ids = special_ids(read_json(imported))
    else:  # a t5like run: its SentencePiece conventions
        ids = {"pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id, "decoder_start_token_id": 0}
    architecture = save_pretrained(model, out_dir, special_ids=ids)
    if isinstance(tokenizer, HFTokenizer):
        import shutil
        for f in FILES:
            if f != "config.json" and os.path.isfile(os.path.join(tokenizer.directory, f)):
                shutil.copyfile(os.path.join(tokenizer.directory, f), os.path.join(out_dir, f))
    return architecture


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m t5like.hf", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="a Hugging Face directory -> a t5like workdir")
    imp.add_argument("--hf", required=True, help="config.json + *.safetensors (+ tokenizer files)")
    imp.add_argument("--workdir", required=True, help="a new t5like run directory")
    imp.add_argument("--tokenizer", default=None, help="where the tokenizer files are, if not in --hf")
    imp.add_argument("--fsdp", type=int, default=-1, help="devices to shard the weights over (-1: all)")
    exp = sub.add_parser("export", help="a t5like workdir -> a Hugging Face directory")
    exp.add_argument("--workdir", required=True)
    exp.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.command == "import":
        info = import_checkpoint(args.hf, args.workdir, tokenizer_dir=args.tokenizer, fsdp=args.fsdp)
        print(json.dumps(info))
    else:
        print(json.dumps({"out": args.out, "architecture": export_checkpoint(args.workdir, args.out)}))
    return 0


if __name__ == "__main__":
    from t5like.cli import run
    run(main)
