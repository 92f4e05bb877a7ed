"""Packing: documents -> sequences of exactly ``seq_len`` token ids.

Within one source file and one split, documents form a stream ``d1 [SEP] d2 [SEP] d3 ...``; the
stream is cut into bodies of ``seq_len - 2`` tokens and each becomes ``[CLS] body [SEP]``. A body
never starts with a [SEP]: such a separator is dropped, the previous row's closing [SEP] stands for
it. A long document spans several sequences and nothing is truncated; only the stream's final
partial body is dropped, and counted (``remainder_tokens``). Packing per source file (not across files) makes a
``--part I --parts N`` run hold exactly the samples that a single run would.
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np

MIN_SEQ_LEN = 8


def id_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else int32 (little-endian either way)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<i4")


def join_documents(docs: Sequence[Sequence[int]], sep_id: int, dtype: np.dtype) -> np.ndarray:
    """Concatenate non-empty documents with ``sep_id`` between them, as one 1-D array."""
    parts: list[Sequence[int]] = []
    sep = (sep_id,)
    for ids in docs:
        if ids:
            if parts:
                parts.append(sep)
            parts.append(ids)
    total = sum(len(p) for p in parts)
    return np.fromiter(chain.from_iterable(parts), dtype=dtype, count=total)


class Packer:
    """Cuts one stream (one source, one split) into ``[CLS] body [SEP]`` rows, batch by batch."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, dtype: np.dtype) -> None:
        if seq_len < MIN_SEQ_LEN:
            raise ValueError(f"seq_len {seq_len} < {MIN_SEQ_LEN}")
        self.seq_len = seq_len
        self.body = seq_len - 2
        self.cls_id = cls_id
        self.sep_id = sep_id
        self.dtype = dtype
        self._pending = np.zeros(0, dtype=dtype)
        self._started = False

    def add(self, stream: np.ndarray) -> np.ndarray:
        """Append a piece of stream (documents already joined by [SEP]); return complete rows."""
        if stream.size == 0:
            return np.zeros((0, self.seq_len), dtype=self.dtype)
        pieces = [self._pending]
        if self._started:
            pieces.append(np.array([self.sep_id], dtype=self.dtype))
        pieces.append(stream.astype(self.dtype, copy=False))
        buf = np.concatenate(pieces)
        self._started = True
        bodies, pos, body = [], 0, self.body
        while True:
            if pos < buf.size and buf[pos] == self.sep_id:
                pos += 1  # a body never starts with the separator: the previous row's [SEP] is it
            if buf.size - pos < body:
                break
            bodies.append(pos)
            pos += body
        rows = np.empty((len(bodies), self.seq_len), dtype=self.dtype)
        rows[:, 0] = self.cls_id
        rows[:, -1] = self.sep_id
        for r, start in enumerate(bodies):
            rows[r, 1:-1] = buf[start:start + body]
        self._pending = buf[pos:].copy()
        return rows

    def finish(self) -> int:
        """End the stream (end of a source); returns the dropped remainder's token count."""
        rest = int(self._pending.size)
        self._pending = np.zeros(0, dtype=self.dtype)
        self._started = False
        return rest
