"""Benchmark (not a test): candidate samples/s of the training loader per number of loader workers,
and the time a resume takes to reach its first batch mid-epoch, for the old loader (pipeline/data.py
as the last commit that had it, taken from git) beside the new one (pipeline/data/), in one process.

    python benchmarks/bench_loader.py --workers 0 1 2 --seconds 20 [--data data/study-s64-v4096]

Each arm runs as training runs it: the old loader with a new DataLoader per epoch (main's
Run._candidate_batches), the new one as one DataLoader for the run (epochs=None). Batches are 64
candidates (--micro-batch 32 x --oversample 2); samples/s counts from the DataLoader's creation
(worker start-up included) until --seconds have passed, per wall-clock second and per CPU-second
of the process and its workers together (the number a loaded machine does not change much). The resume arm starts at --resume-at
micro-batches into epoch 0 (default: half the epoch) and times the first batch. The shard
checksum cache is emptied before every arm (data.verify is on, as in a run). The machine's load
average is recorded with every number: the machine may be shared. Numbers are recorded in
docs/BENCHMARKS.md ("Loader").
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset  # noqa: E402

from benchmarks.bench_common import cpu_model  # noqa: E402
from pipeline import data as new_data  # noqa: E402
from pipeline.data import shards as new_shards  # noqa: E402
from pipeline.manifest import Manifest  # noqa: E402
from pipeline.masking import MaskSpec  # noqa: E402

Stream = Callable[[int, int], Iterator[dict]]  # (workers, start micro-batch) -> batches without end


def last_single_module_loader() -> str:
    """The newest commit that still had pipeline/data.py (the parent of the one that made it a package),
    so that the default holds before and after this branch is merged."""
    deleted = subprocess.run(["git", "rev-list", "-1", "HEAD", "--", "pipeline/data.py"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.strip()
    return f"{deleted}^"


def old_loader_module(rev: str) -> ModuleType:
    """The old loader, pipeline/data.py at `rev`, as the module `old_data` (its imports, pipeline.errors,
    .manifest and .masking.mask_tokens, are unchanged since)."""
    source = subprocess.run(["git", "show", f"{rev}:pipeline/data.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="bench_loader-")) / "old_data.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = module  # DataLoader workers are forked: they find it there
    spec.loader.exec_module(module)
    return module


def arms(old: ModuleType, manifest: Manifest, spec: MaskSpec, args: argparse.Namespace) -> dict[str, Stream]:
    """Each loader as a run drives it: old, a DataLoader per epoch; new, one for the run."""
    common = {"batch": args.micro_batch * args.oversample, "seed": 0, "rank": 0, "world": 1,
              "shuffle_buffer": args.shuffle_buffer, "strict": False, "verify": True}

    def old_stream(workers: int, start: int) -> Iterator[dict]:
        epoch = 0
        while True:
            loader, _ = old.train_loader(manifest, spec, epoch=epoch, start=start, num_workers=workers, **common)
            yield from loader
            epoch, start = epoch + 1, 0

    def new_stream(workers: int, start: int) -> Iterator[dict]:
        loader, _ = new_data.train_loader(manifest, spec, epoch=0, start=start, num_workers=workers, epochs=None,
                                          **common)
        yield from loader

    return {"old": old_stream, "new": new_stream}


def forget_checksums(old: ModuleType) -> None:
    """Every arm hashes its shards afresh (data.verify), as a new run does."""
    old._VERIFIED.clear()
    new_shards._VERIFIED.clear()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_seconds() -> float:
    """CPU time of this process and of its ended children: the DataLoader's workers count once it has
    joined them (at the stream's close). Other processes' load does not enter it, unlike the wall clock."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def throughput(stream: Stream, workers: int, seconds: float, batch: int) -> dict:
    """Candidate samples/s from the DataLoader's creation until `seconds` have passed."""
    before, cpu = load(), cpu_seconds()
    start = time.perf_counter()
    batches = stream(workers, 0)
    served, first = 0, None
    try:
        for _ in batches:
            served += 1
            first = first or time.perf_counter() - start
            if time.perf_counter() - start >= seconds:
                break
    finally:
        batches.close()  # the DataLoader's workers end here
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return {"samples_per_s": served * batch / elapsed, "samples_per_cpu_s": served * batch / cpu,
            "batches": served, "seconds": elapsed, "cpu_seconds": cpu,
            "first_batch_s": first, "load_before": before, "load_after": load()}


def resume(stream: Stream, workers: int, start: int) -> dict:
    """Seconds from a resume at micro-batch `start` of the epoch to its first batch."""
    before, cpu = load(), cpu_seconds()
    begin = time.perf_counter()
    batches = stream(workers, start)
    try:
        next(batches)
        seconds = time.perf_counter() - begin
    finally:
        batches.close()
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "skipped_batches": start,
            "load_before": before, "load_after": load()}


