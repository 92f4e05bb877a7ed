"""The plateau search (docs/RESULTS.md, "Leaving the plateau"): recipes side by side, one table.

    python benchmarks/plateau_search.py --budget 300 --out runs/plateau-search [--arms NAME ...]

Every arm is configs/study.yaml plus its own --set overrides, trained by benchmarks/plateau.py for
the same --budget seconds of training on the same threads (--threads each, --parallel at a time), on
the same shards. Writes <out>/search.jsonl (one line per arm: its JSON line, the overrides, the load
average at start and end), <out>/search.md (the table) and <out>/search.png (eval [MASK] accuracy
against training time, the 2x-reference line).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.plateau import read_journal  # noqa: E402

P15 = "data.mask_prob=0.15"  # BERT's rate; the study's recipe trains at 0.3
LEARNED = ["model.positions=learned", P15]
ARMS: dict[str, list[str]] = {  # name -> overrides on configs/study.yaml
    "baseline: post-LN BERT, LR 1e-3 constant": [*LEARNED, "train.schedule=steps", "train.min_lr_ratio=1.0"],
    "pre-LN BERT, 1e-3": [*LEARNED, "model.pre_layernorm=true"],
    "pre-LN BERT, 2e-3": [*LEARNED, "model.pre_layernorm=true", "train.lr=2e-3"],
    "pre-LN BERT, 4e-3": [*LEARNED, "model.pre_layernorm=true", "train.lr=4e-3"],
    "ModernBERT, 1e-3": [*LEARNED, "model.arch=modernbert"],
    "rotary BERT, 1e-3": [P15],
    "rotary BERT, 2e-3": [P15, "train.lr=2e-3"],
    "rotary pre-LN BERT, 1e-3": [P15, "model.pre_layernorm=true"],
    "rotary BERT, batch 64": [P15, "train.micro_batch=64"],
    "rotary BERT, 30% masked (study.yaml)": [],
    "rotary BERT, 30% masked, seq 128": ["data.dir=data/study-s128-v4096"],
    "ModernBERT, 30% masked": ["model.positions=learned", "model.arch=modernbert"],
}


def start(name: str, overrides: list[str], args: argparse.Namespace) -> tuple[subprocess.Popen, dict]:
    out = args.out / "".join(c if c.isalnum() else "-" for c in name).strip("-")
    cmd = [sys.executable, str(REPO / "benchmarks" / "plateau.py"), "--config", str(args.config),
           "--max-seconds", str(args.budget), "--threads", str(args.threads), "--out", str(out),
           *[x for item in overrides for x in ("--set", item)]]
    if any(o.startswith("data.dir=data/study-s128") for o in overrides):
        cmd += ["--seq-len", "128"]
    record = {"arm": name, "overrides": overrides, "out": str(out), "load_start": os.getloadavg()[0]}
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}), record


def curve(out: Path) -> list[tuple[float, float]]:
    by_key: dict[str, dict[int, float]] = {}
    for r in read_journal(out):
        by_key.setdefault(r["key"], {})[int(r["step"])] = float(r["value"])
    times, acc = by_key.get("eval/train_time_s", {}), by_key.get("eval/mask_accuracy", {})
    return sorted((times[s], v) for s, v in acc.items() if s in times)


def write_report(records: list[dict], args: argparse.Namespace) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = lambda v, d=4: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| arm | steps | final [MASK] acc | x reference | s to 2x ref | s to -0.5 nat | final [MASK] loss | load |",
             "|---|---|---|---|---|---|---|---|"]
    fig = Figure(figsize=(9.5, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    reference = None
    for r in records:
        res = r.get("result") or {}
        reference = res.get("reference") or reference
        ratio = res["mask_accuracy"] / res["reference"] if res.get("mask_accuracy") and res.get("reference") else None
        lines.append(f"| {r['arm']} | {res.get('steps', '-')} | {fmt(res.get('mask_accuracy'))} | {fmt(ratio, 2)} | "
                     f"{fmt(res.get('seconds_to_2x'), 0)} | {fmt(res.get('seconds_to_half_nat'), 0)} | "
                     f"{fmt(res.get('mask_loss'), 3)} | {r['load_start']:.1f}-{r.get('load_end', 0):.1f} |")
        points = curve(Path(r["out"]))
        if points:
            ax.plot(*zip(*points), marker=".", markersize=3, label=r["arm"])
    if reference:
        ax.axhline(2 * reference, color="grey", linestyle="--", label=f"2x reference ({2 * reference:.4f})")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("eval accuracy at [MASK]")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.savefig(args.out / "search.png", bbox_inches="tight")
    (args.out / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "study.yaml")
    p.add_argument("--budget", type=float, default=300.0, help="training seconds per arm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", type=Path, default=REPO / "runs" / "plateau-search")
    p.add_argument("--arms", nargs="+", default=list(ARMS), help="arm names (default: all)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from <out>/search.jsonl")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "search.jsonl"
    if not args.report_only:
        names = list(args.arms)
        for first in range(0, len(names), args.parallel):
            running = [start(name, ARMS[name], args) for name in names[first:first + args.parallel]]
            for proc, record in running:
                stdout, _ = proc.communicate()
                record["returncode"], record["load_end"] = proc.returncode, os.getloadavg()[0]
                lines = [line for line in stdout.splitlines() if line.startswith("{")]
                record["result"] = json.loads(lines[-1]) if lines else None
                print(json.dumps(record), flush=True)
                with open(results, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
    write_report([json.loads(line) for line in results.read_text().splitlines()], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
