"""Tracking under faults: a server stopped and restarted mid-run, a hanging server, a SIGKILLed
trainer, and `sync` recovering what never reached MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from test_tracking import (  # noqa: F401  (the autouse fixture applies here too)
    _no_ambient_tracking_uri, free_port, sqlite_uri, steps_in_run, tracking_cfg)

from pipeline.tracking import journal as tracking_journal
from pipeline.tracking import MlflowTracker, start_tracker
from pipeline.tracking.__main__ import main
from pipeline.tracking import RunTarget
from pipeline.tracking.sync import sync_run

MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient


KILLED_TRAINER = """
import os, signal, sys
from types import SimpleNamespace
from pipeline.tracking import start_tracker
cfg = SimpleNamespace(enabled=True, uri=sys.argv[1], experiment="sift-test", artifact_location="",
                      retry_seconds=0.5)
tracker = start_tracker(cfg, sys.argv[2], rank=0, run_name="killed")
tracker.log_params({"train.seed": 5})
for step in range(5):
    tracker.log_metrics({"train/loss": 1.0}, step)
assert tracker.flush(timeout=30)
for step in range(5, 10):  # buffered for the next send, a second away
    tracker.log_metrics({"train/loss": 1.0}, step)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_resume_after_sigkill_sends_what_the_killed_process_had_buffered(tmp_path):
    cfg, run_dir = tracking_cfg(sqlite_uri(tmp_path)), str(tmp_path / "run")
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", KILLED_TRAINER, cfg.uri, run_dir], cwd=repo,
                           env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert child.returncode == -signal.SIGKILL
    run_id = tracking_journal.saved_run_id(run_dir)
    client = MlflowClient(cfg.uri)
    assert steps_in_run(client, run_id, "train/loss") == [0, 1, 2, 3, 4]

    tracker = start_tracker(cfg, run_dir, rank=0, run_name="killed", resume_run_id=run_id)
    tracker.log_metrics({"train/loss": 0.5}, 10)
    tracker.close()
    assert steps_in_run(client, run_id, "train/loss") == list(range(11))
    assert client.get_run(run_id).data.params == {"train.seed": "5"}


class StuckClient:
    """An MLflow client whose log_batch hangs (a server that accepts and never answers)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def update_run(self, run_id, status=None) -> None:
        pass

    def log_batch(self, run_id, metrics=(), params=(), tags=()) -> None:
        self.release.wait(timeout=30)

    def set_terminated(self, run_id, status=None) -> None:
        pass


def test_a_hanging_server_never_blocks_logging_and_close_is_bounded(tmp_path):
    client = StuckClient()
    target = RunTarget(uri="http://stuck", experiment="e", run_name="r", run_id="abc")
    tracker = MlflowTracker(client, tmp_path, target, retry_seconds=0.1, close_timeout=0.5)
    tracker.log_metrics({"train/loss": 1.0}, 0)
    assert not tracker.flush(timeout=0.3)  # the sender is stuck in log_batch
    started = time.monotonic()
    for step in range(1, 200):
        tracker.log_metrics({"train/loss": 1.0}, step)
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    tracker.close()
    assert time.monotonic() - started < 2.0
    client.release.set()
    assert tracking_journal.read_run_info(tmp_path)["unsent_at_close"] == 200
    assert len(tracking_journal.read_records(tmp_path)) == 200


def test_sync_sends_what_a_down_server_never_got(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there, from start to close
    run_dir = tmp_path / "run"
    started = time.monotonic()
    tracker = start_tracker(tracking_cfg(down), str(run_dir), rank=0, run_name="offline")
    assert tracker.run_id is None and time.monotonic() - started < 5
    tracker.log_params({"train.seed": 3})
    tracker.set_tags({"policy": "sift"})
    for step in range(20):
        t0 = time.monotonic()
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, step)
        assert time.monotonic() - t0 < 1.0
    tracker.log_dict({"a": 1}, "config.json")
    t0 = time.monotonic()
    tracker.close()
    assert time.monotonic() - t0 < 5
    info = tracking_journal.read_run_info(run_dir)
    assert info["run_id"] is None and info["unsent_at_close"] > 0

    # the server's store is reachable again (here: directly as sqlite)
    store = sqlite_uri(tmp_path)
    report = sync_run(str(run_dir), uri=store)
    assert report["metrics"] == 40 and report["params"] == 1 and report["artifacts"] == 1
    client = MlflowClient(store)
    run = client.get_run(report["run_id"])
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params == {"train.seed": "3"} and run.data.tags["policy"] == "sift"
    assert steps_in_run(client, run.info.run_id, "train/lr") == list(range(20))
    assert tracking_journal.saved_run_id(run_dir) == run.info.run_id
    again = sync_run(str(run_dir), uri=store)
    assert (again["metrics"], again["params"], again["tags"], again["artifacts"]) == (0, 0, 0, 0)
    assert steps_in_run(client, run.info.run_id, "train/loss") == list(range(20))


def test_sync_cli_fills_only_missing_steps(tmp_path, capsys):
    cfg, run_dir = tracking_cfg(sqlite_uri(tmp_path)), tmp_path / "run"
    tracker = start_tracker(cfg, str(run_dir), rank=0, run_name="r")
    for step in range(5):
        tracker.log_metrics({"eval/loss": 2.0}, step)
    tracker.close()
    # records that reached the journal but not MLflow (e.g. the buffer overflowed)
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in range(5, 8):
            f.write(json.dumps({"step": step, "key": "eval/loss", "value": 1.5,
                                "timestamp": 1000 + step}) + "\n")
    assert main(["sync", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == 3
    assert main(["sync", str(run_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == 0
    history = MlflowClient(cfg.uri).get_metric_history(tracker.run_id, "eval/loss")
    assert sorted(m.step for m in history) == list(range(8))


class MlflowServer:
    """`mlflow server` on 127.0.0.1 over a sqlite store, started in its own process group."""

    def __init__(self, store: Path, port: int, workdir: Path) -> None:
        self.store, self.port, self.workdir = store, port, workdir
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.store}",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.workdir / "server.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError("mlflow server did not answer /health")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_server_outage_mid_run_loses_no_metric(tmp_path):
    port = free_port()
    server = MlflowServer(tmp_path / "server.db", port, tmp_path)
    server.start()
    try:
        uri = f"http://127.0.0.1:{port}"
        tracker = start_tracker(tracking_cfg(uri, retry_seconds=0.5), str(tmp_path / "run"),
                                rank=0, run_name="outage")
        tracker.log_params({"train.seed": 1})
        slowest = 0.0

        def log_steps(steps: range) -> None:
            nonlocal slowest
            for step in steps:
                t0 = time.monotonic()
                tracker.log_metrics({"train/loss": 1.0 / (step + 1), "progress/step": step}, step)
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.02)

        log_steps(range(0, 10))
        assert tracker.flush(timeout=30)
        server.stop()
        log_steps(range(10, 40))  # the server is down: training goes on
        time.sleep(1.5)  # let the sender hit the outage a few times
        assert tracker.unsent() > 0
        server.start()
        log_steps(range(40, 50))
        tracker.close()
        assert slowest < 1.0

        client = MlflowClient(uri)
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED" and run.data.params == {"train.seed": "1"}
        for key in ("train/loss", "progress/step"):
            assert steps_in_run(client, tracker.run_id, key) == list(range(50))
        assert tracking_journal.read_run_info(tmp_path / "run")["unsent_at_close"] == 0
    finally:
        server.stop()
