"""The trainer against a real `mlflow server` (127.0.0.1, free port) that is down at the start, comes
up, and is stopped and started again mid-run, with a crash and a resume in between: training never
waits for MLflow, one MLflow run holds the whole training, and every journaled metric reaches it.

The tracker's own outage tests (no trainer) are in tests/test_tracking_outage.py."""
from __future__ import annotations

import json

import pytest

from pipeline.sift.hook import Selector
from tests.conftest import free_port, tiny_config
from tests.test_tracking_outage import MlflowServer

pytestmark = pytest.mark.slow


def at_steps(monkeypatch, actions: dict[int, callable]) -> None:
    """Run actions[k] once, in the step after step k (the selector is called once per micro-step)."""
    select, done = Selector.select, set()

    def select_with_actions(self, model, batch, step, *args, **kwargs):
        if step in actions and step not in done:
            done.add(step)
            actions[step]()
        return select(self, model, batch, step, *args, **kwargs)

    monkeypatch.setattr(Selector, "select", select_with_actions)


def crash() -> None:
    raise RuntimeError("simulated crash")


def test_server_down_at_start_and_mid_run_with_a_crash_between_loses_no_metric(tiny_data, tmp_path, dist_info,
                                                                             monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = free_port()
    server, uri, out = MlflowServer(tmp_path / "server.db", port, tmp_path), f"http://127.0.0.1:{port}", tmp_path / "run"
    settings = [f"tracking.uri={uri}", "tracking.retry_seconds=0.5", "train.ckpt_every=2", "train.export=false",
                "train.max_steps=10"]
    try:
        # MLflow is down when training starts; it comes up during step 3; the process dies in step 4,
        # so the newest checkpoint (step 2) was saved before MLflow had a run id
        at_steps(monkeypatch, {2: server.start, 3: crash})
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(tiny_config(tiny_data, out, *settings), dist_info)
        first_run = json.loads((out / "mlflow_run.json").read_text())["run_id"]
        assert first_run

        # the restart resumes step 2 and the same MLflow run; MLflow goes down in step 6 and is back in step 9
        monkeypatch.undo()
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        at_steps(monkeypatch, {5: server.stop, 8: server.start})
        train(tiny_config(tiny_data, out, *settings), dist_info)

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("sift-pretrain")
        runs = client.search_runs([experiment.experiment_id])
        assert [r.info.run_id for r in runs] == [first_run]  # one run for the whole training
        assert runs[0].info.status == "FINISHED"
        info = json.loads((out / "mlflow_run.json").read_text())
        assert info["run_id"] == first_run and info["unsent_at_close"] == 0

        journal = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        keys = {r["key"] for r in journal}
        assert {"train/loss", "eval/loss", "data/skipped_corrupt", "train/nonfinite_skipped"} <= keys
        sent = {(m.key, m.step, m.value) for key in keys for m in client.get_metric_history(first_run, key)}
        assert {(r["key"], r["step"], r["value"]) for r in journal} == sent  # every record, nothing else
        assert sorted({step for key, step, _ in sent if key == "train/loss"}) == list(range(1, 11))
    finally:
        server.stop()
