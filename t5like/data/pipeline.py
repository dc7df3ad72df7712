"""Batches for the trainer: tokenise -> pack -> objective, with exact, O(1) resume.

Local sources (stdlib, files) are tokenised once with `datasets.map` (cached by HF datasets) and packed
into a flat `PackedTable`. An epoch visits its rows in a permutation seeded by (seed, epoch), and random
objectives draw from a Generator seeded by (seed, epoch, row). A batch is therefore a pure function of
the iterator position, and the whole state is two ints: {"epoch", "index"}.

The hub source streams: documents are tokenised as they arrive and packed through a carry-over buffer.
Its state is the IterableDataset's own `state_dict()` plus that buffer and a row counter.
"""
from __future__ import annotations

from typing import Any, Iterator

import datasets
import numpy as np
import pyarrow.compute as pc

from t5like.data import sources
from t5like.data.config import CHAT_OBJECTIVES, DataConfig
from t5like.data.instruct import PreferenceTable, SFTTable
from t5like.data.objectives import Objective, make_objective
from t5like.data.packing import PackedTable, StreamPacker
from t5like.data.tasks import TASK_FIELDS, TaskTable
from t5like.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
_PERMUTATION, _ROW = 0, 1  # tags that keep the two uses of the seed independent


def _seed_words(seed: int) -> int:
    return seed % 2 ** 64  # SeedSequence wants a non-negative int; any Python int maps to one


def _row_rngs(seed: int, epochs: np.ndarray, rows: np.ndarray) -> list[np.random.Generator]:
    """One Generator per row, keyed on (seed, epoch, row): the same row gets fresh noise every epoch."""
    # Padding rows of an eval pass have id -1; SeedSequence wants non-negative words, so they get 2**32.
    return [np.random.default_rng([_seed_words(seed), _ROW, int(e), int(r) if r >= 0 else 2 ** 32])
            for e, r in zip(epochs, rows)]


class _EncodeBatch:
    """datasets.map function: text -> ids + EOS. A class (not a closure) so it pickles for num_proc > 1."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"ids": [ids + [self.tokenizer.eos_id] for ids in self.tokenizer.encode_batch(batch["text"])]}


def tokenize_documents(ds: datasets.Dataset, tokenizer: Tokenizer, num_proc: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All documents' ids (each ending in EOS) concatenated, and the per-document lengths."""
    ids = ds.map(_EncodeBatch(tokenizer), batched=True, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=ds.column_names, desc="tokenizing",
                 features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}))
    column = ids.with_format("arrow")[:]["ids"]
    tokens = pc.list_flatten(column).to_numpy().astype(np.int32, copy=False)
    return tokens, pc.list_value_length(column).to_numpy().astype(np.int64)


