"""t5like.data: text -> SentencePiece ids -> packed rows -> batches for one of four objectives.

    cfg = DataConfig(objective="span_corruption", seq_len=512)
    tokenizer = get_tokenizer(cfg, workdir, vocab_size=32128)
    train = make_iterator(cfg, tokenizer, "train", batch_size=per_host_batch, seed=0)
    batch = next(train)            # dict of numpy arrays; keys in t5like.data.objectives
    state = train.state()          # small JSON dict; train.restore(state) resumes exactly
"""
from t5like.data.config import DataConfig
from t5like.data.objectives import Objective, batch_shapes, make_objective
from t5like.data.pipeline import BatchIterator, MixtureIterator, StreamingBatchIterator, make_iterator
from t5like.data.tokenizer import Tokenizer, train_tokenizer
from t5like.data.vocabulary import get_tokenizer

__all__ = ["DataConfig", "Tokenizer", "get_tokenizer", "train_tokenizer", "make_iterator", "BatchIterator",
           "StreamingBatchIterator", "MixtureIterator", "Objective", "make_objective", "batch_shapes"]
