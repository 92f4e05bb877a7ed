"""Does a recipe leave the MLM plateau, and how fast? One run, one JSON line (issue: the plateau).

    python benchmarks/plateau.py --config configs/study.yaml --max-seconds 600 [--set KEY=VALUE ...]

Trains the recipe of --config (plus --set) for --max-seconds of training time on the shards its
config names (built first from the packaged demo corpus if missing, with the command docs/RESULTS.md
gives), then prints one JSON line:

  mask_accuracy        final eval accuracy at the [MASK] positions
  reference            the most-frequent-token accuracy there (the context-free level; train-split counts)
  unigram_ce           the context-free cross-entropy there
  mask_loss            final eval loss at the [MASK] positions
  seconds_to_2x        training seconds until eval/mask_accuracy >= 2 x reference (null if never)
  seconds_to_half_nat  training seconds until eval/mask_loss <= unigram_ce - 0.5 (null if never): the
                       fairer test on corpora where one token dominates
  steps                optimizer steps done

Runs `python -m pipeline.train` in a subprocess (2 torch threads unless the config or --set says
otherwise) and reads its journal (<out>/metrics.jsonl); the MLflow store is <out>/mlflow.db.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.study import ensure_data  # noqa: E402


def first_time(evals: list[tuple[float, float]], reached) -> float | None:
    """The training seconds of the first eval (seconds, value) whose value satisfies `reached`."""
    return next((seconds for seconds, value in sorted(evals) if reached(value)), None)


def summarize(records: list[dict]) -> dict:
    """The JSON line from a run's journal records ({"step", "key", "value"})."""
    by_key: dict[str, dict[int, float]] = {}
    for r in records:
        by_key.setdefault(r["key"], {})[int(r["step"])] = float(r["value"])  # a re-run step: the last wins
    times = by_key.get("eval/train_time_s", {})
    accuracy, loss = by_key.get("eval/mask_accuracy", {}), by_key.get("eval/mask_loss", {})
    reference = next(iter(by_key.get("eval/mask_accuracy_ref", {}).values()), None)
    unigram_ce = next(iter(by_key.get("eval/unigram_ce", {}).values()), None)
    last = max(accuracy) if accuracy else None
    acc_curve = [(times[s], v) for s, v in accuracy.items() if s in times]
    loss_curve = [(times[s], v) for s, v in loss.items() if s in times]
    return {"mask_accuracy": accuracy.get(last), "reference": reference, "unigram_ce": unigram_ce,
            "mask_loss": loss.get(last),
            "seconds_to_2x": None if reference is None else first_time(acc_curve, lambda v: v >= 2 * reference),
            "seconds_to_half_nat": None if unigram_ce is None else first_time(loss_curve, lambda v: v <= unigram_ce - 0.5),
            "steps": max(by_key.get("train/loss", {0: 0})) if records else 0}


def read_journal(out_dir: Path) -> list[dict]:
    records = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-seconds", type=float, required=True, help="training seconds (train.max_seconds)")
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/plateau/<time>)")
    p.add_argument("--threads", type=int, default=2, help="train.threads unless --set gives it")
    p.add_argument("--seq-len", type=int, default=64, help="for building missing shards")
    p.add_argument("--vocab-size", type=int, default=4096, help="for building missing shards")
    args = p.parse_args(argv)

    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = Path(cfg.data.dir)
    data = data if data.is_absolute() else REPO / data
    ensure_data(data, args.seq_len, args.vocab_size, REPO / "data" / "demo-corpus")
    out = (args.out or REPO / "runs" / "plateau" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    sets = [f"data.dir={data}", f"train.out_dir={out}", f"train.max_seconds={args.max_seconds}",
            f"train.threads={args.threads}", f"tracking.uri=sqlite:///{out}/mlflow.db", "train.export=false",
            "tracking.experiment=plateau", *args.set]  # --set last: it wins
    cmd = [sys.executable, "-m", "pipeline.train", "--config", args.config, *[x for s in sets for x in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "w") as log:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"error: the training run failed with exit {code} ({out / 'train.log'}): see its last lines",
              file=sys.stderr)
        return code
    print(json.dumps(summarize(read_journal(out))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
