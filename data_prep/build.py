"""``build_shards``: inputs -> tokenizer -> packed sequences -> shards + manifest, in one call.

Order of work: check flags and inputs; claim the output dir; get the tokenizer (load it, or train
it on the train-split documents in a first reading pass); read, tokenize (optionally in worker
processes), pack per source and write shards; write the manifest last. On an error everything this
build wrote is removed; after a crash (SIGKILL) a re-run removes the leftovers and restarts.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterator

from tqdm import tqdm

from . import FORMAT_VERSION, __version__, outdir
from .encode import Encoder
from .errors import BadInputError, DataPrepError, os_problem
from .manifest import MANIFEST, part_manifest_name, split_totals, write_json_atomic
from .packing import MIN_SEQ_LEN, Packer, id_dtype
from .readers import (EMPTY_FIX, EMPTY_REASONS, SKIP_BAD, Source, check_doc_separator, expand_inputs,
                      read_documents, source_fingerprint)
from .shards import ShardWriter
from .tokenizer import TokenizerInfo, check_tokenizer, load_tokenizer, save_tokenizer, train_wordpiece

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
BATCH_DOCS = 1000
BATCH_CHARS = 1 << 20


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """How documents are read from the inputs and split into train and validation (build and tokenizer)."""
    text_field: str = "text"  # JSON Lines: the document's field
    text_column: str = "text"  # CSV / Parquet / datasets: the text column
    doc_separator: str = "line"  # plain text: "line" or "blank" (blank-line separated paragraphs)
    input_format: str | None = None  # None: from each file's extension
    skip_bad: bool = False  # skip and count bad documents/files instead of failing
    val_fraction: float = 0.05
    seed: int = 0  # salt of the validation split hash
    lowercase: bool = True  # a trained vocab lowercases

    @property
    def reader(self) -> dict[str, str]:
        """The keyword arguments of readers.read_documents."""
        return {"text_field": self.text_field, "text_column": self.text_column, "doc_separator": self.doc_separator}


@dataclass(frozen=True, kw_only=True)
class BuildOptions(ReadOptions):
    """Everything `build_shards` needs besides the inputs and the output directory (docs/DATA_PREP.md)."""
    seq_len: int
    vocab_size: int | None = None  # train a WordPiece vocab of this size ...
    tokenizer_dir: str | None = None  # ... or use this tokenizer directory
    samples_per_shard: int = 10_000
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    workers: int = 1  # tokenizing processes
    part: int = 0  # this slice of the input files (0-based) ...
    parts: int = 1  # ... of this many (then `merge`)
    progress: bool | None = None  # None: a progress bar only when stderr is a terminal

    def __post_init__(self) -> None:
        if self.tokenizer_dir is not None:  # a Path is welcome; the manifest records a string
            object.__setattr__(self, "tokenizer_dir", os.fspath(self.tokenizer_dir))

    def flags(self) -> dict[str, Any]:
        """The options recorded in the manifest (how it was built; the progress bar is not)."""
        return {k: v for k, v in asdict(self).items() if k != "progress"}


class ValSplit:
    """Deterministic split by document content: blake2b(seed, text) < val_fraction * 2**64.

    It depends only on the document's text, so reordering inputs never moves a document between
    splits, and duplicates always land in the same split."""

    def __init__(self, val_fraction: float, seed: int) -> None:
        self.threshold = int(val_fraction * 2**64)
        self.key = f"sift-split-{seed}".encode()

    def __call__(self, text: str) -> bool:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=self.key).digest()
        return int.from_bytes(h, "big") < self.threshold


def _check_flags(o: BuildOptions) -> None:
    """Refuse bad flag values before the output directory is touched or anything is read."""
    seq_len, vocab_size, tokenizer_dir, workers, part, parts = (o.seq_len, o.vocab_size, o.tokenizer_dir,
                                                                o.workers, o.part, o.parts)
    if not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        raise DataPrepError(f"sequence length too small: [CLS] + tokens + [SEP] need at least {MIN_SEQ_LEN}",
                            where=f"--seq-len {seq_len}", fix=f"pass --seq-len {MIN_SEQ_LEN} or more (128 is usual)")
    if (vocab_size is None) == (tokenizer_dir is None):
        raise DataPrepError("both or neither of a vocab size and a tokenizer given",
                            where="--vocab-size/--tokenizer",
                            fix="give exactly one: --vocab-size N (train a WordPiece vocab) or "
                                "--tokenizer DIR (an existing tokenizer directory)")
    if not 0.0 <= o.val_fraction < 1.0:
        raise DataPrepError("validation fraction outside [0, 1)", where=f"--val-fraction {o.val_fraction}",
                            fix="pass a value from 0 up to (not including) 1, e.g. 0.05")
    if workers < 1:
        raise DataPrepError("fewer than one tokenizing process", where=f"--workers {workers}",
                            fix="pass --workers 1 or more")
    if parts < 1 or not 0 <= part < parts:
        raise DataPrepError("part number outside 0 .. parts-1", where=f"--part {part} --parts {parts}",
                            fix="pass --parts 1 or more and a --part from 0 to parts-1")
    if parts > 1 and tokenizer_dir is None:
        raise DataPrepError("a multi-part build needs one shared tokenizer", where=f"--parts {parts}",
                            fix="train it once with `python -m data_prep tokenizer -i ... -o TOKDIR "
                                "--vocab-size N` and pass --tokenizer TOKDIR to every part")
    check_doc_separator(o.doc_separator)


def _paths(sources: list[Source]) -> str:
    """The input paths for an error's "where" (the first three of a long list)."""
    more = f" and {len(sources) - 3} more" if len(sources) > 3 else ""
    return ", ".join(s.path for s in sources[:3]) + more or "no input files"


