"""Time-to-accuracy study: every selection policy under the same training-time budget, past the plateau.

    python benchmarks/study.py --experiment study --budget 300 --seeds 0 1 2 --warm-x 3 \
        --policies vanilla random sift@1 sift@2 exact selective_backprop sift_mask@1 [--scratch --start-x 3]

First the eval set's context-free reference (pipeline/reference.py: the most frequent token's accuracy
at the [MASK] positions) is computed; targets are multiples of it. With `--warm-x X` a vanilla run is
trained once (cached in <out>/warm, --warm-threads threads, constant LR) until eval/mask_accuracy
reaches X times the reference, and every arm starts from its weights (`train.init_from`) into the
experiment `<experiment>-warm`. With `--scratch` every arm also runs from scratch into `<experiment>`,
selection starting when eval/mask_accuracy first reaches `--start-x` times the reference
(select.start_at_mask_accuracy; before that a policy trains the first m of its candidates).

Per seed (a "round") the policies run in an order shuffled with that seed, `--parallel` at a time
(each with `--threads` torch threads), so machine drift spreads over all policies instead of
landing on one. Every run gets the same recipe (the YAML config plus `--set`), the same data and
the same `train.max_seconds`; they differ only in select.policy / select.exit_layer and the seed.
After the runs, `python -m pipeline.compare --metric eval/mask_accuracy --target auto` is called on
each experiment (per method: intervals over seeds, a test against vanilla, the regime), and a
diagnostics table and plot are written from the runs' journals.

Outputs under --out: reference.json, warm/, runs/<experiment>/<method>-s<seed>/ (each run dir),
schedule.jsonl (start, end, load average of every run), compare/<experiment>/ (table + plots),
diagnostics.md/.json/.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.study_diagnostics import write_diagnostics  # noqa: E402
from pipeline.compare.methods import MASK_ACCURACY  # noqa: E402
from pipeline.compare.runs import METRICS  # noqa: E402


def load_average() -> float:
    return os.getloadavg()[0]


def parse_method(method: str) -> tuple[str, int | None]:
    """'sift@2' -> ('sift', 2); 'vanilla' -> ('vanilla', None)."""
    policy, _, layer = method.partition("@")
    return policy, int(layer) if layer else None


def ensure_data(data_dir: Path, seq_len: int, vocab_size: int, cache: Path) -> Path:
    """The demo corpus sharded with data_prep (built once, then reused)."""
    if (data_dir / "manifest.json").is_file():
        return data_dir
    out = subprocess.run([sys.executable, "-m", "data_prep", "-q", "demo-corpus", "--cache", str(cache)],
                         cwd=REPO, check=True, capture_output=True, text=True).stdout
    corpus = json.loads(out.strip().splitlines()[-1])
    subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", corpus["csv"], "--text-column",
                    corpus["text_column"], "--out", str(data_dir), "--seq-len", str(seq_len), "--vocab-size",
                    str(vocab_size), "--samples-per-shard", "2000", "--workers", "2", "--no-progress"],
                   cwd=REPO, check=True)
    return data_dir


def train_command(args: argparse.Namespace, out_dir: Path, experiment: str, method: str, seed: int,
                  budget: float, extra: list[str]) -> list[str]:
    policy, layer = parse_method(method)
    sets = [f"data.dir={args.data}", f"train.out_dir={out_dir}", f"train.max_seconds={budget}",
            f"train.threads={args.threads}", f"train.seed={seed}", f"select.policy={policy}",
            f"tracking.experiment={experiment}", f"tracking.run_name={method}-s{seed}", *args.set, *extra]
    if layer is not None:
        sets.append(f"select.exit_layer={layer}")
    return [sys.executable, "-m", "pipeline.train", "--config", str(args.config),
            *[item for s in sets for item in ("--set", s)]]


def start_jobs(jobs: list[tuple[str, list[str], Path]], round_: int, threads: int = 1) -> list:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    started = []
    for name, cmd, out_dir in jobs:
        out_dir.mkdir(parents=True, exist_ok=True)
        log = open(out_dir / "train.log", "w")
        record = {"run": name, "round": round_, "out_dir": str(out_dir), "start": time.time(),
                  "load_start": load_average(), "parallel": len(jobs), "command": " ".join(cmd)}
        started.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log, record))
    return started


def wait_jobs(started: list, schedule: Path) -> None:
    """Wait for every started job; append one schedule record per job."""
    for proc, log, record in started:
        record["returncode"] = proc.wait()
        log.close()
        record.update(end=time.time(), load_end=load_average())
        with open(schedule, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        status = "ok" if record["returncode"] == 0 else f"FAILED (rc {record['returncode']}, see {record['out_dir']}/train.log)"
        print(f"  {record['run']}: {record['end'] - record['start']:.0f} s wall, load {record['load_start']:.2f}"
              f" -> {record['load_end']:.2f}: {status}", flush=True)


def run_batch(jobs: list[tuple[str, list[str], Path]], schedule: Path, round_: int) -> None:
    """Start the jobs together, wait for all."""
    wait_jobs(start_jobs(jobs, round_), schedule)


def run_arms(args: argparse.Namespace, experiment: str, extra: list[str], parallel: int, budget: float) -> None:
    schedule = args.out / "schedule.jsonl"
    for seed in args.seeds:
        order = list(args.policies)
        random.Random(1000 + seed).shuffle(order)  # policies shuffled per round; seed-major
        print(f"== {experiment}: round seed {seed}: {' '.join(order)}", flush=True)
        for start in range(0, len(order), parallel):
            jobs = []
            for method in order[start:start + parallel]:
                out_dir = args.out / "runs" / experiment / f"{method}-s{seed}"
                if (out_dir / "mlflow_run.json").is_file() and args.skip_done and _finished(out_dir):
                    print(f"  {method}-s{seed}: done before, skipped", flush=True)
                    continue
                jobs.append((f"{experiment}/{method}-s{seed}",
                             train_command(args, out_dir, experiment, method, seed, budget, extra), out_dir))
            if jobs:
                run_batch(jobs, schedule, seed)


def _finished(out_dir: Path) -> bool:
    info = json.loads((out_dir / "mlflow_run.json").read_text())
    return info.get("status") == "FINISHED"


def context_free_reference(data: Path, config: Path, overrides: list[str]) -> dict[str, float]:
    """The eval set's context-free reference (pipeline/reference.py), as every run of the study logs it."""
    from pipeline.config import load_config
    from pipeline.data import eval_batches
    from pipeline.distributed import DistInfo
    from pipeline.manifest import Manifest
    from pipeline.masking import eval_mask_spec
    from pipeline.reference import context_free_reference as reference, train_unigram_counts

    cfg = load_config(str(config), [f"data.dir={data}", *overrides])
    manifest = Manifest.load(str(data))
    spec = eval_mask_spec(cfg.data, manifest)
    batches = eval_batches(manifest, spec, samples=cfg.data.eval_samples, batch=cfg.train.micro_batch, rank=0, world=1)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=__import__("torch").device("cpu"))
    return reference(train_unigram_counts(manifest), batches, spec.mask_id, info)


