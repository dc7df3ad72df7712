"""Batches for the trainer: tokenise -> pack -> objective, with exact, O(1) resume.

Local sources (stdlib, files) are tokenised once with `datasets.map` (cached by HF datasets) and packed
into a flat `PackedTable`. An epoch visits its rows in a permutation seeded by (seed, epoch), and random
objectives draw from a Generator seeded by (seed, epoch, row). A batch is therefore a pure function of
the iterator position, and the whole state is two ints: {"epoch", "index"}.

A mixture (data.mixture) draws each global row from one of several such sources by weight
(MixtureIterator); its state is a row count plus each source's own state.

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

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next `n` rows of the global order and their epochs (a mixture draws its share this way)."""
        rows, epochs, have = [], [], 0
        while have < n:
            if self._index >= self.num_rows:
                if not self.infinite:  # pad the end of an eval pass
                    rows.append(np.full(n - have, -1))
                    epochs.append(np.full(n - have, self._epoch))
                    break
                self._epoch, self._index = self._epoch + 1, 0
            count = min(n - have, self.num_rows - self._index)
            rows.append(self._order(self._epoch)[self._index:self._index + count])
            epochs.append(np.full(count, self._epoch))
            self._index += count
            have += count
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(rows), np.concatenate(epochs)

    def make(self, row_ids: np.ndarray, row_epochs: np.ndarray) -> Batch:
        """The batch of these rows (global ids; -1 = padding), the objective's draws keyed on (seed, epoch, row)."""
        if self.objective is None:  # a TaskTable: rows are whole, already-built examples
            return self.table.rows(row_ids)
        tokens, segment_ids, positions = self.table.rows(row_ids)
        rngs = _row_rngs(self.seed, row_epochs, row_ids) if self.objective.is_random else None
        return self.objective(tokens, segment_ids, positions, rngs)

    def __next__(self) -> Batch:
        B = self.batch_size
        if not self.infinite:
            done = (self._emitted >= self.num_batches if self.num_batches is not None
                    else self._index >= self.num_rows)
            if done:
                self.reset()  # so the next `for batch in it` is a fresh pass
                raise StopIteration
        row_ids, row_epochs = self.take(B)
        self._emitted += 1
        share = B // self.host_count
        mine = slice(self.host_index * share, (self.host_index + 1) * share)
        return self.make(row_ids[mine], row_epochs[mine])


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

    def _fill(self, num_rows: int) -> None:
        row_len = self.objective.row_len
        while self._packer.num_tokens < num_rows * row_len and not self._exhausted:
            # Read about as many documents as the batch still needs (by the mean length so far), so the
            # carry-over buffer, which is saved in every checkpoint, stays small.
            missing = num_rows * row_len - self._packer.num_tokens
            mean = self._tokens_read / self._docs_read if self._docs_read else float("inf")
            self._read_documents(min(self.read_ahead, max(1, int(missing / mean))))

    def take_batch(self, num_rows: int) -> Batch:
        """The next `num_rows` rows of this host's stream, as a batch (a mixture draws its share this way)."""
        self._fill(num_rows)
        tokens, segment_ids, positions = self._packer.pop_rows(num_rows)
        rows = np.arange(self._rows, self._rows + num_rows)
        self._rows += num_rows
        rngs = _row_rngs(self.seed, np.zeros_like(rows), rows) if self.objective.is_random else None
        return self.objective(tokens, segment_ids, positions, rngs)

    def __next__(self) -> Batch:
        self._fill(self.batch_size)
        if not self.infinite:
            done = (self._emitted >= self.num_batches if self.num_batches is not None
                    else self._exhausted and self._packer.num_tokens == 0)
            if done:
                self.reset()
                raise StopIteration
        self._emitted += 1
        return self.take_batch(self.batch_size)


# Weyl sequence step: 2**64 / golden ratio, odd. Its fractional parts are the most evenly spread of any
# rotation, so every stretch of rows gets each source's share to within a few rows.
_WEYL = 0x9E3779B97F4A7C15
_MIX = 2