class _SourceStats:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.docs_in = 0
        self.skipped: Counter[str] = Counter()
        self.split_docs = {"train": 0, "val": 0}
        self.tokens = 0
        self.samples = {"train": 0, "val": 0}
        self.remainder = {"train": 0, "val": 0}
        self.error: str | None = None

    def record(self, sha: str, size: int) -> dict:
        kept = self.split_docs["train"] + self.split_docs["val"]
        skipped = sum(self.skipped.values())
        assert self.docs_in == kept + skipped, (self.source.path, self.docs_in, kept, skipped)
        return {"path": self.source.path, "format": self.source.fmt, "sha256": sha, "bytes": size,
                "documents": {"in": self.docs_in, "kept": kept, "skipped": skipped,
                              "skipped_by_reason": dict(sorted(self.skipped.items()))},
                "split_documents": dict(self.split_docs), "tokens": self.tokens,
                "samples": dict(self.samples), "remainder_tokens": dict(self.remainder),
                "error": self.error}


def _fingerprint(st: _SourceStats) -> tuple[str | None, int | None]:
    try:
        return source_fingerprint(st.source)
    except OSError as e:  # only reachable with skip_bad: the reading pass failed on it too
        st.error = st.error or f"cannot read: {e.strerror or e} ({st.source.path})"
        return None, None


def _documents(sources: list[Source], stats: list[_SourceStats] | None, opts: ReadOptions
               ) -> Iterator[tuple[int, str | None]]:
    """(source index, text) of every good document; (index, None) at the end of each source.

    A bad document raises BadInputError naming file and line, unless ``skip_bad``; with ``stats``
    the documents are counted (the encoding pass), without (the vocab-training pass) they are not."""
    skip_bad = opts.skip_bad
    for si, src in enumerate(sources):
        st = stats[si] if stats is not None else None
        it = read_documents(src, **opts.reader)
        while True:
            try:
                doc = next(it)
            except StopIteration:
                break
            except BadInputError as e:  # the file cannot be read (further)
                if not skip_bad:
                    raise
                logger.warning("skipping the rest of %s: %s", src.path, e.problem)
                if st is not None:
                    st.error = e.problem
                break
            if st is not None:
                st.docs_in += 1
            if doc.error is not None:
                if doc.error not in EMPTY_REASONS and not skip_bad:
                    raise BadInputError(src.path, doc.line, doc.detail, fix=f"{doc.fix}, {SKIP_BAD}")
                if st is not None:
                    st.skipped[doc.error] += 1
                continue
            yield si, doc.text
        yield si, None


def _batches(sources: list[Source], stats: list[_SourceStats], opts: ReadOptions, splitter: ValSplit) -> Iterator[tuple[Any, list[str], list[bool]]]:
    texts: list[str] = []
    is_val: list[bool] = []
    chars = 0
    for si, text in _documents(sources, stats, opts):
        if text is not None:
            texts.append(text)
            is_val.append(splitter(text))
            chars += len(text)
        if text is None or len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield (si, text is None, is_val), texts, is_val
            texts, is_val, chars = [], [], 0


def _get_tokenizer(sources: list[Source], vocab_size: int | None, tokenizer_dir: str | None,
                   opts: ReadOptions) -> TokenizerInfo:
    if tokenizer_dir is not None:
        return load_tokenizer(tokenizer_dir)
    assert vocab_size is not None
    counted = [0]
    splitter = ValSplit(opts.val_fraction, opts.seed)

    def train_texts() -> Iterator[str]:
        for _, text in _documents(sources, None, opts):
            if text is not None and not splitter(text):
                counted[0] += 1
                yield text

    t0 = time.perf_counter()
    hf = train_wordpiece(train_texts(), vocab_size, lowercase=opts.lowercase)
    if counted[0] == 0:
        raise DataPrepError("empty corpus: no training documents", where=_paths(sources),
                            fix=EMPTY_FIX)
    info = check_tokenizer(hf, "trained")
    info.extra["vocab_size_requested"] = vocab_size
    logger.info("trained a WordPiece vocab of %d tokens on %d documents in %.1f s",
                info.vocab_size, counted[0], time.perf_counter() - t0)
    return info


