"""`make gpu-check`: one campaign on one GPU (under 8 minutes on an H200) that prints one table and
writes gpu_check.json; `--dry-run` runs the same campaign on the CPU with the tiny preset and tiny
data (under 3 minutes on 2 cores), the CUDA-only figures n/a.

    bash scripts/gpu_check.sh [--out DIR] [--data DIR]       # make gpu-check
    bash scripts/gpu_check.sh --dry-run                      # make gpu-check-dry

Why: the first hour on a new GPU machine should say whether the stack works (versions, DeepSpeed ops,
attention backend), how fast a step is against the FLOP count and the cost model, whether ZeRO-3
gathers the exit-layer scoring right, and whether the study's recipe leaves the plateau at a GPU
batch size. Every section goes through the pipeline's own pieces (Run.open, train_step,
window_metrics, train), never a training loop of its own:

1. environment: torch, CUDA, NCCL, DeepSpeed, GPU and its memory, DeepSpeed ops, attention backend;
2. throughput: BERT-base (configs/base.yaml: seq 128, bf16, ZeRO-2), vanilla and SIFT@1 (oversample
   2), ~60 s each after warm-up steps: samples/s and tokens/s backpropagated and seen, TFLOP/s per
   rank and MFU both ways (pipeline/flops.py), the step time against the cost model
   (bench_common.calibrate_pieces), the scoring share, host syncs per step (pipeline/syncs.py's
   counter over two more steps; n/a where that module is missing);
3. ZeRO-3 SIFT smoke, every weight partitioned: a few steps, losses finite, and scores at the last
   exit equal to the exact per-sample losses of the full forward (the scoring forward's gathers);
4. the CPU study's recipe (configs/study.yaml) at micro-batch 256 for ~2 minutes: seconds until eval
   [MASK] accuracy >= 2x the context-free reference (benchmarks/plateau.py's seconds_to_2x).

Data (nothing is downloaded: a GPU machine may have no network): the throughput arms train on
made-up Zipf-distributed words sharded by data_prep at seq 128 with a 30,522-token vocab, built once
into data/gpu-check-s128-v30522 (or --data DIR); the study trains on its config's shards
(data/study-s64-v4096, built from the demo corpus when its cache is there), else on made-up words
(the table says so: then seconds_to_2x is not the study's figure).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's pipeline, whichever one the environment installed

import bench_common as bc  # noqa: E402
import gpu_check_report as report  # noqa: E402
from plateau import read_journal, summarize  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """What the campaign runs: the real one or its CPU dry run."""
    dry: bool
    arm_config: str
    arm_sets: tuple[str, ...]  # on every throughput arm and the ZeRO-3 smoke
    arm_seconds: float
    warmup_steps: int
    calibration_reps: int
    zero3_steps: int
    study_sets: tuple[str, ...]
    study_seconds: float
    data: tuple[int, int, int, int]  # the arms' synthetic shards: seq_len, vocab, documents, distinct words
    threads: int  # torch threads, 0 = torch's default; the dry run takes 1 (2 spin-wait on a shared 2-core machine)


REAL = Plan(dry=False, arm_config="configs/base.yaml",
            arm_sets=("train.micro_batch=128", "data.eval_samples=512",
                      "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json, ds_configs/bf16.json]"),
            arm_seconds=60.0, warmup_steps=5, calibration_reps=3, zero3_steps=5,
            study_sets=("train.micro_batch=256", "data.num_workers=4", "train.eval_every_s=10",
                        "train.ds_configs=[ds_configs/base.json, ds_configs/bf16.json]"),
            study_seconds=120.0, data=(128, 30522, 10_000, 60_000), threads=0)
DRY = Plan(dry=True, arm_config="configs/base.yaml",
           arm_sets=("model.preset=tiny", "train.micro_batch=16", "train.static_shapes=true", "data.eval_samples=64",
                     "data.num_workers=0", "data.shuffle_buffer=256",
                     "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json]"),  # no bf16 on the CPU
           arm_seconds=8.0, warmup_steps=2, calibration_reps=2, zero3_steps=3,
           study_sets=("model.preset=tiny", "train.micro_batch=64", "train.eval_every_s=4", "data.eval_samples=64"),
           study_seconds=20.0, data=(32, 256, 600, 150), threads=1)
COMMON = ("tracking.enabled=false", "train.export=false", "select.probe_every=0", "train.ckpt_every=0")


def synthetic_corpus(path: Path, documents: int, words: int, seed: int = 0) -> Path:
    """Made-up words from 70 syllables with Zipf frequencies, one document a line: a corpus large
    enough for a BERT-sized WordPiece vocab, made here because the GPU machine may be offline."""
    import itertools
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = list(dict.fromkeys("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(words)))
    cumulative = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
    with open(path, "w") as handle:
        for _ in range(documents):
            handle.write(" ".join(rng.choices(vocab, cum_weights=cumulative, k=rng.randint(20, 200))) + "\n")
    return path


def ensure_shards(out: Path, seq_len: int, vocab: int, documents: int, words: int) -> tuple[Path, str]:
    """Synthetic shards in `out`, built unless a manifest is already there; (dir, how it came)."""
    if (out / "manifest.json").is_file():
        return out, f"synthetic, reused {out}"
    from data_prep.build import BuildOptions, build_shards

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    corpus = synthetic_corpus(out.parent / f"{out.name}.txt", documents, words)
    workers = 1 if documents < 5000 else min(8, os.cpu_count() or 1)  # spawning workers costs seconds
    build_shards([str(corpus)], str(out), BuildOptions(seq_len=seq_len, vocab_size=vocab, val_fraction=0.05,
                                                       samples_per_shard=2000, workers=workers, progress=False))
    return out, f"synthetic, built in {time.perf_counter() - start:.0f} s"


def study_data(plan: Plan, arms_data: Path, out: Path) -> tuple[Path, str]:
    """The study config's shards, built from the demo corpus cache if need be; else made-up words."""
    if plan.dry:
        return arms_data, "synthetic (the arms' shards)"
    from pipeline.config import load_config

    data = REPO / load_config(str(REPO / "configs" / "study.yaml")).data.dir
    if (data / "manifest.json").is_file():
        return data, f"{data.relative_to(REPO)}"
    from data_prep.demo_corpus import CSV_NAME

    cache = REPO / "data" / "demo-corpus"
    if (cache / CSV_NAME).is_file():  # ensure_data would otherwise try the network
        from benchmarks.study import ensure_data

        return ensure_data(data, 64, 4096, cache), f"{data.relative_to(REPO)} (built from the demo corpus)"
    built, how = ensure_shards(out / "study-data", 64, 4096, 4000, 20_000)
    return built, f"{how}: NOT the study's corpus, seconds_to_2x is not comparable"


