"""Tests for the noise arithmetic of pipeline.compare (methods, t quantiles, intervals, Welch,
the verdict and regime phrases), times and samples to a target on hand-made curves, the auto target."""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compare.cli import parse_args, resolve_target
from pipeline.compare.methods import group_rows, run_row, versus_baseline
from pipeline.compare.plots import group_labels, run_styles
from pipeline.compare.report import regime_lines, runs_table
from pipeline.compare.runs import latest_per_step, tracking_uri
from pipeline.compare.stats import (
    FIXED_EXIT_POLICIES, EvalPoint, RunData, accuracy_at_time, auto_target, first_reaching, method_name,
    samples_to_target, spread, t_quantile_975, time_to_target, welch,
)
from pipeline.errors import InputError

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline" / "compare"



def curve(accs, times, samples=None, first_step=100):
    """EvalPoints every 100 steps with the given accuracies, train times and samples."""
    samples = samples or [None] * len(accs)
    return [EvalPoint(first_step * (i + 1), a, t, s)
            for i, (a, t, s) in enumerate(zip(accs, times, samples))]

def test_method_name_splits_only_policies_whose_exit_layer_is_a_knob():
    assert method_name("sift", "2") == "sift@2"
    assert method_name("sift_mask", "1") == "sift_mask@1"
    assert method_name("sift_resid", "0") == "sift_resid@0"
    assert method_name("some_new_policy", "3") == "some_new_policy@3"   # split rather than merge
    for policy in ("vanilla", "random", "exact", "selective_backprop"):
        assert method_name(policy, "1") == policy
    assert method_name("sift", "-") == method_name("sift", "") == method_name("sift", None) == "sift"


def test_fixed_exit_policies_are_those_the_policy_table_does_not_score_at_the_exit():
    from pipeline.sift.policies import POLICIES

    assert FIXED_EXIT_POLICIES == {name for name, p in POLICIES.items() if p.scored_at != "exit"}


def test_run_method_prefers_the_exit_layer_that_ran():
    def run(**kw):
        return RunData("r", "r", "0", **kw)

    assert run(policy="sift", exit_layer="2").method == "sift@2"
    assert run(policy="sift", exit_layer="2", derived_exit="1").method == "sift@1"
    assert run(policy="sift", exit_layer="2", derived_exit="-").method == "sift"
    assert run(policy="exact", exit_layer="1", derived_exit="4").method == "exact"
    assert run(policy="vanilla", exit_layer="3").group == ("vanilla", "3")   # as logged


def test_t_quantiles_use_the_next_lower_tabulated_df():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303
    assert t_quantile_975(2.9) == 4.303                  # conservative between entries
    assert t_quantile_975(35) == 2.042 and t_quantile_975(10**6) == 1.980
    assert t_quantile_975(math.inf) == 1.960
    with pytest.raises(ValueError):
        t_quantile_975(0.5)


def test_spread_has_a_student_t_interval_from_two_values_on():
    s = spread([1.0, None, 2.0, 3.0])
    assert (s.mean, s.n, s.sd) == (2.0, 3, 1.0)
    half = 4.303 / math.sqrt(3)
    assert (s.ci95_low, s.ci95_high) == pytest.approx((2.0 - half, 2.0 + half))
    one = spread([5.0])
    assert (one.mean, one.n, one.sd, one.ci95_low, one.ci95_high) == (5.0, 1, None, None, None)


def test_welch_at_five_percent():
    clear = welch([10.0, 11.0, 12.0], [20.0, 21.0, 22.0])
    assert clear.t == pytest.approx(-12.247, abs=1e-3) and clear.df == pytest.approx(4.0)
    assert clear.critical == 2.776 and clear.significant
    close = welch([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0])     # t -2.19 on 6 df < 2.447
    assert close.t == pytest.approx(-2.191, abs=1e-3) and close.df == pytest.approx(6.0)
    assert not close.significant
    assert welch([1.0], [2.0, 3.0]) is None and welch([], [1.0, 2.0]) is None
    flat = welch([2.0, 2.0], [3.0, 3.0])
    assert flat.significant and flat.t is None
    assert not welch([2.0, 2.0], [2.0, 2.0]).significant


def test_versus_baseline_says_what_the_seeds_allow():
    def text(values, base):
        return versus_baseline("sift@1", values, "vanilla", base)["text"]

    assert text([16.0], [30.0, 31.0]) == "one seed only: not evidence"
    assert text([16.0, 17.0], [30.0]) == "one seed only: not evidence"
    assert text([], [30.0, 31.0]) == "no comparison: no sift@1 seed reached the target"
    assert text([16.0], []) == "no comparison: no vanilla seed reached the target"
    assert text([16.0, 16.5], [30.0, 31.0]).startswith("outside the noise (Welch t=-25.49 on 1.5")
    assert text([25.0, 35.0], [30.0, 31.0]).startswith("within the spread (Welch")
    assert text([2.0, 2.0], [3.0, 3.0]) == "outside the noise (no spread on either side)"
    assert text([2.0, 2.0], [2.0, 2.0]) == "within the spread (the same value on every seed)"
    assert versus_baseline("x", [1.0], "vanilla", [2.0, 3.0])["welch"] is None