def _place_tokenizer(info: TokenizerInfo, out_dir: str, parts: int, created: list[str]) -> None:
    """Save to ``<out>/tokenizer`` (via a temp dir and a rename); parts share one and must agree."""
    final = os.path.join(out_dir, outdir.TOKENIZER_DIR)
    if parts > 1 and os.path.isdir(final):
        have = load_tokenizer(final)
        if have.vocab_sha256 != info.vocab_sha256:
            raise DataPrepError(f"another part placed another tokenizer here (vocab sha256 "
                                f"{have.vocab_sha256[:12]}, this one {info.vocab_sha256[:12]})", where=final,
                                fix="pass the same --tokenizer to every part of one --out")
        return
    tmp = os.path.join(out_dir, f".tokenizer.tmp-{os.getpid()}")
    created.append(tmp)
    save_tokenizer(info, tmp)
    try:
        os.rename(tmp, final)
    except OSError as e:
        if parts == 1:
            raise os_problem(e, "cannot place the tokenizer", final) from e
        outdir._remove(tmp)  # another part placed it first: check it is the same one
        return _place_tokenizer(info, out_dir, parts, created)
    created.remove(tmp)
    if parts == 1:
        created.append(final)


def build_shards(inputs: list[str], out_dir: str, options: BuildOptions) -> dict:
    """Shard ``inputs`` into ``out_dir``; returns the manifest (also written to disk). See docs/DATA_PREP.md."""
    t_start = time.perf_counter()
    o = options
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out_dir = os.fspath(out_dir)
    _check_flags(o)
    seq_len, part, parts, progress = o.seq_len, o.part, o.parts, o.progress
    all_sources = expand_inputs(inputs, o.input_format)
    sources = [s for i, s in enumerate(all_sources) if i % parts == part]
    splitter = ValSplit(o.val_fraction, o.seed)
    created_dir = outdir.prepare(out_dir, part, parts)
    created: list[str] = []
    writers: dict[str, ShardWriter] = {}
    try:
        tok = _get_tokenizer(sources, o.vocab_size, o.tokenizer_dir, o)
        _place_tokenizer(tok, out_dir, parts, created)
        dtype = id_dtype(tok.vocab_size)
        tag = outdir.part_tag(part, parts)
        for split in ("train", "val"):
            writers[split] = ShardWriter(
                out_dir, split, seq_len=seq_len, dtype=dtype, samples_per_shard=o.samples_per_shard,
                max_shard_bytes=o.max_shard_bytes, part_tag=tag,
                on_shard=lambda rec: created.append(os.path.join(out_dir, rec["name"])))
        stats = [_SourceStats(s) for s in sources]
        cls_id, sep_id = tok.special_ids["cls"], tok.special_ids["sep"]
        packers = {s: Packer(seq_len, cls_id, sep_id, dtype) for s in writers}
        bar = tqdm(unit=" docs", disable=(not progress) if progress is not None
                   else not sys.stderr.isatty(), mininterval=1.0, desc="data_prep")
        t0 = time.perf_counter()
        n_docs = n_tokens = 0
        tok_file = os.path.join(out_dir, outdir.TOKENIZER_DIR, "tokenizer.json")
        with Encoder(tok_file, workers=o.workers, sep_id=sep_id, dtype=dtype) as enc, bar:
            for (si, last, is_val), out in enc.map(_batches(sources, stats, o, splitter)):
                st = stats[si]
                for length, v in zip(out.lengths.tolist(), is_val):
                    if length == 0:
                        st.skipped["no_tokens"] += 1
                    else:
                        st.split_docs["val" if v else "train"] += 1
                st.tokens += int(out.lengths.sum())
                for split, stream in (("train", out.train), ("val", out.val)):
                    rows = packers[split].add(stream)
                    writers[split].write(rows)
                    st.samples[split] += len(rows)
                    if last:
                        st.remainder[split] += packers[split].finish()
                n_docs += len(is_val)
                n_tokens += int(out.lengths.sum())
                dt = max(time.perf_counter() - t0, 1e-9)
                bar.update(len(is_val))
                bar.set_postfix_str(f"{n_tokens / dt:,.0f} tokens/s", refresh=False)
        shards = writers["train"].close() + writers["val"].close()
        records = [st.record(*_fingerprint(st)) for st in stats]
        kept = sum(r["documents"]["kept"] for r in records)
        if kept == 0 and (sources or parts == 1):
            seen = sum(r["documents"]["in"] for r in records)
            what = "empty corpus: no usable documents" + (f" ({seen} read, all skipped)" if seen else "")
            first = "run without --skip-bad to see the first bad document, or " if o.skip_bad and seen else ""
            raise DataPrepError(what, where=_paths(sources), fix=first + EMPTY_FIX)
        if not sources:
            logger.warning("part %d of %d has no input files (%d files in all)", part, parts, len(all_sources))
        totals = split_totals(shards)
        if totals["train"]["samples"] == 0 and parts == 1:
            raise DataPrepError(f"corpus too small: {n_tokens} tokens give no training sequence",
                                where=f"--seq-len {seq_len}", fix="add documents or pass a smaller --seq-len")
        manifest = _manifest(tok, seq_len, dtype.name, shards, records, o.flags(), part, parts,
                             len(all_sources))
        name = MANIFEST if parts == 1 else part_manifest_name(part, parts)
        created.append(os.path.join(out_dir, name))
        write_json_atomic(os.path.join(out_dir, name), manifest)
        outdir.finish(out_dir, part, parts)
    except BaseException:
        for w in writers.values():
            w.abort()
        outdir.cleanup_failed(out_dir, part, parts, created_dir, created)
        raise
    _log_summary(manifest, time.perf_counter() - t_start, n_docs, n_tokens, time.perf_counter() - t0)
    return manifest