def config(plan_config: str, data: Path, out: Path, *sets: str):
    from pipeline.config import load_config

    return load_config(str(REPO / plan_config), [f"data.dir={data}", f"train.out_dir={out}", *COMMON, *sets])


def sync_of(info):
    import torch

    return torch.cuda.synchronize if info.device.type == "cuda" else None


def step(run, info):
    """One optimizer step as pipeline.train takes it (static shapes as the run has them)."""
    from pipeline.step import train_step

    return train_step(run.engine, run.selector, run.batches, run.progress, info, run.cfg.train,
                      capacity_prob=run.capacity_prob)


def timed_steps(run, info, seconds: float, warmup: int) -> list:
    """Steps for `seconds` of wall clock after `warmup` untimed ones (allocation, autotuning)."""
    for _ in range(warmup):
        step(run, info)
    window, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds:
        window.append(step(run, info))
    return window


def host_syncs(run, info, steps: int = 2) -> dict | None:
    """Host syncs per step, by who asked (pipeline/syncs.py, counted on any device); None without it."""
    try:
        from pipeline.syncs import SyncCounter
    except ImportError:
        return None
    with SyncCounter() as syncs:
        for _ in range(steps):
            step(run, info)
    return {"project": syncs.project / steps, "deepspeed": syncs.deepspeed / steps, "other": syncs.other / steps,
            "where": dict(syncs.where)}