class MixtureIterator:
    """Batches drawn from several sources by weight (data.mixture), with stages (data.mixture_stages).

    Global row g (counted over the whole run, on every host alike) goes to the source whose slice of [0, 1),
    cut by the current stage's cumulative weights, holds u_g = frac(phase + g * golden ratio); phase comes
    from the seed. Each source then gives its next rows in its own order (a local source's epoch permutation,
    a hub source's stream). Host h takes rows [h*B/n, (h+1)*B/n) of each global batch, as BatchIterator does,
    so the assignment, the local sources' positions and the saved state do not depend on the host count.
    The state is the global row count, the batch count, and each source's own state.
    """

    def __init__(self, names: list[str], parts: list, stages: list[tuple[int, tuple[float, ...]]], *,
                 batch_size: int, seed: int, infinite: bool, num_batches: int | None = None,
                 host: tuple[int, int] = (0, 1)):
        self.names, self.parts, self.stages = names, parts, stages
        self.batch_size, self.infinite, self.num_batches = batch_size, infinite, num_batches
        self.host_index, self.host_count = host
        if batch_size % self.host_count:
            raise ValueError(f"global batch_size={batch_size} does not divide over {self.host_count} hosts")
        self.phase = int(np.random.default_rng([_seed_words(seed), _MIX]).integers(0, 2 ** 63)) * 2 + 1
        self.last_sources: np.ndarray | None = None  # the source index of every row of the last global batch
        self._rows, self._emitted = 0, 0

    def state(self) -> dict[str, Any]:
        return {"mixture": list(self.names), "rows": self._rows, "emitted": self._emitted,
                "batch_size": self.batch_size, "sources": {n: p.state() for n, p in zip(self.names, self.parts)}}

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("mixture") != list(self.names) or state.get("batch_size") != self.batch_size:
            raise ValueError(f"cannot resume data iterator: the checkpoint's mixture is {state.get('mixture')} with "
                             f"batch_size={state.get('batch_size')}, this run's {list(self.names)} with "
                             f"{self.batch_size}; the mixture's sources or the batch size changed")
        for name, part in zip(self.names, self.parts):
            try:
                part.restore(state["sources"][name])
            except ValueError as e:
                raise ValueError(f"mixture source {name!r}: {e}") from None
        self._rows, self._emitted = int(state["rows"]), int(state["emitted"])

    def reset(self) -> None:
        for p in self.parts:
            p.reset()
        self._rows, self._emitted = 0, 0

    def weights(self, step: int) -> tuple[float, ...]:
        """The normalised weights in force at training step `step` (1-based)."""
        return [w for start, w in self.stages if start <= step][-1]

    def sources(self, first_row: int, num_rows: int, step: int) -> np.ndarray:
        """The source index of global rows [first_row, first_row + num_rows) at `step`."""
        w = np.asarray(self.weights(step))
        cuts = np.cumsum(w)
        cuts[np.flatnonzero(w > 0)[-1]:] = 2.0  # the last source with weight takes what rounding leaves
        g = np.arange(first_row, first_row + num_rows, dtype=np.uint64)
        with np.errstate(over="ignore"):  # arithmetic mod 2**64, exactly the same on every host
            u = (np.uint64(self.phase) + g * np.uint64(_WEYL)) >> np.uint64(11)
        return np.searchsorted(cuts, u.astype(np.float64) / 2.0 ** 53, side="right")

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        B = self.batch_size
        if not self.infinite and self._emitted >= self.num_batches:
            self.reset()
            raise StopIteration
        src = self.sources(self._rows, B, self._emitted + 1)
        share = B // self.host_count
        mine = slice(self.host_index * share, (self.host_index + 1) * share)
        out: dict[str, np.ndarray] = {}
        for s, part in enumerate(self.parts):
            rows_s = np.flatnonzero(src == s)
            if isinstance(part, BatchIterator):  # every host walks every local source's global order
                ids, epochs = part.take(len(rows_s))
                local = (rows_s >= mine.start) & (rows_s < mine.stop)
                if not local.any():
                    continue
                batch = part.make(ids[local], epochs[local])
            else:  # a hub stream: this host's own share, for its own rows only
                local_count = int(((rows_s >= mine.start) & (rows_s < mine.stop)).sum())
                if not local_count:
                    continue
                batch = part.take_batch(local_count)
                local = (rows_s >= mine.start) & (rows_s < mine.stop)
            at = rows_s[local] - mine.start
            for k, v in batch.items():
                if k not in out:
                    out[k] = np.zeros((share, *v.shape[1:]), v.dtype)
                out[k][at] = v
        self.last_sources = src
        self._rows += B
        self._emitted += 1
        return out


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
    if cfg.mixture:
        return _mixture(cfg, tokenizer, objective, split, batch_size, seed, process_index, process_count,
                        num_batches)

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


def _source_seed(seed: int, index: int) -> int:
    """Mixture source `index`'s own seed: its order and draws do not repeat another source's."""
    return int(np.random.SeedSequence([_seed_words(seed), _MIX, index]).generate_state(2, np.uint64)[0])


def _mixture(cfg: DataConfig, tokenizer: Tokenizer, objective: Objective, split: str, batch_size: int, seed: int,
             process_index: int, process_count: int, num_batches: int | None) -> MixtureIterator:
    """data.mixture: every source as an endless iterator of its own, drawn from by weight. A validation split
    is the same mixture (at the sources' own weights) over their held-out documents: num_batches batches,
    the same ones at every eval."""
    if split == "all":
        raise ValueError("split='all' reads one named source; a mixture's sources are read as their own eval sets")
    train = split == "train"
    parts = []
    for i, src in enumerate(cfg.mixture):
        sub, sub_seed = src.data_config(cfg), _source_seed(seed, i)
        try:
            if src.source == "hub":
                ds = sources.open_stream(sub, split, process_index, process_count, shuffle=train and cfg.shuffle,
                                         seed=sub_seed)
                parts.append(StreamingBatchIterator(ds, tokenizer, objective, batch_size=1, seed=sub_seed,
                                                    infinite=True))
            else:
                tokens, lengths = tokenize_documents(sources.load_documents(sub, split, 0, 1), tokenizer,
                                                     cfg.num_proc)
                table = PackedTable.from_lengths(tokens, lengths, objective.row_len)
                parts.append(BatchIterator(table, objective, batch_size=1, seed=sub_seed,
                                           shuffle=train and cfg.shuffle, infinite=True))
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.mixture source {src.name!r}: {e}") from None
    if not train and num_batches is None:
        local = [p.num_rows for p in parts if isinstance(p, BatchIterator)]
        if len(local) < len(parts):
            raise ValueError("a mixture with hub sources needs num_batches for its validation split "
                             "(train.eval_steps)")
        num_batches = -(-sum(local) // (batch_size * process_count))
    stages = cfg.stage_weights() if train else cfg.stage_weights()[:1]
    return MixtureIterator([s.name for s in cfg.mixture], parts, stages, batch_size=batch_size * process_count,
                           seed=seed, infinite=train, num_batches=num_batches, host=(process_index, process_count))
