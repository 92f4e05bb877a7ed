"""The study script's pieces (benchmarks/study.py, study_diagnostics.py) and the MLflow UI in Chromium."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from benchmarks import study
from benchmarks.study import parse_method, train_command, parse_args
from benchmarks.study_diagnostics import read_journal, run_summary, write_diagnostics


def _write_journal(path, records, torn: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "key": k, "value": v, "timestamp": 0}) for s, k, v in records]
    (path / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9, \"ke" if torn else "\n"))


def test_parse_method():
    assert parse_method("sift@2") == ("sift", 2)
    assert parse_method("vanilla") == ("vanilla", None)
    with pytest.raises(ValueError):
        parse_method("sift@x")


def test_train_command_gives_every_arm_the_same_recipe_but_policy_and_seed(tmp_path):
    args = parse_args(["--out", str(tmp_path), "--data", str(tmp_path / "d"), "--budget", "90",
                       "--set", "train.lr=0.002"])
    a = train_command(args, tmp_path / "a", "exp", "sift@2", 1, 90, [])
    b = train_command(args, tmp_path / "b", "exp", "vanilla", 0, 90, [])
    recipe = lambda cmd: {x for x in cmd if not x.startswith(("select.", "train.seed", "train.out_dir",  # noqa: E731
                                                                 "tracking.run_name"))}
    assert recipe(a) == recipe(b)
    assert "select.exit_layer=2" in a and "select.policy=sift" in a and "train.seed=1" in a
    assert "train.max_seconds=90" in a and "train.lr=0.002" in a
    assert not any(x.startswith("select.exit_layer") for x in b)


def test_compare_step_targets_the_mask_accuracy_unless_told(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(study.subprocess, "run", lambda cmd, **kw: commands.append(cmd))
    monkeypatch.setattr(study, "write_diagnostics", lambda runs_dir, out: [])
    for extra in ([], ["--metric", "eval/accuracy", "--target", "0.06", "--baseline", "random"]):
        study.compare(parse_args(["--out", str(tmp_path), *extra]), "exp")
    assert commands[0][2:] == ["pipeline.compare", "--experiment", "exp", "--metric", "eval/mask_accuracy",
                               "--target", "auto", "--baseline", "vanilla", "--out", str(tmp_path / "compare" / "exp")]
    assert commands[1][5:11] == ["--metric", "eval/accuracy", "--target", "0.06", "--baseline", "random"]
    with pytest.raises(SystemExit):
        parse_args(["--metric", "eval/loss"])


def test_journal_reader_keeps_the_last_value_per_step_and_skips_a_torn_line(tmp_path):
    _write_journal(tmp_path / "r", [(1, "train/loss", 5.0), (1, "train/loss", 4.0), (2, "train/loss", 3.0)],
                   torn=True)
    assert read_journal(tmp_path / "r") == {"train/loss": [(1, 4.0), (2, 3.0)]}


def test_run_summary_measures_the_rare_word_bias_of_kept_batches(tmp_path):
    records = [(5, "train/loss", 6.0), (10, "train/loss", 5.5),
               (5, "select/kept_unigram_ce", 7.5), (10, "select/kept_unigram_ce", 7.3),
               (5, "select/pool_unigram_ce", 6.9), (10, "select/pool_unigram_ce", 6.9),
               (10, "eval/accuracy", 0.12), (10, "eval/distinct_predictions", 40.0),
               (10, "probe/spearman", 0.9), (10, "time/step_s", 0.5)]
    _write_journal(tmp_path / "runs" / "sift@1-s0", records)
    _write_journal(tmp_path / "runs" / "vanilla-s0", [(10, "train/loss", 5.0), (10, "eval/accuracy", 0.13)])
    row = run_summary("sift@1-s0", read_journal(tmp_path / "runs" / "sift@1-s0"))
    assert row["steps"] == 10 and row["final_accuracy"] == 0.12 and row["distinct_predictions"] == 40
    assert math.isclose(row["kept_minus_pool_ce"], 0.5, abs_tol=1e-9)
    assert math.isnan(row["scoring_share"])
    files = write_diagnostics(tmp_path / "runs", tmp_path / "out")
    table = files[0].read_text()
    assert "| sift@1-s0 | 10 | 0.1200 | 40 | 7.400 | 6.900 | 0.500 |" in table
    assert "| vanilla-s0 | 10 | 0.1300 | - |" in table
    assert files[2].stat().st_size > 1000


@pytest.mark.slow
def test_mlflow_ui_compare_page_shows_the_runs_and_metric(tmp_path):
    """A real `mlflow server` on loopback and headless Chromium (Debian package `chromium`)."""
    if not shutil.which("chromium") and not shutil.which("chromium-browser"):
        pytest.fail("this test needs headless Chromium: apt-get install -y chromium")
    from mlflow.tracking import MlflowClient

    from benchmarks.mlflow_ui import UICheckError, check_ui

    store = tmp_path / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    exp = client.create_experiment("ui-check", artifact_location=str(tmp_path / "artifacts"))
    for name, final in (("vanilla-s0", 0.21), ("sift@1-s0", 0.23)):
        run = client.create_run(exp, run_name=name, tags={"sift.kind": "train"})
        for step in (10, 20):
            client.log_metric(run.info.run_id, "eval/accuracy", final * step / 20, step=step)
        client.set_terminated(run.info.run_id)
    shot = tmp_path / "compare.png"
    seen = check_ui(store, "ui-check", "eval/accuracy", shot)
    assert seen["runs"] == ["sift@1-s0", "vanilla-s0"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UICheckError, match="no metric train/loss"):
        check_ui(store, "ui-check", "train/loss", None)


def test_sift_resid_policy_trains_and_logs_the_kept_batch_rarity(tiny_data, tmp_path, dist_info):
    from pipeline.train import train
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_data, tmp_path, "select.policy=sift_resid", "train.max_steps=3", "train.export=false")
    train(cfg, dist_info)
    series = read_journal(tmp_path)
    assert [s for s, _ in series["select/kept_unigram_ce"]] == [1, 2, 3]
    assert all(math.isfinite(v) for _, v in series["select/kept_loss"])


def test_probe_metrics_reach_the_log_when_log_every_is_above_one(tiny_data, tmp_path, dist_info):
    """The probe runs on one step of a logging window; its metrics must not be dropped with it."""
    from pipeline.train import train
    from tests.conftest import tiny_config

    cfg = tiny_config(tiny_data, tmp_path, "select.policy=sift", "train.max_steps=8", "train.log_every=4",
                      "select.probe_every=4", "train.export=false")
    train(cfg, dist_info)
    series = read_journal(tmp_path)
    assert [s for s, _ in series["probe/spearman"]] == [4, 8]
    assert [s for s, _ in series["probe/topk_overlap"]] == [4, 8]


def test_plateau_summary_reads_times_to_2x_and_half_a_nat_from_a_journal():
    from benchmarks.plateau import summarize

    rec = lambda step, key, value: {"step": step, "key": key, "value": value}  # noqa: E731
    records = [rec(0, "eval/mask_accuracy_ref", 0.04), rec(0, "eval/unigram_ce", 6.8)]
    for step, (seconds, acc, loss) in enumerate([(10, 0.04, 6.85), (20, 0.07, 6.4), (30, 0.081, 6.35),
                                                 (40, 0.09, 6.0)], start=1):
        records += [rec(step * 25, "eval/train_time_s", seconds), rec(step * 25, "eval/mask_accuracy", acc),
                    rec(step * 25, "eval/mask_loss", loss), rec(step * 25, "train/loss", 5.0)]
    assert summarize(records) == {"mask_accuracy": 0.09, "reference": 0.04, "unigram_ce": 6.8, "mask_loss": 6.0,
                                  "seconds_to_2x": 30, "seconds_to_half_nat": 40, "steps": 100}
    never = summarize(records[:2] + records[2:6])
    assert never["seconds_to_2x"] is None and never["seconds_to_half_nat"] is None
