"""The PNG plots of a comparison.

One line per run, colour per method, linestyle per seed, the target as a horizontal line and each
run's first eval at or above it marked. They use the Agg canvas on explicit `Figure` objects, so
there is no pyplot global state and no display.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.compare.methods import method_order
from pipeline.compare.stats import BASELINE_POLICY, EvalPoint, RunData, first_reaching

logger = logging.getLogger(__name__)

LINESTYLES = ("-", "--", ":", "-.")
PROBE_KEYS = (("probe/spearman", "Spearman (exit vs exact loss)"),
              ("probe/topk_overlap", "top-k overlap (exit vs exact)"))


def group_labels(runs: Sequence[RunData]) -> dict[tuple[str, str], str]:
    """(policy, select.exit_layer) as logged -> the method the runs are compared as: "policy@exit"
    for a policy whose exit layer is a knob, the policy alone for the others (the trainer logs a
    default exit layer for them too)."""
    return {r.group: r.method for r in runs}


def _seed_order(seed: str) -> tuple[int, float | str]:
    try:
        return (0, float(seed))
    except ValueError:
        return (1, seed)


def legend_order(runs: Sequence[RunData], baseline: str = BASELINE_POLICY) -> list[RunData]:
    """Runs sorted baseline first, then by method, then by seed."""
    return sorted(runs, key=lambda r: (method_order(r.method, baseline), _seed_order(r.seed),
                                       r.name))


def run_styles(runs: Sequence[RunData], baseline: str = BASELINE_POLICY) -> dict[str, dict]:
    """run_id -> line kwargs: a colour per method, the baseline black and drawn on top; a
    linestyle per seed."""
    labels = group_labels(runs)
    others = sorted({labels[r.group] for r in runs} - {baseline},
                    key=lambda m: method_order(m, baseline))
    seeds = sorted({r.seed for r in runs}, key=_seed_order)
    styles = {}
    for r in runs:
        method = labels[r.group]
        styles[r.run_id] = {
            "color": "black" if method == baseline else f"C{others.index(method) % 10}",
            "zorder": 3 if method == baseline else 2,
            "linestyle": LINESTYLES[seeds.index(r.seed) % len(LINESTYLES)],
            "label": f"{method} seed {r.seed} ({r.name})",
        }
    return styles


def _new_figure(nrows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(9.5, 4.2 * nrows), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight")
    logger.info("wrote %s", path)
    return path


def _legend(ax) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def plot_accuracy(runs: Sequence[RunData], target: float, path: Path,
                  x_of: Callable[[EvalPoint], float | None], xlabel: str, title: str,
                  baseline: str = BASELINE_POLICY, metric: str = "eval/accuracy") -> Path:
    """The target metric against x_of(eval); evals without an x value are left out of the line."""
    fig, (ax,) = _new_figure()
    styles = run_styles(runs, baseline)
    for run in legend_order(runs, baseline):
        points = [(x_of(p), p.accuracy) for p in run.evals if x_of(p) is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=".", markersize=4, linewidth=1.4, **styles[run.run_id])
        hit = first_reaching(run.evals, target)
        if hit is not None and x_of(hit) is not None:
            ax.plot([x_of(hit)], [hit.accuracy], marker="o", markersize=9, markeredgewidth=1.6,
                    linestyle="none", markerfacecolor="none", color=styles[run.run_id]["color"],
                    zorder=4)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1.2, zorder=1,
               label=f"target {target:.4f} (o: first eval at or above)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title)
    _legend(ax)
    return _save(fig, path)


def plot_probe(runs: Sequence[RunData], path: Path,
               baseline: str = BASELINE_POLICY) -> Path | None:
    """Exit-layer vs exact ranking agreement over training; None when no run logged a probe."""
    probed = [r for r in legend_order(runs, baseline)
              if any(key in r.series for key, _ in PROBE_KEYS)]
    if not probed:
        logger.info("no run logged probe/* metrics: approximation-quality plot skipped")
        return None
    fig, axes = _new_figure(nrows=len(PROBE_KEYS))
    styles = run_styles(runs, baseline)
    for ax, (key, ylabel) in zip(axes, PROBE_KEYS):
        for run in probed:
            if key in run.series:
                steps, values = zip(*run.series[key])
                ax.plot(steps, values, linewidth=1.2, **styles[run.run_id])
        ax.set_ylabel(ylabel)
        ax.set_xlabel("optimizer step")
    _legend(axes[0])
    axes[0].set_title("Approximation quality: exit-layer loss ranking vs exact loss ranking")
    return _save(fig, path)


def write_plots(runs: Sequence[RunData], target: float, out_dir: Path,
                baseline: str = BASELINE_POLICY, metric: str = "eval/accuracy") -> list[Path]:
    """All comparison PNGs into out_dir; returns the paths written."""
    written = [
        plot_accuracy(runs, target, out_dir / "accuracy_vs_train_time.png",
                      lambda p: p.train_time_s, "training time (s, eval/train_time_s)",
                      f"{metric} vs training wall-clock", baseline, metric),
        plot_accuracy(runs, target, out_dir / "accuracy_vs_samples.png",
                      lambda p: p.samples_backpropagated,
                      "samples backpropagated (eval/samples_backpropagated)",
                      f"{metric} vs samples backpropagated", baseline, metric),
    ]
    probe = plot_probe(runs, out_dir / "approximation_quality.png", baseline)
    return written + ([probe] if probe is not None else [])
