"""The whole `pipeline.compare` command on hand-made MLflow runs in a temporary sqlite store (known
curves -> known times to target). The arithmetic alone: tests/test_compare_stats.py."""
from __future__ import annotations

import json
import time

import pytest

from pipeline.compare.cli import main
from pipeline.compare.stats import EvalPoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def curve(accs, times, samples=None, first_step=100):
    """EvalPoints every 100 steps with the given accuracies, train times and samples."""
    samples = samples or [None] * len(accs)
    return [EvalPoint(first_step * (i + 1), a, t, s)
            for i, (a, t, s) in enumerate(zip(accs, times, samples))]


# ----------------------------------------------------------------------------- end to end
# name: (policy, exit layer, seed, accuracies, train times, samples) at eval steps 100, 200, ...
RUNS = {
    "vanilla-s0": ("vanilla", "1", "0", [.10, .20, .30, .40, .50], [10, 20, 30, 40, 50],
                   [3200, 6400, 9600, 12800, 16000]),
    "vanilla-s1": ("vanilla", "1", "1", [.10, .22, .31, .42, .52], [12, 24, 36, 48, 60],
                   [3200, 6400, 9600, 12800, 16000]),
    "sift1-s0": ("sift", "1", "0", [.15, .30, .41, .50], [8, 16, 24, 32],
                 [1600, 3200, 4800, 6400]),
    "sift1-s1": ("sift", "1", "1", [.12, .28, .39, .45], [8, 16, 24, 32],
                 [1600, 3200, 4800, 6400]),
    "sift2-s0": ("sift", "2", "0", [.10, .20, .30, .35, .39], [9, 18, 27, 36, 45],
                 [1600, 3200, 4800, 6400, 8000]),
}
# auto target: vanilla-s0 at 0.8*50=40 s -> .40; vanilla-s1 at 0.8*60=48 s -> .42; min = .40
AUTO_TARGET = 0.40
EXPECTED_TIME = {"vanilla-s0": 40, "vanilla-s1": 48, "sift1-s0": 24, "sift1-s1": 32,
                 "sift2-s0": None}
EXPECTED_SAMPLES = {"vanilla-s0": 12800, "vanilla-s1": 12800, "sift1-s0": 4800,
                    "sift1-s1": 6400, "sift2-s0": None}


def _log_curves(client, exp_id, name, params, evals, series=(), tags=None):
    """One finished run: `evals` key -> values at steps 100, 200, ...; `series` (key, step, value)."""
    from mlflow.entities import Metric, Param

    run_id = client.create_run(exp_id, run_name=name, tags=tags or {}).info.run_id
    t0 = int(time.time() * 1000)
    metrics = [Metric(key, float(v), t0 + 100 * (i + 1), 100 * (i + 1))
               for key, values in evals.items() for i, v in enumerate(values)]
    metrics += [Metric(key, float(v), t0, step) for key, step, v in series]
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run_id)
    return run_id


def _log_run(client, exp_id, name, spec, tags):
    policy, exit_layer, seed, accs, times, samples = spec
    evals = {"eval/accuracy": accs, "eval/train_time_s": times,
             "eval/samples_backpropagated": samples, "progress/train_time_s": times}
    series = []
    for step in range(1, 100 * len(accs) + 1, 50):
        series.append(("time/step_s", step, 0.2 if policy == "vanilla" else 0.25))
        if policy == "sift":
            series += [("select/scoring_share", step, 0.2),
                       ("probe/spearman", step, 0.9 + 0.0001 * step),
                       ("probe/topk_overlap", step, 0.7)]
    params = {"select.policy": policy, "select.exit_layer": exit_layer,
              "select.oversample": "2", "train.seed": seed}
    return _log_curves(client, exp_id, name, params, evals, series, tags)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store with the RUNS above, one untagged, plus an old comparison run."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp_id = client.create_experiment("study", artifact_location=str(root / "artifacts"))
    ids = {}
    for name, spec in RUNS.items():
        tags = {} if name == "sift2-s0" else {"sift.kind": "train", "policy": spec[0]}
        ids[name] = _log_run(client, exp_id, name, spec, tags)
    _log_run(client, exp_id, "old-comparison", ("sift", "1", "9", [.99], [1], [1]),
             {"sift.kind": "comparison"})
    return {"uri": uri, "client": client, "exp_id": exp_id, "ids": ids, "root": root}