def warm_start(args: argparse.Namespace, target: float) -> Path:
    """The shared vanilla warm start, trained once (cached in <out>/warm) until eval/mask_accuracy
    reaches `target` (--warm-x times the reference), on --warm-threads threads, at a constant LR."""
    warm = args.out / "warm"
    if (warm / "WARM_DONE").is_file():
        print(f"== warm start: reusing {warm}", flush=True)
        return warm
    print(f"== warm start: vanilla until eval/mask_accuracy >= {target:.4f} (at most {args.warm_max_seconds:.0f} s)"
          f" into {warm}", flush=True)
    cmd = train_command(args, warm, f"{args.experiment}-warmstart", "vanilla", 0, args.warm_max_seconds,
                        [f"train.threads={args.warm_threads}", f"train.target_mask_accuracy={target}",
                         "train.schedule=steps", "train.min_lr_ratio=1.0", "train.eval_every_s=10",
                         "train.ckpt_every=0", "select.probe_every=0"])
    started = start_jobs([("warmstart/vanilla-s0", cmd, warm)], -1, args.warm_threads)
    wait_jobs(started, args.out / "schedule.jsonl")
    if started[0][2]["returncode"] != 0:
        raise SystemExit(f"the warm start failed; see {warm}/train.log")
    (warm / "WARM_DONE").write_text(json.dumps({"target_mask_accuracy": target}))
    return warm


