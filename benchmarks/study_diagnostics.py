"""Per-run diagnostics of a study from the runs' local journals (<run_dir>/metrics.jsonl).

What explained the issue-7 pilots: does selection keep rare-word batches (mean unigram
cross-entropy of the kept masked tokens vs the whole candidate pool), does the model collapse onto a
few tokens (distinct predictions at eval), does the exit layer rank like the exact loss (probe),
and what scoring costs (time share, step time).

    python benchmarks/study_diagnostics.py runs/study/runs/<experiment> OUT_DIR
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def read_journal(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value)] in step order; the last value logged for a step wins."""
    by_key: dict[str, dict[int, float]] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        by_key.setdefault(record["key"], {})[int(record["step"])] = float(record["value"])
    return {key: sorted(values.items()) for key, values in by_key.items()}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def run_summary(name: str, series: dict[str, list[tuple[int, float]]]) -> dict:
    """One row: means over the run of the selection diagnostics, last eval values."""
    def values(key: str) -> list[float]:
        return [v for _, v in series.get(key, [])]

    def last(key: str) -> float:
        points = series.get(key, [])
        return points[-1][1] if points else math.nan

    kept, pool = values("select/kept_unigram_ce"), values("select/pool_unigram_ce")
    return {"run": name, "steps": int(series["train/loss"][-1][0]) if series.get("train/loss") else 0,
            "final_accuracy": last("eval/accuracy"), "final_loss": last("eval/loss"),
            "distinct_predictions": last("eval/distinct_predictions"),
            "kept_unigram_ce": _mean(kept), "pool_unigram_ce": _mean(pool),
            "kept_minus_pool_ce": _mean(kept) - _mean(pool),
            "kept_loss": _mean(values("select/kept_loss")), "dropped_loss": _mean(values("select/dropped_loss")),
            "probe_spearman": _mean(values("probe/spearman")), "probe_topk_overlap": _mean(values("probe/topk_overlap")),
            "step_s": _mean(values("time/step_s")), "scoring_share": _mean(values("select/scoring_share")),
            "train_time_s": last("progress/train_time_s")}


def markdown(rows: list[dict]) -> str:
    cols = [("run", "run", None), ("steps", "steps", 0), ("final acc", "final_accuracy", 4),
            ("distinct pred.", "distinct_predictions", 0), ("kept uni-CE", "kept_unigram_ce", 3),
            ("pool uni-CE", "pool_unigram_ce", 3), ("kept-pool", "kept_minus_pool_ce", 3),
            ("kept loss", "kept_loss", 3), ("dropped loss", "dropped_loss", 3), ("probe rho", "probe_spearman", 3),
            ("probe top-k", "probe_topk_overlap", 3), ("step s", "step_s", 3), ("scoring share", "scoring_share", 3)]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = []
        for _, key, digits in cols:
            value = row[key]
            if digits is None:
                cells.append(str(value))
            elif isinstance(value, float) and math.isnan(value):
                cells.append("-")
            else:
                cells.append(f"{value:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=80)
    for name, series in sorted(runs.items()):
        style = "-" if name.endswith("s0") else "--"  # seed 0 solid, others dashed
        label = name
        kept, pool = dict(series.get("select/kept_unigram_ce", [])), dict(series.get("select/pool_unigram_ce", []))
        steps = sorted(set(kept) & set(pool))
        if steps:
            axes[0].plot(steps, [kept[s] - pool[s] for s in steps], style, label=label, lw=1)
        dist = series.get("eval/distinct_predictions", [])
        if dist:
            axes[1].plot([s for s, _ in dist], [v for _, v in dist], style, label=label, lw=1)
        rho = series.get("probe/spearman", [])
        if rho:
            axes[2].plot([s for s, _ in rho], [v for _, v in rho], style, label=label, lw=1)
    axes[0].set_title("kept - pool unigram CE of masked tokens (nats)", fontsize=9)
    axes[1].set_title("distinct predicted tokens at eval", fontsize=9)
    axes[2].set_title("probe: Spearman exit-layer vs exact loss", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].axhline(0, color="k", lw=0.5)
    handles, labels = axes[1].get_legend_handles_labels()  # every run has an eval
    fig.legend(handles, labels, fontsize=6, ncol=1, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path)
    plt.close(fig)
    return path


def write_diagnostics(runs_dir: Path, out_dir: Path) -> list[Path]:
    """diagnostics.md / .json / .png in out_dir from every run dir under runs_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {d.name: read_journal(d) for d in sorted(runs_dir.iterdir()) if (d / "metrics.jsonl").is_file()}
    rows = [run_summary(name, series) for name, series in runs.items()]
    (out_dir / "diagnostics.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "diagnostics.md").write_text(markdown(rows))
    return [out_dir / "diagnostics.md", out_dir / "diagnostics.json", plot(runs, out_dir / "diagnostics.png")]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    for written in write_diagnostics(Path(sys.argv[1]), Path(sys.argv[2])):
        print(written)
