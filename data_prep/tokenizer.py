"""Tokenizer: learn a BERT WordPiece vocab (``wordpiece.py``, ``tokenizers`` components), or load an existing one; save it so
``transformers.AutoTokenizer.from_pretrained(<out>/tokenizer)`` loads it; check its vocab size.

The "tiny vocab" rule (a known silent trap: ``BertTokenizerFast(vocab_file=...)`` gives 5 tokens):
a tokenizer is refused when it has fewer than ``MIN_VOCAB_SIZE`` tokens, lacks one of the BERT
special tokens, or loads with a size other than its ``vocab.txt`` line count. Every tokenizer we
save is loaded back with ``AutoTokenizer`` and must give the same vocab, byte for byte.
A trained vocab smaller than requested (a small corpus runs out of merges) is only a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import DataPrepError, one_line, os_problem

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_NAMES = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
MIN_VOCAB_SIZE = 32
_OTHER_TOKENIZER = "pass another --tokenizer, or train one with --vocab-size N"


@dataclass
class TokenizerInfo:
    """A loaded, checked tokenizer and the identity recorded in the manifest."""

    hf: Any  # transformers tokenizer (fast)
    vocab_size: int
    vocab_sha256: str
    special_ids: dict[str, int]
    origin: str  # "trained" or the directory it was loaded from
    extra: dict[str, Any] = field(default_factory=dict)


def _where(origin: str) -> str:
    """``origin`` for an error's "where": a directory, or a tokenizer trained in this run."""
    return "the trained tokenizer" if origin == "trained" else origin


def vocab_tokens(hf: Any, origin: str = "trained") -> list[str]:
    """The vocab as a list indexed by id (added tokens included); refuses gaps in the ids."""
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens: list[str | None] = [None] * len(vocab)
    for tok, i in vocab.items():
        if not 0 <= i < len(tokens) or tokens[i] is not None:
            raise DataPrepError(f"vocab ids are not 0..{len(vocab) - 1} without gaps", where=_where(origin),
                                fix=_OTHER_TOKENIZER)
        tokens[i] = tok
    return tokens  # type: ignore[return-value]


def vocab_sha256(hf: Any, origin: str = "trained") -> str:
    """sha256 of the vocab as ``vocab.txt`` would hold it: one token per line, in id order."""
    return hashlib.sha256(("\n".join(vocab_tokens(hf, origin)) + "\n").encode("utf-8")).hexdigest()


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, lowercase: bool = True,
                    min_frequency: int = 2) -> Any:
    """Learn a BERT WordPiece vocab on ``texts`` (deterministically, see ``wordpiece.py``);
    returns a ``transformers`` fast tokenizer."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    from .wordpiece import count_words, learn_vocab

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataPrepError(f"vocab size too small: at least {MIN_VOCAB_SIZE} tokens",
                            where=f"--vocab-size {vocab_size}",
                            fix=f"pass --vocab-size {MIN_VOCAB_SIZE} or more (8192 to 30522 are usual)")
    tokens = learn_vocab(count_words(texts, lowercase), vocab_size, SPECIAL_TOKENS,
                         min_frequency=min_frequency)
    if len(tokens) < vocab_size:
        logger.warning("trained vocab has %d tokens, fewer than the %d requested "
                       "(the corpus has too few distinct words and merges)", len(tokens), vocab_size)
    wp = BertWordPieceTokenizer({t: i for i, t in enumerate(tokens)}, lowercase=lowercase)
    return BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=lowercase,
                             **{f"{k}_token": v for k, v in SPECIAL_NAMES.items()})


def check_tokenizer(hf: Any, origin: str) -> TokenizerInfo:
    """Check a tokenizer (the tiny-vocab rule above) and return its identity."""
    where = _where(origin)
    if not getattr(hf, "is_fast", False) or not hasattr(hf, "backend_tokenizer"):
        raise DataPrepError("not a fast (tokenizers-backed) tokenizer", where=where,
                            fix=f"save it from a fast tokenizer (it writes tokenizer.json), or {_OTHER_TOKENIZER}")
    size = len(hf)
    if size < MIN_VOCAB_SIZE:
        raise DataPrepError(
            f"tokenizer loaded with only {size} tokens (minimum {MIN_VOCAB_SIZE})", where=where,
            fix="a tiny vocab usually means it was built with BertTokenizerFast(vocab_file=...), which "
                "silently ignores the file: build it with vocab= and save it with save_pretrained")
    vocab_file = os.path.join(origin, "vocab.txt") if os.path.isdir(origin) else None
    if vocab_file and os.path.isfile(vocab_file):
        try:
            with open(vocab_file, encoding="utf-8") as f:
                lines = sum(1 for line in f if line.rstrip("\n"))
        except (OSError, UnicodeDecodeError) as e:
            raise DataPrepError(f"unreadable vocab.txt: {one_line(e)}", where=vocab_file,
                                fix="save the tokenizer again with save_pretrained, or remove that vocab.txt") from e
        if lines != size:
            raise DataPrepError(f"tokenizer loaded with {size} tokens but its vocab.txt has {lines}",
                                where=where, fix="the tokenizer files disagree: save it again with "
                                                 "save_pretrained, or remove the stale vocab.txt")
    vocab = hf.backend_tokenizer.get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise DataPrepError(f"lacks the BERT special tokens {missing}", where=where,
                            fix=f"add them to the tokenizer, or {_OTHER_TOKENIZER}")
    model = type(hf.backend_tokenizer.model).__name__
    if model != "WordPiece":
        logger.warning("tokenizer %s has a %s model, not WordPiece (BERT)", origin, model)
    special_ids = {name: vocab[tok] for name, tok in SPECIAL_NAMES.items()}
    return TokenizerInfo(hf=hf, vocab_size=size, vocab_sha256=vocab_sha256(hf, origin),
                         special_ids=special_ids, origin=origin,
                         extra={"model": model, "lowercase": _lowercase(hf)})


def _lowercase(hf: Any) -> bool | None:
    norm = hf.backend_tokenizer.normalizer
    return getattr(norm, "lowercase", None) if norm is not None else None


def load_tokenizer(path: str) -> TokenizerInfo:
    """Load a Hugging Face tokenizer directory (offline) and check it."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataPrepError("a file, not a tokenizer directory" if os.path.exists(path) else "no such directory",
                            where=path, fix="pass a directory written by save_pretrained or "
                                            "`python -m data_prep tokenizer`")
    try:
        hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataPrepError(f"cannot load with AutoTokenizer: {one_line(e)}", where=path,
                            fix=f"check that it was written by save_pretrained (with tokenizer.json), or "
                                f"{_OTHER_TOKENIZER}") from e
    return check_tokenizer(hf, path)


def save_tokenizer(info: TokenizerInfo, out_dir: str) -> None:
    """Save with ``save_pretrained`` plus a ``vocab.txt``; reload and check it is the same vocab."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        info.hf.save_pretrained(out_dir)
        with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(vocab_tokens(info.hf, info.origin)) + "\n")
    except OSError as e:
        raise os_problem(e, "cannot save the tokenizer", out_dir) from e
    back = load_tokenizer(out_dir)
    if back.vocab_sha256 != info.vocab_sha256 or back.special_ids != info.special_ids:
        raise DataPrepError(f"the saved tokenizer reloads with a different vocab ({back.vocab_size} tokens "
                            f"instead of {info.vocab_size})", where=out_dir,
                            fix=f"use a tokenizer that survives save_pretrained, or {_OTHER_TOKENIZER}")