def measure_arm(cfg, info, plan: Plan) -> dict:
    """One throughput arm: its window's metrics as the trainer logs them, and the cost model's pieces."""
    import torch

    from pipeline.config import exit_layer_run
    from pipeline.model import attention_backend
    from pipeline.run import Run
    from pipeline.step import to_device, window_metrics

    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    with Run.open(cfg, info) as run:
        window = timed_steps(run, info, plan.arm_seconds, plan.warmup_steps)
        metrics = window_metrics(window, run.progress, run.work)
        syncs = host_syncs(run, info)
        candidates = to_device(next(run.batches), info.device)
        kept = {key: value[:cfg.train.micro_batch] for key, value in candidates.items()}
        pieces = bc.calibrate_pieces(run.engine, candidates, kept, plan.calibration_reps, sync_of(info))
        selects = run.work.samples_scored > 0
        result = {"steps": len(window), "metrics": metrics, "pieces": pieces, "host_syncs": syncs,
                  "static_shapes": run.capacity_prob is not None,
                  "attention": attention_backend(run.engine.module),
                  "flops_per_step": run.work.flops(1 if selects else 0, 1), "peak_tflops": run.work.peak_tflops}
        release(run)
    scoring, train = bc.modelled_step(pieces, exit_layer_run(cfg) if selects else None)
    result.update(model_step_s=scoring + train, model_scoring_s=scoring)
    if info.device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    return result


def release(run) -> None:
    """Close the run and free its engine before the next one is built in this process."""
    import torch

    run.close("FINISHED")
    if hasattr(run.engine, "destroy"):
        run.engine.destroy()
    run.engine = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exit_vs_exact(module, batch: dict, capacity: int | None) -> float:
    """Max |exit-layer score at the last layer - the exact per-sample loss of the full forward|, over
    the samples with masked tokens: 0 when the scoring forward gathers (ZeRO-3) what training uses.
    `capacity`: both at static shapes, as the run scores and trains."""
    import torch
    from torch.nn import functional as F

    from pipeline.masking import IGNORE_INDEX
    from pipeline.sift.scoring import exit_layer_losses, per_sample_loss

    ids, labels = batch["input_ids"], batch["labels"]
    approx, count = exit_layer_losses(module, ids, labels, module.num_layers, capacity)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(ids, labels, capacity=capacity)
    finally:
        module.train(was_training)
    token_loss = F.cross_entropy(out.logits.float(), out.targets, reduction="none")  # 0 at padding
    exact, _ = per_sample_loss(token_loss, out.sample_index, ids.shape[0], valid=out.targets != IGNORE_INDEX)
    usable = count > 0
    return float((approx - exact)[usable].abs().max())


def zero3_smoke(cfg, info, steps: int) -> dict:
    """A few SIFT steps under ZeRO-3, then exit scoring at the last layer against the exact losses."""
    from pipeline.masking import head_capacity
    from pipeline.run import Run
    from pipeline.step import to_device

    with Run.open(cfg, info) as run:
        losses = [float(step(run, info).loss) for _ in range(steps)]
        batch = to_device(next(run.batches), info.device)
        rows, length = batch["labels"].shape
        capacity = None if run.capacity_prob is None else head_capacity(rows, length, run.capacity_prob)
        diff = exit_vs_exact(run.engine.module, batch, capacity)
        release(run)
    tolerance = 2e-2 if info.device.type == "cuda" else 1e-4  # bf16 on the GPU, fp32 on the CPU
    finite = all(math.isfinite(loss) for loss in losses)
    return {"steps": steps, "losses": losses, "finite": finite, "max_abs_diff": diff, "tolerance": tolerance,
            "ok": finite and diff <= tolerance}


