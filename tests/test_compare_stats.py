"""Tests for the noise arithmetic of pipeline.compare (methods, t quantiles, intervals, Welch,
the verdict and regime phrases) and for the package's shape (no import cycles, small files)."""
from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.compare.cli import parse_args
from pipeline.compare.methods import versus_baseline
from pipeline.compare.report import regime_lines
from pipeline.compare.stats import (
    FIXED_EXIT_POLICIES, RunData, method_name, spread, t_quantile_975, welch,
)

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline" / "compare"


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


def test_package_has_no_import_cycle_and_no_long_file():
    def name(path: Path) -> str:
        return "pipeline.compare" + ("" if path.stem == "__init__" else f".{path.stem}")

    files = sorted(PACKAGE.glob("*.py"))
    graph = {name(p): _imports(p) - {name(p)} for p in files}
    assert graph["pipeline.compare"] == set()             # __init__ imports nothing
    done: list[str] = []
    while len(done) < len(graph):                         # topological order, or a cycle
        ready = [m for m in graph if m not in done and graph[m] <= set(done)]
        assert ready, f"import cycle among {sorted(set(graph) - set(done))}"
        done += ready
    for path in files:
        assert len(path.read_text().splitlines()) <= 400, path.name


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