def environment(args: argparse.Namespace, manifest: Manifest) -> dict:
    return {"cpu": cpu_model(), "cores_usable": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "webdataset": webdataset.__version__,
            "data": str(args.data), "seq_len": manifest.seq_len, "vocab_size": manifest.vocab_size,
            "train_samples": manifest.split_samples("train"), "batch": args.micro_batch * args.oversample,
            "shuffle_buffer": args.shuffle_buffer, "mask_prob": args.mask_prob, "old": f"git {args.old_rev}",
            "new": git_head(), "load_at_start": load()}


def git_head() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "pipeline"], cwd=REPO, capture_output=True, text=True)
    return head.stdout.strip() + (" (pipeline/ modified)" if dirty.stdout.strip() else "")


def table(results: dict) -> str:
    """The markdown rows docs/BENCHMARKS.md shows."""
    rows = ["| workers | samples/s old | new | new/old | samples/CPU-s old | new | resume s old | new "
            "| resume CPU-s old | new | load (1 min) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for workers, arm in results["workers"].items():
        old, new = arm["throughput"]["old"], arm["throughput"]["new"]
        ro, rn = arm["resume"]["old"], arm["resume"]["new"]
        loads = [r[k][0] for r in (old, new, ro, rn) for k in ("load_before", "load_after")]
        rows.append(f"| {workers} | {old['samples_per_s']:,.0f} | {new['samples_per_s']:,.0f} | "
                    f"{new['samples_per_s'] / old['samples_per_s']:.2f}x | {old['samples_per_cpu_s']:,.0f} | "
                    f"{new['samples_per_cpu_s']:,.0f} | {ro['seconds']:.2f} | {rn['seconds']:.2f} | "
                    f"{ro['cpu_seconds']:.2f} | {rn['cpu_seconds']:.2f} | {min(loads):.2f}-{max(loads):.2f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO / "data" / "study-s64-v4096")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seconds", type=float, default=20.0, help="per arm and worker count")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--oversample", type=int, default=2)
    parser.add_argument("--shuffle-buffer", type=int, default=2000)
    parser.add_argument("--mask-prob", type=float, default=0.15)
    parser.add_argument("--resume-at", type=int, default=0, help="micro-batches into epoch 0 (0: half the epoch)")
    parser.add_argument("--old-rev", help="the git revision whose pipeline/data.py is the old loader (default: "
                        "the last commit that had it)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.data / "manifest.json").is_file():
        from benchmarks.study import ensure_data

        ensure_data(args.data, 64, 4096, REPO / "data" / "demo-corpus")
    torch.set_num_threads(1)
    args.old_rev = args.old_rev or last_single_module_loader()
    manifest = Manifest.load(str(args.data))
    spec = MaskSpec(args.mask_prob, manifest.vocab_size, manifest.special_ids["mask"],
                    tuple(sorted(set(manifest.special_ids.values()))))
    old = old_loader_module(args.old_rev)
    streams = arms(old, manifest, spec, args)
    batch = args.micro_batch * args.oversample
    start = args.resume_at or new_data.micro_steps_per_epoch(manifest, 0, 0, 1, batch) // 2
    results = {"environment": environment(args, manifest), "command": " ".join(sys.argv), "workers": {}}
    for i, workers in enumerate(args.workers):
        order = ["old", "new"] if i % 2 == 0 else ["new", "old"]  # drift of a shared machine hits both alike
        arm = {"throughput": {}, "resume": {}}
        for name in order:
            forget_checksums(old)
            arm["throughput"][name] = throughput(streams[name], workers, args.seconds, batch)
            forget_checksums(old)
            arm["resume"][name] = resume(streams[name], workers, start)
            print(f"workers {workers} {name}: {arm['throughput'][name]['samples_per_s']:,.0f} samples/s, "
                  f"resume at {start}: {arm['resume'][name]['seconds']:.2f} s, load {load()}", flush=True)
        results["workers"][workers] = arm
    results["environment"]["load_at_end"] = load()
    print(json.dumps(results["environment"]))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
