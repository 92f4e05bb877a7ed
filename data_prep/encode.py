"""Tokenization, in this process (``workers=1``) or in N worker processes, with results in order.

Each batch of documents comes back as two streams (train, val), documents joined by [SEP], plus
each document's token count. Results are consumed in submission order, so the output does not
depend on the number of workers. At most ``2 * workers`` batches are in flight (bounded memory).
Worker processes are started with ``spawn`` (safe after ``tokenizers``/torch threads exist) and run
the Rust tokenizer single-threaded, so ``workers`` is the number of cores used for tokenization.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import DataPrepError
from .packing import join_documents

_WORKER: dict[str, Any] = {}


@dataclass
class Encoded:
    train: np.ndarray   # train documents of the batch joined by [SEP]
    val: np.ndarray     # val documents of the batch joined by [SEP]
    lengths: np.ndarray  # tokens per document (int64), in batch order


def encode_texts(tokenizer: Any, texts: list[str], is_val: list[bool], sep_id: int,
                 dtype: np.dtype) -> Encoded:
    """Tokenize a batch (no special tokens) and join each split's documents with [SEP]."""
    encs = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encs]
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    train = join_documents([x for x, v in zip(ids, is_val) if not v], sep_id, dtype)
    val = join_documents([x for x, v in zip(ids, is_val) if v], sep_id, dtype)
    return Encoded(train, val, lengths)


def _load(tokenizer_file: str) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = True  # a literal "[MASK]" in a document is text, not a mask id
    return tok


def _init_worker(tokenizer_file: str, sep_id: int, dtype: str) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (one line, exit 130, output
    # removed); a worker dying of it would only add a traceback per process. The worker was
    # started with SIGINT blocked (Encoder._submit), so none arrived before this line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tok=_load(tokenizer_file), sep=sep_id, dtype=np.dtype(dtype))


def _work(texts: list[str], is_val: list[bool]) -> Encoded:
    return encode_texts(_WORKER["tok"], texts, is_val, _WORKER["sep"], _WORKER["dtype"])


class Encoder:
    """Ordered, bounded tokenization of ``(tag, texts, is_val)`` batches.

    Workers get the tokenizer as a file path, not its JSON: a large argument to a spawned child
    that fails at start-up can block the parent forever in CPython's spawn pipe write."""

    def __init__(self, tokenizer_file: str, *, workers: int, sep_id: int, dtype: np.dtype) -> None:
        self.workers = workers
        self.sep_id = sep_id
        self.dtype = dtype
        self._pool: ProcessPoolExecutor | None = None
        if workers > 1:
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker,
                                             initargs=(tokenizer_file, sep_id, dtype.str))
        else:
            self._tok = _load(tokenizer_file)

    def map(self, batches: Iterable[tuple[Any, list[str], list[bool]]]) -> Iterator[tuple[Any, Encoded]]:
        if self._pool is None:
            for tag, texts, is_val in batches:
                yield tag, encode_texts(self._tok, texts, is_val, self.sep_id, self.dtype)
            return
        inflight: deque = deque()
        try:
            for tag, texts, is_val in batches:
                inflight.append((tag, self._submit(texts, is_val)))
                while len(inflight) > 2 * self.workers:
                    t, fut = inflight.popleft()
                    yield t, fut.result()
            while inflight:
                t, fut = inflight.popleft()
                yield t, fut.result()
        except BrokenProcessPool as e:
            raise DataPrepError("a tokenizer worker process died (out of memory?)",
                                where=f"--workers {self.workers}",
                                fix="retry with --workers 1; a script calling build_shards needs "
                                    "`if __name__ == '__main__':`, which spawned workers import") from e

    def _submit(self, texts: list[str], is_val: list[bool]) -> Future:
        """Submit a batch with SIGINT blocked: ``submit`` may spawn a worker, which inherits the
        mask, so a Ctrl-C during its start-up (imports, before ``_init_worker``) cannot kill it
        with a traceback. The parent gets a pending Ctrl-C when the mask is restored."""
        assert self._pool is not None
        if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
            return self._pool.submit(_work, texts, is_val)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return self._pool.submit(_work, texts, is_val)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