def study(cfg, info) -> dict:
    """The study's recipe through pipeline.train for its time budget; plateau.py's summary of the journal."""
    from pipeline.train import train

    start = time.perf_counter()
    train(cfg, info)
    return {**summarize(read_journal(Path(cfg.train.out_dir))), "wall_s": time.perf_counter() - start,
            "micro_batch": cfg.train.micro_batch, "max_seconds": cfg.train.max_seconds}


def campaign(plan: Plan, out: Path, data_dir: Path | None) -> dict:
    """Every section in order; the result gpu_check.json holds and the table shows."""
    import torch

    start = time.perf_counter()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    from pipeline.distributed import init_distributed

    info = init_distributed("cpu" if plan.dry else "cuda")  # before deepspeed is imported
    seq, vocab, documents, words = plan.data
    default = out / "data" if plan.dry else REPO / "data" / f"gpu-check-s{seq}-v{vocab}"
    data, data_how = (data_dir, str(data_dir)) if data_dir else ensure_shards(default, seq, vocab, documents, words)
    result: dict = {"dry_run": plan.dry, "plan": asdict(plan), "environment": report.environment(info),
                    "data": data_how, "arms": {}}
    print(f"data: {data_how}", flush=True)
    for arm, sets in (("vanilla", ["select.policy=vanilla"]),
                      ("sift@1", ["select.policy=sift", "select.exit_layer=1", "select.oversample=2"])):
        print(f"== {arm}: {plan.arm_seconds:g} s of steps", flush=True)
        cfg = config(plan.arm_config, data, out / arm, *plan.arm_sets, *sets)
        result["arms"][arm] = measure_arm(cfg, info, plan)
    print("== ZeRO-3 SIFT smoke", flush=True)
    # every weight partitioned (no persistence threshold): each one the scoring forward uses must be gathered
    zero3 = [s.replace("ds_configs/zero2.json", "ds_configs/zero3.json, tests/ds_configs/zero3_partition_all.json")
             for s in plan.arm_sets]
    result["zero3"] = zero3_smoke(config(plan.arm_config, data, out / "zero3", *zero3, "select.policy=sift",
                                         "select.exit_layer=1"), info, plan.zero3_steps)
    print(f"== the study's recipe: {plan.study_seconds:g} s", flush=True)
    sdata, result["study_data"] = study_data(plan, data, out)
    result["study"] = study(config("configs/study.yaml", sdata, out / "study", *plan.study_sets,
                                   f"train.max_seconds={plan.study_seconds}", "tracking.enabled=true",
                                   f"tracking.uri=sqlite:///{out / 'study' / 'mlflow.db'}",
                                   "tracking.experiment=gpu-check"), info)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the same campaign on CPU, tiny preset and data")
    parser.add_argument("--out", type=Path, help="where runs and gpu_check.json go (default runs/gpu-check[-dry]/<time>)")
    parser.add_argument("--data", type=Path, help="shards for the throughput arms (default: synthetic, built once)")
    parser.add_argument("--seconds", type=float, help="seconds of steps per throughput arm")
    parser.add_argument("--study-seconds", type=float, help="training seconds of the study's recipe")
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else REAL
    plan = replace(plan, arm_seconds=args.seconds or plan.arm_seconds,
                   study_seconds=args.study_seconds or plan.study_seconds)
    from pipeline.distributed import DeviceError, choose_device

    try:
        device = choose_device("cpu" if plan.dry else "cuda")
    except DeviceError as err:
        print(f"error: {err}; `bash scripts/gpu_check.sh --dry-run` runs the campaign on the CPU", file=sys.stderr)
        return 2
    name = "gpu-check-dry" if plan.dry else "gpu-check"
    out = (args.out or REPO / "runs" / name / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = campaign(plan, out, args.data.resolve() if args.data else None)
    result["device"] = device
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    print(report.table(report.rows(result)))
    print(f"\nwritten: {out / 'gpu_check.json'}")
    failed = report.failures(result)
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