def _manifest(tok: TokenizerInfo, seq_len: int, dtype: str, shards: list[dict],
              records: list[dict], flags: dict, part: int, parts: int, n_all: int) -> dict:
    docs = {"in": 0, "kept": 0, "skipped": 0}
    reasons: Counter[str] = Counter()
    for r in records:
        for k in ("in", "kept", "skipped"):
            docs[k] += r["documents"][k]
        reasons.update(r["documents"]["skipped_by_reason"])
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "tokenizer": {"dir": outdir.TOKENIZER_DIR, "vocab_sha256": tok.vocab_sha256,
                      "special_ids": tok.special_ids,
                      "origin": tok.origin, **tok.extra},
        "shards": shards,
        "splits": split_totals(shards),
        "documents": {**docs, "skipped_by_reason": dict(sorted(reasons.items()))},
        "content_tokens": sum(r["tokens"] for r in records),
        "remainder_tokens": sum(sum(r["remainder_tokens"].values()) for r in records),
        "sources": records,
        "parts": {"part": part, "parts": parts, "sources_total": n_all} if parts > 1 else None,
        "split_rule": "val iff blake2b(key='sift-split-<seed>', text, 8 bytes) < val_fraction*2^64",
        "packing": "per source and split: [CLS] + seq_len-2 tokens of 'd1 [SEP] d2 [SEP] ...' + [SEP]",
        "tool": {"name": "data_prep", "version": __version__, "flags": flags},
    }


def _log_summary(m: dict, total_s: float, n_docs: int, n_tokens: int, encode_s: float) -> None:
    sp = m["splits"]
    d = m["documents"]
    logger.info("built %d train + %d val sequences of %d tokens in %d shards from %d documents "
                "(%d kept, %d skipped %s); %d tokens, %d remainder tokens dropped",
                sp["train"]["samples"], sp["val"]["samples"], m["seq_len"],
                sp["train"]["shards"] + sp["val"]["shards"], d["in"], d["kept"], d["skipped"],
                d["skipped_by_reason"] or "", n_tokens, m["remainder_tokens"])
    logger.info("took %.1f s (tokenize+pack+write %.1f s: %.0f documents/s, %.0f tokens/s)",
                total_s, encode_s, n_docs / max(encode_s, 1e-9), n_tokens / max(encode_s, 1e-9))


def train_tokenizer(inputs: list[str], out_dir: str, *, vocab_size: int, options: ReadOptions = ReadOptions()) -> dict:
    """Train a WordPiece vocab on the train-split documents of all inputs and save it to
    ``out_dir`` (for ``--parts`` builds, which must share one tokenizer). Returns its identity."""
    check_doc_separator(options.doc_separator)
    inputs = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    out_dir = os.fspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise outdir.not_empty(out_dir, os.listdir(out_dir))
    sources = expand_inputs(inputs, options.input_format)
    created = outdir.check_writable(out_dir)
    try:
        info = _get_tokenizer(sources, vocab_size, None, options)
        save_tokenizer(info, out_dir)
    except BaseException:
        if created:  # leave no half-saved tokenizer dir behind (a re-run would find it "not empty")
            outdir._remove(out_dir)
        raise
    return {"dir": out_dir, "vocab_size": info.vocab_size, "vocab_sha256": info.vocab_sha256,
            "special_ids": info.special_ids}