def test_regime_lines_against_the_context_free_reference():
    groups = [{"method": "vanilla", "final_mask_accuracy": 0.041, "mask_accuracy_ref": 0.039},
              {"method": "sift@1", "final_mask_accuracy": 0.20, "mask_accuracy_ref": 0.039},
              {"method": "exact", "final_mask_accuracy": None, "mask_accuracy_ref": None}]
    lines = regime_lines(groups)
    assert lines[0] == ("regime: vanilla [MASK] accuracy 0.041 vs context-free 0.039 (1.05x): "
                        "still on the plateau, where a high loss means a rare word")
    assert lines[1].startswith("regime: sift@1 [MASK] accuracy 0.200 vs context-free 0.039 "
                               "(5.13x): past the plateau")
    assert lines[2].startswith("regime unknown for exact")
    assert regime_lines(groups[2:]) == [
        "regime unknown: the runs did not log eval/mask_accuracy_ref and eval/mask_accuracy"]
    no_ref = [{"method": "vanilla", "final_mask_accuracy": 0.04, "mask_accuracy_ref": None}]
    assert regime_lines(no_ref) == ["regime unknown: the runs did not log eval/mask_accuracy_ref"]


def _imports(path: Path) -> set[str]:
    """pipeline.compare modules a file imports, at the top or inside functions, plus the
    package itself (importing a submodule runs the package's __init__ first)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline.compare"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline.compare")}
    return found | ({"pipeline.compare"} if found else set())


def test_metric_is_one_of_the_eval_accuracies(capsys):
    assert parse_args(["--experiment", "x"]).metric == "eval/accuracy"
    assert parse_args(["--runs", "r", "--metric", "eval/mask_accuracy"]).metric == "eval/mask_accuracy"
    with pytest.raises(SystemExit):
        parse_args(["--experiment", "x", "--metric", "eval/loss"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_is_fast_without_mlflow_or_matplotlib():
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.compare", "--help"],
                          cwd=PACKAGE.parents[1], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--metric" in done.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not {m for m in imported if m.split(".")[0] in ("mlflow", "matplotlib")}


def test_time_to_target_is_the_first_eval_at_or_above_target():
    evals = curve([0.10, 0.30, 0.50, 0.45, 0.60], [10.0, 20.0, 30.0, 40.0, 50.0],
                  [320, 640, 960, 1280, 1600])
    assert time_to_target(evals, 0.50) == 30.0          # equal counts as reached
    assert time_to_target(evals, 0.45) == 30.0          # the first crossing, not the later 0.45
    assert time_to_target(evals, 0.55) == 50.0          # the dip at 0.45 does not count
    assert time_to_target(evals, 0.05) == 10.0
    assert samples_to_target(evals, 0.50) == 960
    assert time_to_target(list(reversed(evals)), 0.45) == 30.0   # step order, not list order


def test_target_never_reached_is_none_and_not_interpolated():
    evals = curve([0.10, 0.30, 0.399], [10.0, 20.0, 30.0], [1, 2, 3])
    assert first_reaching(evals, 0.40) is None
    assert time_to_target(evals, 0.40) is None
    assert samples_to_target(evals, 0.40) is None
    assert time_to_target([], 0.1) is None
    row = run_row(RunData("r1", "sift-a", "0", policy="sift", exit_layer="1", seed="0",
                          evals=evals), 0.40)
    assert row["reached"] is False and row["time_to_target_s"] is None
    assert row["final_accuracy"] == pytest.approx(0.399)
    assert "not reached" in runs_table([row])


def test_accuracy_at_time_takes_the_last_eval_at_or_before():
    evals = curve([0.1, 0.2, 0.3], [10.0, 20.0, 30.0])
    assert accuracy_at_time(evals, 20.0) == 0.2         # boundary included
    assert accuracy_at_time(evals, 29.9) == 0.2         # no interpolation towards 0.3
    assert accuracy_at_time(evals, 9.9) is None


def test_auto_target_is_min_over_baseline_runs_at_fraction_of_final_time():
    run_a = curve([0.10, 0.20, 0.30, 0.40, 0.50], [10.0, 20.0, 30.0, 40.0, 50.0])  # 80%: t=40
    run_b = curve([0.10, 0.25, 0.35, 0.45], [20.0, 40.0, 60.0, 100.0])             # 80%: t=80
    assert auto_target([run_a], 0.8) == 0.40
    assert auto_target([run_b], 0.8) == 0.35
    assert auto_target([run_a, run_b], 0.8) == 0.35
    assert auto_target([run_a, run_b], 0.5) == 0.20     # a: t=25 -> 0.20; b: t=50 -> 0.25
    assert auto_target([run_a], 1.0) == 0.50
    with pytest.raises(ValueError):
        auto_target([curve([0.5], [100.0])], 0.8)       # no eval at or before t=80
    with pytest.raises(ValueError):
        auto_target([run_a], 0.0)


def test_resolve_target_auto_uses_only_baseline_runs_and_states_the_rule():
    runs = [RunData("v", "v", "0", policy="vanilla", evals=curve([0.1, 0.2], [10.0, 20.0])),
            RunData("s", "s", "0", policy="sift", evals=curve([0.9], [1.0]))]
    target, rule = resolve_target("auto", 0.5, runs)
    assert target == 0.1 and "vanilla" in rule and "50%" in rule
    assert resolve_target("0.42", 0.8, runs)[0] == 0.42
    with pytest.raises(InputError, match=r"no vanilla runs .* \(--target auto\): pass --target VALUE"):
        resolve_target("auto", 0.8, runs[1:])
    with pytest.raises(InputError, match=r"\(--target auto\): pass --target VALUE"):  # vanilla has no early eval
        resolve_target("auto", 0.2, runs)


def test_group_rows_spread_and_ratios_to_vanilla():
    def row(policy, exit_layer, time_s, samples, acc):
        return {"policy": policy, "exit_layer": exit_layer, "reached": time_s is not None,
                "time_to_target_s": time_s, "samples_to_target": samples,
                "final_accuracy": acc, "mean_step_s": 1.0, "scoring_share": None}
    rows = [row("vanilla", "-", 40.0, 4000, 0.5), row("vanilla", "-", 60.0, 6000, 0.52),
            row("sift", "1", 20.0, 2000, 0.6), row("sift", "1", None, None, 0.3),
            row("sift", "2", None, None, 0.2)]
    groups = {(g["policy"], g["exit_layer"]): g for g in group_rows(rows)}
    sift1, sift2, van = groups[("sift", "1")], groups[("sift", "2")], groups[("vanilla", "-")]
    assert van["time_to_target_s"]["mean"] == 50.0 and van["time_ratio"] == 1.0
    assert (van["time_to_target_s"]["min"], van["time_to_target_s"]["max"]) == (40.0, 60.0)
    assert sift1["reached"] == 1 and sift1["runs"] == 2
    assert sift1["time_ratio"] == pytest.approx(20.0 / 50.0)
    assert sift1["samples_ratio"] == pytest.approx(2000 / 5000)
    assert sift2["time_to_target_s"] is None and sift2["time_ratio"] is None
    no_vanilla = group_rows([row("vanilla", "-", None, None, 0.1), row("sift", "1", 5.0, 5, .9)])
    assert all(g["time_ratio"] is None for g in no_vanilla)


def test_plot_labels_and_styles_colour_by_group_linestyle_by_seed():
    runs = [RunData("a", "a", "0", policy="vanilla", exit_layer="1", seed="0"),
            RunData("b", "b", "0", policy="vanilla", exit_layer="1", seed="1"),
            RunData("c", "c", "0", policy="sift", exit_layer="1", seed="0"),
            RunData("d", "d", "0", policy="sift", exit_layer="2", seed="1")]
    labels = group_labels(runs)
    assert labels == {("vanilla", "1"): "vanilla", ("sift", "1"): "sift@1",
                      ("sift", "2"): "sift@2"}
    styles = run_styles(runs)
    assert styles["a"]["color"] == styles["b"]["color"] == "black"
    assert len({styles[k]["color"] for k in "acd"}) == 3
    assert styles["a"]["linestyle"] == styles["c"]["linestyle"] != styles["b"]["linestyle"]
    assert styles["b"]["linestyle"] == styles["d"]["linestyle"]


def test_latest_per_step_keeps_the_last_logged_value_of_a_repeated_step():
    entries = [(100, 5, 0.30), (200, 6, 0.40), (100, 9, 0.35), (100, 7, 0.31)]
    assert latest_per_step(entries) == {100: 0.35, 200: 0.40}


def test_spread_and_tracking_uri(monkeypatch, tmp_path):
    s = spread([1.0, None, 3.0])
    assert (s.mean, s.min, s.max, s.std, s.n) == (2.0, 1.0, 3.0, 1.0, 2)
    assert spread([None]) is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    assert tracking_uri("sqlite:///given.db") == "sqlite:///given.db"
    assert tracking_uri(None) == "sqlite:///elsewhere.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