class BatchIterator:
    """Batches from a PackedTable. Train: infinite, reshuffled every epoch. Eval: one pass, in order.

    A batch may straddle two epochs, so no row is ever dropped and any batch size works. An eval pass
    pads its last batch with all-zero rows (weight 0); with `num_batches` it yields exactly that many
    batches, padding or stopping early as needed, so every host of a multi-host eval runs the same
    number of steps. A finished eval pass restarts from the beginning on the next iteration.
    """

    def __init__(self, table: PackedTable | TaskTable | SFTTable | PreferenceTable, objective: Objective | None, *, batch_size: int, seed: int,
                 shuffle: bool, infinite: bool, num_batches: int | None = None, host: tuple[int, int] = (0, 1)):
        self.table, self.objective = table, objective
        self.batch_size, self.seed = batch_size, seed
        # Every host holds the whole table and walks the same global order; host h of n takes rows
        # [h*B/n, (h+1)*B/n) of each global batch of B rows. The position is therefore global (the same on
        # every host, whatever their number), and a row's random draws depend on its global row id only.
        self.host_index, self.host_count = host
        if batch_size % self.host_count:
            raise ValueError(f"global batch_size={batch_size} does not divide over {self.host_count} hosts")
        self.shuffle, self.infinite, self.num_batches = shuffle, infinite, num_batches
        self.num_rows = table.num_rows
        self._epoch, self._index, self._emitted = 0, 0, 0
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation), cached

    def state(self) -> dict[str, int]:
        """JSON-serialisable position: save it with the checkpoint, pass it to restore() later."""
        return {"epoch": self._epoch, "index": self._index, "emitted": self._emitted,
                "num_rows": self.num_rows, "batch_size": self.batch_size}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (same data, seed and batch size)."""
        for key, mine in (("num_rows", self.num_rows), ("batch_size", self.batch_size)):
            if state.get(key) != mine:
                raise ValueError(f"cannot resume data iterator: the checkpoint has {key}={state.get(key)} but this "
                                 f"run has {key}={mine}; the data, seq_len, batch size or host count changed")
        self._epoch, self._index, self._emitted = int(state["epoch"]), int(state["index"]), int(state["emitted"])

    def reset(self) -> None:
        self._epoch, self._index, self._emitted = 0, 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([_seed_words(self.seed), _PERMUTATION, epoch])
            self._perm = (epoch, rng.permutation(self.num_rows))
        return self._perm[1]

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        B = self.batch_size
        if not self.infinite:
            done = (self._emitted >= self.num_batches if self.num_batches is not None
                    else self._index >= self.num_rows)
            if done:
                self.reset()  # so the next `for batch in it` is a fresh pass
                raise StopIteration
        rows, epochs = [], []
        while sum(map(len, rows)) < B:
            if self._index >= self.num_rows:
                if not self.infinite:  # pad the end of an eval pass
                    rows.append(np.full(B - sum(map(len, rows)), -1))
                    epochs.append(np.full(len(rows[-1]), self._epoch))
                    break
                self._epoch, self._index = self._epoch + 1, 0
            take = min(B - sum(map(len, rows)), self.num_rows - self._index)
            rows.append(self._order(self._epoch)[self._index:self._index + take])
            epochs.append(np.full(take, self._epoch))
            self._index += take
        self._emitted += 1
        share = B // self.host_count
        mine = slice(self.host_index * share, (self.host_index + 1) * share)
        row_ids, row_epochs = np.concatenate(rows)[mine], np.concatenate(epochs)[mine]
        if self.objective is None:  # a TaskTable: rows are whole, already-built examples
            return self.table.rows(row_ids)
        tokens, segment_ids, positions = self.table.rows(row_ids)
        rngs = _row_rngs(self.seed, row_epochs, row_ids) if self.objective.is_random else None
        return self.objective(tokens, segment_ids, positions, rngs)


class StreamingBatchIterator:
    """Batches from a streaming IterableDataset (source="hub"), packed on the fly.

    Resume is exact when the stream is not shuffled; with shuffling, HF datasets refills the shuffle
    buffer on resume, so the documents after a resume differ (none are repeated within the epoch).
    The carry-over buffer is part of the state: at most one batch of tokens plus the last document.
    """

    def __init__(self, ds: datasets.IterableDataset, tokenizer: Tokenizer, objective: Objective, *,
                 batch_size: int, seed: int, infinite: bool, num_batches: int | None = None, read_ahead: int = 64):
        self.ds, self.tokenizer, self.objective = ds, tokenizer, objective
        self.batch_size, self.seed, self.infinite, self.num_batches = batch_size, seed, infinite, num_batches
        self.read_ahead = read_ahead  # most documents tokenised together (spm encodes a list on all cores)
        self.reset()

    def reset(self) -> None:
        self._packer = StreamPacker(self.objective.row_len)
        self._epoch, self._rows, self._emitted, self._exhausted = 0, 0, 0, False
        self._docs_this_epoch = 0
        self._tokens_read, self._docs_read = 0, 0  # for sizing reads; not state: they only affect speed
        self._it: Iterator[dict] | None = None
        self._restored_stream: dict | None = None  # reported by state() until the restored stream moves
        self.ds.load_state_dict(None)  # forget any restored position

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: the stream's state_dict, the buffered tokens and counters."""
        return {"epoch": self._epoch, "rows": self._rows, "emitted": self._emitted, "exhausted": self._exhausted,
                "docs_this_epoch": self._docs_this_epoch, "buffer": self._packer.state(),
                "stream": self._stream_state(), "batch_size": self.batch_size}

    def _stream_state(self) -> dict | None:
        if self._restored_stream is not None:
            return self._restored_stream
        return self.ds.state_dict() if self._it is not None else None

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("batch_size") != self.batch_size:
            raise ValueError(f"cannot resume data iterator: checkpoint batch_size={state.get('batch_size')}, "
                             f"this run {self.batch_size}")
        self.reset()
        self._epoch, self._rows, self._emitted = state["epoch"], state["rows"], state["emitted"]
        self._exhausted, self._docs_this_epoch = state["exhausted"], state["docs_this_epoch"]
        self._packer.restore(state["buffer"])
        if state["stream"] is not None:
            self.ds.set_epoch(self._epoch)
            self.ds.load_state_dict(state["stream"])
            self._it = iter(self.ds)
            self._restored_stream = state["stream"]

    def _read_documents(self, num_docs: int) -> None:
        """Tokenise up to `num_docs` more documents into the buffer (fewer if a finite stream ends)."""
        texts = []
        while len(texts) < num_docs:
            if self._it is None:
                self.ds.set_epoch(self._epoch)  # reshuffles shards/buffer per epoch
                self._it = iter(self.ds)
            try:
                text = next(self._it)["text"]
            except StopIteration:
                self._it = self._restored_stream = None
                if not self.infinite:
                    self._exhausted = True
                    break
                if self._docs_this_epoch == 0:
                    raise ValueError("the stream has no documents with text (this host's share is empty)")
                self._epoch, self._docs_this_epoch = self._epoch + 1, 0
                continue
            self._restored_stream = None
            if text:
                texts.append(text)
                self._docs_this_epoch += 1
        for ids in self.tokenizer.encode_batch(texts):
            self._packer.add(np.asarray(ids + [self.tokenizer.eos_id], np.int32))
            self._tokens_read, self._docs_read = self._tokens_read + len(ids) + 1, self._docs_read + 1

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        B, row_len = self.batch_size, self.objective.row_len
        while self._packer.num_tokens < B * row_len and not self._exhausted:
            # Read about as many documents as the batch still needs (by the mean length so far), so the
            # carry-over buffer, which is saved in every checkpoint, stays small.
            missing = B * row_len - self._packer.num_tokens
            mean = self._tokens_read / self._docs_read if self._docs_read else float("inf")
            self._read_documents(min(self.read_ahead, max(1, int(missing / mean))))
        if not self.infinite:
            done = (self._emitted >= self.num_batches if self.num_batches is not None
                    else self._exhausted and self._packer.num_tokens == 0)
            if done:
                self.reset()
                raise StopIteration
        tokens, segment_ids, positions = self._packer.pop_rows(B)
        rows = np.arange(self._rows, self._rows + B)
        self._rows += B
        self._emitted += 1
        rngs = _row_rngs(self.seed, np.zeros_like(rows), rows) if self.objective.is_random else None
        return self.objective(tokens, segment_ids, positions, rngs)


