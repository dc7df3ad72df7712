"""Packing: documents (token ids ending in EOS) -> fixed-length rows with segment ids and positions.

Documents are laid end to end and cut every `row_len` tokens, so every token lands in exactly one row,
nothing is dropped and only the very last row has padding. A document cut by a row boundary continues
in the next row as a new segment. Inside a row, segment ids count documents 1, 2, 3, ... (0 = padding)
and positions restart at 0 at every segment start.

The local pipeline keeps the whole corpus as one flat array (`PackedTable`) and slices rows out of it
on demand; the streaming pipeline keeps a small carry-over buffer (`StreamPacker`). Both use `gather_rows`.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def gather_rows(tokens: np.ndarray, doc_starts: np.ndarray, row_starts: np.ndarray,
                row_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows [start, start + row_len) of a flat token stream, as (tokens, segment_ids, positions) [B, row_len].

    `doc_starts` are the document offsets into `tokens` (len = num_docs + 1, last = len(tokens)), documents
    non-empty. A negative row start gives an all-padding row; rows running off the end are padded.
    """
    row_starts = np.asarray(row_starts, np.int64)
    idx = row_starts[:, None] + np.arange(row_len)
    real = (row_starts[:, None] >= 0) & (idx < len(tokens))
    idx = np.where(real, idx, 0)
    doc = np.searchsorted(doc_starts, idx, side="right") - 1  # which document each token belongs to
    segment_ids = doc - doc[:, :1] + 1
    segment_start = np.maximum(doc_starts[doc], row_starts[:, None])  # a row may begin mid-document
    positions = idx - segment_start
    zero = np.zeros_like(idx)
    return (np.where(real, tokens[idx] if len(tokens) else zero, 0).astype(np.int32),
            np.where(real, segment_ids, 0).astype(np.int32),
            np.where(real, positions, 0).astype(np.int32))


@dataclasses.dataclass(frozen=True)
class PackedTable:
    """A whole (host-local) corpus packed once: row r is tokens[r * row_len : (r + 1) * row_len]."""

    tokens: np.ndarray  # int32 [num_tokens], every document followed by its EOS
    doc_starts: np.ndarray  # int64 [num_docs + 1]
    row_len: int

    @classmethod
    def from_lengths(cls, tokens: np.ndarray, lengths: np.ndarray, row_len: int) -> "PackedTable":
        lengths = np.asarray(lengths, np.int64)
        if (lengths <= 0).any():
            raise ValueError("every document needs at least one token (its EOS)")
        doc_starts = np.concatenate([[0], np.cumsum(lengths)])
        if doc_starts[-1] != len(tokens):
            raise ValueError(f"document lengths sum to {doc_starts[-1]} but there are {len(tokens)} tokens")
        return cls(np.asarray(tokens, np.int32), doc_starts, row_len)

    @property
    def num_rows(self) -> int:
        return -(-len(self.tokens) // self.row_len)

    def rows(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, segment_ids, positions) for these rows; row id -1 gives a padding row."""
        row_ids = np.asarray(row_ids, np.int64)
        return gather_rows(self.tokens, self.doc_starts, np.where(row_ids >= 0, row_ids * self.row_len, -1),
                           self.row_len)


class StreamPacker:
    """Carry-over buffer for streamed documents: whole documents in, packed rows out.

    Produces exactly the rows a PackedTable over the same document stream would, in order.
    """

    def __init__(self, row_len: int):
        self.row_len = row_len
        self._docs: list[np.ndarray] = []  # the first one may be the tail of a document already cut
        self.num_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        if len(ids):
            self._docs.append(np.asarray(ids, np.int32))
            self.num_tokens += len(ids)

    def pop_rows(self, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next `num_rows` rows; short of tokens, the last rows are padded (end of a finite stream)."""
        tokens = np.concatenate(self._docs) if self._docs else np.zeros(0, np.int32)
        doc_starts = np.concatenate([[0], np.cumsum([len(d) for d in self._docs], dtype=np.int64)])
        rows = gather_rows(tokens, doc_starts, np.arange(num_rows) * self.row_len, self.row_len)
        used = min(num_rows * self.row_len, len(tokens))
        # Keep what is left, still split at document boundaries.
        keep = doc_starts[doc_starts > used]
        self._docs = [tokens[a:b] for a, b in zip(np.concatenate([[used], keep[:-1]]), keep)]
        self.num_tokens = len(tokens) - used
        return rows

    def state(self) -> list[list[int]]:
        return [d.tolist() for d in self._docs]

    def restore(self, docs: list[list[int]]) -> None:
        self._docs, self.num_tokens = [], 0
        for d in docs:
            self.add(np.asarray(d, np.int32))