def compare(args: argparse.Namespace, experiment: str) -> Path:
    out = args.out / "compare" / experiment
    subprocess.run([sys.executable, "-m", "pipeline.compare", "--experiment", experiment, "--metric",
                    args.metric, "--target", args.target, "--baseline", args.baseline, "--out", str(out)],
                   cwd=REPO, check=True)
    write_diagnostics(args.out / "runs" / experiment, out)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiment", default=f"study-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "study.yaml")
    p.add_argument("--data", type=Path, default=REPO / "data" / "study-s64-v4096")
    p.add_argument("--seq-len", type=int, default=64, help="for building --data when it is missing")
    p.add_argument("--vocab-size", type=int, default=4096, help="for building --data when it is missing")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "study")
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per run (train.max_seconds)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--policies", nargs="+",
                   default=["vanilla", "random", "sift@1", "sift@2", "exact", "selective_backprop", "sift_mask@1"],
                   help="'policy' or 'sift@K' (exit layer K)")
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (same round only)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--warm-x", type=float, default=0.0,
                   help="> 0: a vanilla warm start trained until eval/mask_accuracy >= X times the context-free "
                        "reference, and every arm run again from it (experiment <experiment>-warm)")
    p.add_argument("--warm-max-seconds", type=float, default=1800.0, help="the warm start's safety budget")
    p.add_argument("--warm-threads", type=int, default=2, help="threads of the warm start (it runs alone)")
    p.add_argument("--warm-budget", type=float, default=None, help="seconds per warm arm (default: --budget)")
    p.add_argument("--scratch", action="store_true", help="the arms from scratch too (experiment <experiment>)")
    p.add_argument("--start-x", type=float, default=0.0,
                   help="> 0: from-scratch arms start selecting when eval/mask_accuracy first reaches X times the "
                        "reference (select.start_at_mask_accuracy)")
    p.add_argument("--metric", default=MASK_ACCURACY, choices=METRICS,
                   help="eval metric of the target, passed to pipeline.compare: [MASK] positions alone (default; "
                        "no credit for copying the kept tokens) or all masked positions")
    p.add_argument("--baseline", default="vanilla",
                   help="passed to pipeline.compare: the method ratios and the auto target refer to (a map's "
                        "random-vs-exact arms: random)")
    p.add_argument("--target", default="auto", help="passed to pipeline.compare (a value of --metric or 'auto')")
    p.add_argument("--skip-done", action="store_true", help="keep runs that already FINISHED in --out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every run")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.data = args.data.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.out}/mlflow.db")
    args.out.mkdir(parents=True, exist_ok=True)
    _init_store()
    ensure_data(args.data, args.seq_len, args.vocab_size, args.out / "corpus")
    reference = context_free_reference(args.data, args.config, args.set)
    (args.out / "reference.json").write_text(json.dumps(reference))
    ref = reference["eval/mask_accuracy_ref"]
    print(f"study {args.experiment}: {args.policies} x seeds {args.seeds}, {args.parallel} at a time x "
          f"{args.threads} thread(s); context-free reference {ref:.4f}; MLflow {os.environ['MLFLOW_TRACKING_URI']}")
    experiments = []
    if args.warm_x > 0:
        warm = warm_start(args, args.warm_x * ref)
        run_arms(args, f"{args.experiment}-warm", [f"train.init_from={warm}"], args.parallel,
                 args.warm_budget or args.budget)
        experiments.append(f"{args.experiment}-warm")
    if args.scratch:
        start = [f"select.start_at_mask_accuracy={args.start_x * ref}"] if args.start_x > 0 else []
        run_arms(args, args.experiment, start, args.parallel, args.budget)
        experiments.append(args.experiment)
    for experiment in experiments:
        out = compare(args, experiment)
        print(f"comparison and diagnostics for {experiment}: {out}")
    return 0


def _init_store() -> None:
    """Create the MLflow schema once, before parallel runs race to migrate a new sqlite file."""
    from mlflow.tracking import MlflowClient

    MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)


if __name__ == "__main__":
    sys.exit(main())