def make_iterator(cfg: DataConfig, tokenizer: Tokenizer, split: str, *, batch_size: int, seed: int,
                  process_index: int | None = None, process_count: int | None = None,
                  num_batches: int | None = None) -> BatchIterator | StreamingBatchIterator:
    """Batches of `cfg.objective` for this host: dicts of numpy arrays, [batch_size, ...] each.

    split: "train" (infinite, shuffled when cfg.shuffle) or "validation" (one ordered pass, repeatable).
    batch_size: rows per batch on THIS host. process_index/count default to jax's. Local sources: every
    host reads all documents and takes its rows of each global batch, so the order, the random draws
    and the saved position do not depend on the host count. The hub source streams a disjoint share of
    the documents to each host. num_batches (validation only): yield exactly this many batches.
    Keys per objective are listed in t5like.data.objectives; `it.state()` / `it.restore(state)` resume.
    """
    cfg.validate()
    if split not in ("train", "validation", "all"):
        raise ValueError(f"split={split!r} must be 'train', 'validation' or 'all' (a named eval set read whole)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int (rows per host)")
    if num_batches is not None and (split == "train" or num_batches < 1):
        raise ValueError(f"num_batches={num_batches!r} is for evaluation splits only, and must be >= 1")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    train = split == "train"
    if cfg.objective in CHAT_OBJECTIVES:  # conversations (packed) or preference pairs (one a row)
        table = (SFTTable if cfg.objective == "sft" else PreferenceTable)(cfg, tokenizer, split)
        return BatchIterator(table, None, batch_size=batch_size * process_count, seed=seed,
                             shuffle=train and cfg.shuffle, infinite=train, num_batches=num_batches,
                             host=(process_index, process_count))
    if cfg.objective in TASK_FIELDS:  # labelled examples, one per row (fine-tuning); hosts as for local text
        return BatchIterator(TaskTable(cfg, tokenizer, split), None, batch_size=batch_size * process_count,
                             seed=seed, shuffle=train and cfg.shuffle, infinite=train, num_batches=num_batches,
                             host=(process_index, process_count))
    objective = make_objective(cfg, tokenizer)

    if cfg.source == "hub":
        ds = sources.open_stream(cfg, split, process_index, process_count, shuffle=train and cfg.shuffle, seed=seed)
        return StreamingBatchIterator(ds, tokenizer, objective, batch_size=batch_size, seed=seed, infinite=train,
                                      num_batches=num_batches)
    docs = sources.load_documents(cfg, split, 0, 1)
    tokens, lengths = tokenize_documents(docs, tokenizer, cfg.num_proc)
    table = PackedTable.from_lengths(tokens, lengths, objective.row_len)
    return BatchIterator(table, objective, batch_size=batch_size * process_count, seed=seed,
                         shuffle=train and cfg.shuffle, infinite=train, num_batches=num_batches,
                         host=(process_index, process_count))
