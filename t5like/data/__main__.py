"""Command line for the data pipeline.

    python -m t5like.data train-tokenizer --out DIR --vocab-size 32128 [--source files --paths 'c/*.txt']
    (DIR may be gs://bucket/path)
    python -m t5like.data preview --tokenizer DIR/spm.model --vocab-size 32128 --objective span_corruption
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from t5like.data.config import FORMATS, OBJECTIVES, SOURCES, DataConfig


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=SOURCES, default="stdlib")
    p.add_argument("--paths", nargs="*", default=[], help="files, directories or globs (source=files)")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--text-field", default="text")
    p.add_argument("--hub-name", default="")
    p.add_argument("--hub-config", default="")
    p.add_argument("--max-files", type=int, default=0)
    p.add_argument("--num-sentinels", type=int, default=100)
    p.add_argument("--vocab-size", type=int, required=True, help="model vocabulary size, sentinels included")


def _config(args: argparse.Namespace, **extra) -> DataConfig:
    return DataConfig(source=args.source, paths=tuple(args.paths), format=args.format, text_field=args.text_field,
                      hub_name=args.hub_name, hub_config=args.hub_config, max_files=args.max_files,
                      num_sentinels=args.num_sentinels, **extra).validate()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m t5like.data")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-tokenizer", help="train a SentencePiece model into DIR/spm.model")
    train.add_argument("--out", required=True, help="output directory")
    train.add_argument("--train-chars", type=int, default=DataConfig.tokenizer_train_chars)
    _add_source_args(train)
    preview = sub.add_parser("preview", help="print a few decoded rows of a batch")
    preview.add_argument("--tokenizer", default="", help="spm.model; default: train one into --workdir")
    preview.add_argument("--workdir", default="runs/preview")
    preview.add_argument("--objective", choices=OBJECTIVES, default="lm")
    preview.add_argument("--seq-len", type=int, default=128)
    preview.add_argument("--batch-size", type=int, default=2)
    preview.add_argument("--split", choices=("train", "validation"), default="train")
    _add_source_args(preview)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from t5like import storage
    from t5like.data.tokenizer import train_tokenizer
    from t5like.data.vocabulary import get_tokenizer, training_texts

    if args.command == "train-tokenizer":
        storage.check_workdir(args.out, "--out")  # local or gs://; refused before reading any text
        cfg = _config(args, tokenizer_train_chars=args.train_chars)
        tok = train_tokenizer(training_texts(cfg), args.out, args.vocab_size, cfg.num_sentinels, args.train_chars)
        print(f"wrote {args.out}/spm.model: {tok.piece_size} pieces + {cfg.num_sentinels} sentinels "
              f"= vocab_size {args.vocab_size}")
        return 0

    from t5like.data.pipeline import make_iterator

    cfg = _config(args, tokenizer_path=args.tokenizer, objective=args.objective, seq_len=args.seq_len)
    tok = get_tokenizer(cfg, args.workdir, args.vocab_size)
    batch = next(make_iterator(cfg, tok, args.split, batch_size=args.batch_size, seed=0,
                               process_index=0, process_count=1))
    print(json.dumps(dataclasses.asdict(cfg)))
    for key, value in batch.items():
        print(f"{key:20s} {value.dtype} {value.shape}")
    for key in ("inputs", "encoder_inputs", "targets"):
        if key in batch:
            print(f"--- {key}[0] ---\n{tok.decode(batch[key][0])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
