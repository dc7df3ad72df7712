"""The run's tokenizer: the one data.tokenizer_path names, or one trained on the run's own training text.

Sits above the modules it joins (the SentencePiece tokenizer, document sources and fine-tuning tasks),
so that none of them imports another's caller.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

from t5like import storage
from t5like.data import instruct, sources, tasks
from t5like.data.config import DataConfig
from t5like.data.hf_tokenizer import HFTokenizer
from t5like.data.tokenizer import Tokenizer, train_tokenizer


def training_texts(cfg: DataConfig) -> Iterator[str]:
    """The text a tokenizer is fitted on: a task's text fields, or the training split's documents."""
    if cfg.objective in tasks.TASK_FIELDS:
        return tasks.training_texts(cfg)
    if cfg.objective in ("sft", "dpo"):
        return instruct.training_texts(cfg)
    return sources.training_texts(cfg)


def _train_into(cfg: DataConfig, final: str, vocab_size: int) -> None:
    """Train in a local temporary directory, then publish: a rename locally; on Cloud Storage one upload
    per file with spm.model last, so its presence means the tokenizer is complete."""
    if storage.is_remote(final):  # train_tokenizer writes one upload per file, spm.model last
        train_tokenizer(training_texts(cfg), final, vocab_size, cfg.num_sentinels, cfg.tokenizer_train_chars)
        return
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    try:
        train_tokenizer(training_texts(cfg), tmp, vocab_size, cfg.num_sentinels, cfg.tokenizer_train_chars)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, "spm.model")):  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def get_tokenizer(cfg: DataConfig, workdir: str, vocab_size: int) -> Tokenizer:
    """The run's tokenizer: cfg.tokenizer_path if set (a SentencePiece .model, or a Hugging Face checkpoint's
    directory, read by t5like.data.hf_tokenizer), else WORKDIR/tokenizer/spm.model, trained on first use.

    Training reads up to cfg.tokenizer_train_chars of training-split text on host 0, writes to a temporary
    directory and publishes it whole (see _train_into), so a crash never leaves a half-written tokenizer
    behind; the other hosts wait for it. WORKDIR may be gs://.
    """
    cfg.validate()
    if cfg.tokenizer_path and os.path.isdir(cfg.tokenizer_path):  # a Hugging Face checkpoint's tokenizer
        tokenizer = HFTokenizer(cfg.tokenizer_path)
        if tokenizer.vocab_size > vocab_size:
            raise ValueError(f"the tokenizer in data.tokenizer_path={cfg.tokenizer_path!r} has {tokenizer.vocab_size} "
                             f"ids but model.vocab_size={vocab_size}; use the model that came with it.")
        if tokenizer.num_sentinels != cfg.num_sentinels:
            raise ValueError(f"data.num_sentinels={cfg.num_sentinels} but the tokenizer in {cfg.tokenizer_path!r} "
                             f"has {tokenizer.num_sentinels}; set data.num_sentinels={tokenizer.num_sentinels}.")
        return tokenizer
    if cfg.tokenizer_path:
        return Tokenizer.from_file(cfg.tokenizer_path, vocab_size, cfg.num_sentinels)
    final = storage.join(workdir, "tokenizer")
    path = storage.join(final, "spm.model")
    import jax  # only here: everything else in t5like.data works without initialising a backend

    missing = not storage.exists(path)
    if jax.process_count() > 1:  # host 0's view decides, so every host takes the same branch
        from jax.experimental import multihost_utils
        import numpy as np
        missing = bool(multihost_utils.broadcast_one_to_all(np.array(missing)))
    if missing:
        # One host trains, the others wait for it: hosts training separately could differ.
        if jax.process_index() == 0:
            _train_into(cfg, final, vocab_size)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("t5like: tokenizer trained")
    tokenizer = Tokenizer.from_file(path, vocab_size, cfg.num_sentinels)
    if tokenizer.piece_size != vocab_size - cfg.num_sentinels:
        raise ValueError(f"{path} was trained for vocab_size={tokenizer.piece_size + cfg.num_sentinels}, not "
                         f"vocab_size={vocab_size}; delete {final} to retrain, or use a new workdir")
    return tokenizer
