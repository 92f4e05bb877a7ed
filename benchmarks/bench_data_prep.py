"""Benchmark (not a test): tokens/s of data prep on the demo corpus, 1 and 2 workers, beside the same
tokenization done the usual way, ``datasets.map(batched=True)`` with a fast tokenizer, in one run.

    python benchmarks/bench_data_prep.py [--repeats 3] [--vocab-size 8192] [--seq-len 128]

All runs use one tokenizer, trained once on the corpus first (its time is reported apart). Each
configuration runs ``--repeats`` times, interleaved, and the best and median are reported, since
the machine may be shared; tokens per CPU-second (all threads and worker processes) is reported
too, as it hardly depends on what else runs. Imports happen before any timing. Results are printed as a table and,
with ``--json PATH``, written as JSON. Numbers and the command are recorded in docs/DATA_PREP.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children: load-insensitive."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def ours(csv_path: str, column: str, tok_dir: str, work: str, workers: int, seq_len: int) -> dict:
    from data_prep.build import BuildOptions, build_shards

    out = os.path.join(work, f"shards-w{workers}")
    shutil.rmtree(out, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    m = build_shards([csv_path], out, BuildOptions(seq_len=seq_len, tokenizer_dir=tok_dir, text_column=column,
                     workers=workers, progress=False))
    dt = time.perf_counter() - t0
    return {"seconds": dt, "cpu_seconds": cpu_seconds() - c0, "tokens": m["content_tokens"],
            "documents": m["documents"]["kept"]}


def reference(csv_path: str, column: str, tok_dir: str, work: str) -> dict:
    """The usual recipe: load the CSV with datasets, drop empty rows, map a fast tokenizer."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cache = os.path.join(work, "hf-cache")
    shutil.rmtree(cache, ignore_errors=True)
    c0, t0 = cpu_seconds(), time.perf_counter()
    ds = datasets.load_dataset("csv", data_files=csv_path, split="train", cache_dir=cache)
    ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b[column]], batched=True)
    c1, t1 = cpu_seconds(), time.perf_counter()
    ds = ds.map(lambda b: tok(b[column], add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False),
                batched=True, remove_columns=ds.column_names)
    c2, t2 = cpu_seconds(), time.perf_counter()
    tokens = sum(len(x) for x in ds["input_ids"])
    return {"seconds": t2 - t1, "cpu_seconds": c2 - c1, "seconds_with_load": t2 - t0,
            "cpu_seconds_with_load": c2 - c0, "tokens": tokens, "documents": len(ds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default="data/demo", help="demo corpus download dir")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    import datasets
    import numpy
    import tokenizers
    import transformers
    import webdataset

    from data_prep import __version__
    from data_prep.build import ReadOptions, train_tokenizer
    from data_prep.demo_corpus import fetch_demo_corpus

    datasets.disable_progress_bars()
    csv_path, column = fetch_demo_corpus(args.cache)
    work = tempfile.mkdtemp(prefix="bench_data_prep-")
    try:
        tok_dir = os.path.join(work, "tokenizer")
        t0 = time.perf_counter()
        info = train_tokenizer([csv_path], tok_dir, vocab_size=args.vocab_size, options=ReadOptions(text_column=column))
        train_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"data_prep workers=1": [], "data_prep workers=2": [],
                                       "datasets.map(batched=True)": []}
        for _ in range(args.repeats):
            runs["data_prep workers=1"].append(ours(csv_path, column, tok_dir, work, 1, args.seq_len))
            runs["data_prep workers=2"].append(ours(csv_path, column, tok_dir, work, 2, args.seq_len))
            runs["datasets.map(batched=True)"].append(reference(csv_path, column, tok_dir, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "corpus": {"csv": csv_path, "bytes": os.path.getsize(csv_path)},
        "tokenizer": {"vocab_size": info["vocab_size"], "train_seconds": round(train_s, 2)},
        "hardware": {"cpus": os.cpu_count(), "machine": platform.machine(),
                     "processor": platform.processor() or _cpu_model(),
                     "load_average_at_end": os.getloadavg()},
        "versions": {"python": platform.python_version(), "data_prep": __version__,
                     "tokenizers": tokenizers.__version__, "transformers": transformers.__version__,
                     "datasets": datasets.__version__, "numpy": numpy.__version__,
                     "webdataset": getattr(webdataset, "__version__", "?")},
        "env": {"TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},
        "runs": {},
    }
    print(f"{'configuration':34s} {'tokens':>9s} {'best tok/s':>11s} {'median tok/s':>12s} "
          f"{'tok/CPU-s':>10s}")
    for name, rs in runs.items():
        rows = [(name, rs, "seconds", "cpu_seconds")]
        if "seconds_with_load" in rs[0]:
            rows.append((name + " +load", rs, "seconds_with_load", "cpu_seconds_with_load"))
        for label, rs_, wall, cpu in rows:
            rates = [r["tokens"] / r[wall] for r in rs_]
            per_cpu = statistics.median(r["tokens"] / r[cpu] for r in rs_)
            results["runs"][label] = {
                "tokens": rs_[0]["tokens"], "documents": rs_[0]["documents"],
                "seconds": [round(r[wall], 3) for r in rs_],
                "cpu_seconds": [round(r[cpu], 3) for r in rs_],
                "best_tokens_per_s": round(max(rates)),
                "median_tokens_per_s": round(statistics.median(rates)),
                "median_tokens_per_cpu_s": round(per_cpu)}
            print(f"{label:34s} {rs_[0]['tokens']:9d} {max(rates):11,.0f} "
                  f"{statistics.median(rates):12,.0f} {per_cpu:10,.0f}")
    print(f"tokenizer: {info['vocab_size']} tokens, trained in {train_s:.1f} s; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    main()
