"""A deterministic WordPiece vocab learner.

Why not ``tokenizers``' ``WordPieceTrainer``: it numbers the ``##x`` symbols in hash-map order and
breaks ties between equally frequent pairs by those numbers, so two runs on the same corpus can
learn different vocabs (seen on small corpora here), and the shards would differ byte for byte.
This learner does the same thing (frequency-based merges of adjacent symbols, continuation pieces
prefixed with ``##``, as the ``tokenizers`` trainer does) with ties broken by the symbols' text.
Normalization and pre-tokenization are ``tokenizers``' own BERT components, and the result is a
``tokenizers`` WordPiece model; only the counting and merging are here.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

PREFIX = "##"


def count_words(texts: Iterable[str], lowercase: bool = True) -> Counter[str]:
    """Word counts after BERT normalization and pre-tokenization."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    norm = BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True,
                          handle_chinese_chars=True)
    pre = BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    return counts


def learn_vocab(counts: Counter[str], vocab_size: int, special_tokens: Iterable[str], *,
                min_frequency: int = 2, limit_alphabet: int = 1000) -> list[str]:
    """Tokens in id order: special tokens, the alphabet (``c`` and ``##c``), then merged pieces.

    Characters beyond the ``limit_alphabet`` most frequent ones are left out (their words
    become [UNK]), and words holding them are not used for merges.
    """
    vocab = list(dict.fromkeys(special_tokens))
    chars: Counter[str] = Counter()
    for w, n in counts.items():
        for c in w:
            chars[c] += n
    alphabet = {c for c, _ in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))[:limit_alphabet]}

    words: list[list[str]] = []
    freqs: list[int] = []
    symbols: set[str] = set()
    for w, n in sorted(counts.items()):
        if not set(w) <= alphabet:
            continue
        syms = [w[0]] + [PREFIX + c for c in w[1:]]
        symbols.update(syms)
        words.append(syms)
        freqs.append(n)
    seen = set(vocab)
    for s in sorted(symbols, key=lambda s: (s.startswith(PREFIX), s)):
        if s not in seen:
            vocab.append(s)
            seen.add(s)

    pairs: dict[tuple[str, str], int] = defaultdict(int)
    where: dict[tuple[str, str], set[int]] = defaultdict(set)
    for i, syms in enumerate(words):
        for a, b in zip(syms, syms[1:]):
            pairs[a, b] += freqs[i]
            where[a, b].add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pairs.get((a, b), 0) != -neg:
            continue  # stale entry: the count changed since it was pushed
        if -neg < min_frequency:
            break
        new = a + b[len(PREFIX):]
        if new not in seen:
            vocab.append(new)
            seen.add(new)
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b))):
            syms, n = words[i], freqs[i]
            for p in zip(syms, syms[1:]):
                pairs[p] -= n
                touched.add(p)
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == a and syms[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pairs[p] += n
                where[p].add(i)
                touched.add(p)
        pairs.pop((a, b), None)
        for p in touched:
            n = pairs.get(p, 0)
            if n > 0:
                heapq.heappush(heap, (-n, p[0], p[1]))
            else:
                pairs.pop(p, None)
                where.pop(p, None)
    return vocab