def _comparison_runs(client, exp_id):
    runs = client.search_runs([exp_id], filter_string="tags.`sift.kind` = 'comparison'")
    return [r for r in runs if r.info.run_name == "comparison"]


def test_compare_end_to_end_auto_target(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--experiment", "study", "--uri", store["uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    report = json.loads((out / "comparison.json").read_text())
    assert report["target"] == AUTO_TARGET and "80%" in report["target_rule"]
    rows = {r["name"]: r for r in report["runs"]}
    assert set(rows) == set(RUNS)                      # no comparison run, untagged run kept
    for name, expected in EXPECTED_TIME.items():
        assert rows[name]["time_to_target_s"] == expected, name
        assert rows[name]["samples_to_target"] == EXPECTED_SAMPLES[name], name
    assert rows["sift2-s0"]["reached"] is False
    assert rows["sift2-s0"]["final_accuracy"] == pytest.approx(0.39)
    assert rows["sift1-s0"]["mean_step_s"] == pytest.approx(0.25)
    assert rows["sift1-s0"]["scoring_share"] == pytest.approx(0.2)
    assert rows["vanilla-s0"]["scoring_share"] is None

    groups = {(g["policy"], g["exit_layer"]): g for g in report["groups"]}
    assert groups[("vanilla", "1")]["time_to_target_s"]["mean"] == 44.0
    assert groups[("sift", "1")]["time_to_target_s"]["mean"] == 28.0
    assert groups[("sift", "1")]["time_ratio"] == pytest.approx(28.0 / 44.0)
    assert groups[("sift", "1")]["samples_ratio"] == pytest.approx(5600.0 / 12800.0)
    assert groups[("sift", "2")]["time_ratio"] is None

    assert "0.4000" in printed and "not reached" in printed
    sift2_line = next(line for line in printed.splitlines() if line.startswith("| sift2-s0"))
    assert sift2_line.count("not reached") == 2
    assert "| 0.64 " in printed                        # sift@1 time ratio, 28/44
    md = (out / "comparison.md").read_text()
    assert "not reached" in md and "0.4000" in md

    pngs = ["accuracy_vs_train_time.png", "accuracy_vs_samples.png", "approximation_quality.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name
        assert str(out / name) in printed

    client = store["client"]
    logged = _comparison_runs(client, store["exp_id"])
    assert len(logged) == 1
    run = logged[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["compare.target"] == "0.400000"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "comparison")}
    assert artifacts == {f"comparison/{n}" for n in ["comparison.md", "comparison.json", *pngs]}
    assert str(store["root"] / "artifacts") in run.info.artifact_uri
    assert run.info.run_id in printed


def test_compare_given_target_run_ids_and_no_log(store, tmp_path, capsys):
    before = len(_comparison_runs(store["client"], store["exp_id"]))
    ids = [store["ids"][n] for n in ("vanilla-s0", "sift1-s1", "sift2-s0")]
    out = tmp_path / "out"
    assert main(["--runs", *ids, "--uri", store["uri"], "--target", "0.45",
                 "--out", str(out), "--no-log"]) == 0
    capsys.readouterr()
    report = json.loads((out / "comparison.json").read_text())
    rows = {r["name"]: r for r in report["runs"]}
    assert set(rows) == {"vanilla-s0", "sift1-s1", "sift2-s0"}
    assert rows["vanilla-s0"]["time_to_target_s"] == 50        # .50 at 50 s
    assert rows["sift1-s1"]["time_to_target_s"] == 32          # exactly .45 counts
    assert rows["sift2-s0"]["time_to_target_s"] is None
    groups = {(g["policy"], g["exit_layer"]): g for g in report["groups"]}
    assert groups[("sift", "1")]["time_ratio"] == pytest.approx(32 / 50)
    assert len(_comparison_runs(store["client"], store["exp_id"])) == before
    assert main(["--runs", "0" * 32, "--uri", store["uri"], "--no-log", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read the run: ")


# ----------------------------------------------------------------------------- methods and noise
# Evals at steps 100, 200, ...; eval/accuracy = [MASK] accuracy + 0.1. vanilla's exit layers differ
# and must not split it; sift's derived.exit_layer (the exit that ran) beats select.exit_layer.
NOISE = {  # name: (policy, select.exit_layer, derived.exit_layer, seed, [MASK] accs, times, samples)
    "vanilla-s0": ("vanilla", "1", None, "0", [.02, .03, .04, .05, .06], [10, 20, 30, 40, 50],
                   [1000, 2000, 3000, 4000, 5000]),
    "vanilla-s1": ("vanilla", "3", "-", "1", [.02, .03, .04, .05, .06], [11, 21, 31, 41, 51],
                   [1100, 2100, 3100, 4100, 5100]),
    "sift-s0": ("sift", "2", "1", "0", [.03, .05, .05, .06], [8, 16, 24, 32], [500, 1000, 1500, 2000]),
    "sift-s1": ("sift", "2", "1", "1", [.03, .045, .05, .06], [8.5, 16.5, 24.5, 32.5],
                [600, 1200, 1800, 2400]),
    "random-s0": ("random", "1", None, "0", [.02, .03, .045, .05], [10, 20, 25, 40],
                  [1000, 2000, 2500, 4000]),
    "random-s1": ("random", "1", None, "1", [.02, .03, .035, .041], [10, 20, 30, 35],
                  [1000, 2000, 3000, 3500]),
    "exact-s0": ("exact", "1", "4", "0", [.02, .03, .041], [20, 40, 60], [1000, 2000, 3000]),
}
MASK_REF = 0.039
# auto target on [MASK] accuracy: vanilla-s0 at 40 s -> .05, vanilla-s1 at 40.8 s -> .04: .04


@pytest.fixture(scope="module")
def noise_store(store):
    """The experiment "noise" in the same sqlite file as `store` (a new file costs seconds)."""
    return {**store, "exp_id": make_noise_experiment(store["client"], store["root"])}


def make_noise_experiment(client, root):
    """Two seeds of vanilla, sift@1 and random, one of exact, with [MASK] accuracy, its
    context-free reference (logged once, at step 0) and, for sift only, throughput."""
    exp_id = client.create_experiment("noise", artifact_location=str(root / "noise-artifacts"))
    throughput = {"samples_per_s": (100, 120), "tokens_per_s": (6400, 7680), "mfu": (0.1, 0.2),
                  "mfu_backprop": (0.05, 0.1)}
    for name, (policy, exit_layer, derived, seed, masks, times, samples) in NOISE.items():
        params = {"select.policy": policy, "select.exit_layer": exit_layer, "train.seed": seed,
                  "select.oversample": "2"}
        if derived is not None:
            params["derived.exit_layer"] = derived
        evals = {"eval/mask_accuracy": masks, "eval/accuracy": [m + 0.1 for m in masks],
                 "eval/train_time_s": times, "eval/samples_backpropagated": samples}
        series = [("eval/mask_accuracy_ref", 0, MASK_REF), ("time/step_s", 50, 0.2)]
        if policy == "sift":
            series += [(f"throughput/{key}", step, value) for key, values in throughput.items()
                       for step, value in zip((50, 150), values)]
        _log_curves(client, exp_id, name, params, evals, series, {"sift.kind": "train"})
    return exp_id


def _compare(capsys, out, *args):
    """main(args) into `out`: (what it printed, comparison.json)."""
    assert main([*args, "--out", str(out)]) == 0
    return capsys.readouterr().out, json.loads((out / "comparison.json").read_text())


def test_compare_methods_intervals_verdicts_regime_on_mask_accuracy(noise_store, tmp_path,
                                                                    capsys):
    printed, report = _compare(capsys, tmp_path, "--experiment", "noise", "--uri",
                               noise_store["uri"], "--metric", "eval/mask_accuracy")
    assert report["target"] == pytest.approx(0.04) and report["metric"] == "eval/mask_accuracy"
    assert "eval/mask_accuracy" in report["target_rule"]
    groups = {g["method"]: g for g in report["groups"]}
    assert [g["method"] for g in report["groups"]] == ["vanilla", "exact", "random", "sift@1"]
    assert groups["vanilla"]["runs"] == groups["sift@1"]["runs"] == 2
    van_time = groups["vanilla"]["time_to_target_s"]     # 30, 31: 30.5 +- 12.706 * 0.7071 / 1.414
    assert (van_time["ci95_low"], van_time["ci95_high"]) == pytest.approx((24.147, 36.853), abs=1e-3)
    assert groups["exact"]["time_to_target_s"]["ci95_low"] is None
    assert groups["sift@1"]["samples_to_target"]["mean"] == pytest.approx(1100)
    assert groups["vanilla"]["time_vs_baseline"] is None
    assert groups["sift@1"]["time_vs_baseline"]["welch"]["df"] == pytest.approx(1.4706, abs=1e-3)
    for method, key, verdict in [("sift@1", "time", "outside the noise"), ("sift@1", "samples",
                                 "outside the noise"), ("random", "time", "within the spread"),
                                 ("random", "samples", "within the spread"),
                                 ("exact", "time", "one seed only: not evidence")]:
        assert groups[method][f"{key}_vs_baseline"]["text"].startswith(verdict), (method, key)
    assert "60.0 (1 seed: no interval)" in printed and "30.5 [24.1..36.9]" in printed
    assert ("- exact vs vanilla: one seed only: not evidence (time to target 1.97x, backprops to "
            "target 0.98x)") in printed
    assert "- random vs vanilla: time to target 0.98x, within the spread" in printed
    assert "- sift@1 vs vanilla: time to target 0.53x, outside the noise" in printed
    assert ("regime: exact [MASK] accuracy 0.041 vs context-free 0.039 (1.05x): still on the "
            "plateau, where a high loss means a rare word") in printed
    assert "regime: vanilla [MASK] accuracy 0.060 vs context-free 0.039 (1.54x): past" in printed
    assert [groups["sift@1"][k] for k in ("samples_per_s", "tokens_per_s", "mfu", "mfu_backprop")
            ] == pytest.approx([110, 7040, 0.15, 0.075])
    throughput = printed[printed.index("## Throughput"):]
    assert "| sift@1  | 0.200    | -             | 110.0     | 7040     | 0.150 | 0.075" in throughput
    assert "| vanilla | 0.200    | -             | -         | -        | -     | -" in throughput

    run = _comparison_runs(noise_store["client"], noise_store["exp_id"])[0]
    assert run.data.params["compare.metric"] == "eval/mask_accuracy"


def test_compare_default_metric_is_eval_accuracy_and_regime_still_read(noise_store, tmp_path,
                                                                       capsys):
    printed, report = _compare(capsys, tmp_path, "--experiment", "noise", "--uri",
                               noise_store["uri"], "--no-log")
    assert report["metric"] == "eval/accuracy" and report["target"] == pytest.approx(0.14)
    rows = {r["name"]: r for r in report["runs"]}
    assert rows["vanilla-s0"]["final_accuracy"] == pytest.approx(0.16)
    assert rows["vanilla-s0"]["final_mask_accuracy"] == pytest.approx(0.06)
    assert rows["sift-s0"]["method"] == "sift@1" and rows["sift-s0"]["exit_layer"] == "2"
    assert "Target eval/accuracy: **0.1400**" in printed
    assert "regime: exact [MASK] accuracy 0.041" in printed


def test_compare_without_mask_metrics_says_regime_unknown(store, tmp_path, capsys):
    printed, _ = _compare(capsys, tmp_path, "--experiment", "study", "--uri", store["uri"],
                          "--no-log")
    assert "regime unknown: the runs did not log eval/mask_accuracy_ref" in printed
    assert "- sift@2 vs vanilla: no comparison: no sift@2 seed reached the target" in printed
    assert "| sift@1  | 2/2     |" in printed
    assert main(["--experiment", "study", "--uri", store["uri"], "--out", str(tmp_path), "--no-log",
                 "--metric", "eval/mask_accuracy"]) == 2
    assert capsys.readouterr().err == ("error: no run logged eval/mask_accuracy (--metric): choose another metric, "
                                       "or runs that log it\n")

