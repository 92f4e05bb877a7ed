"""The MLflow tracking layer: read back through MlflowClient, resume, journal, secrets.

Faults (server outage, hanging server, SIGKILL, sync) are in test_tracking_outage.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline.tracking import NullTracker, resolve_uri, start_tracker
from pipeline.tracking import journal as tracking_journal
from pipeline.tracking.scrub import REDACTED, is_secret_key, redact_url
from pipeline.tracking.sync import send_records, sync_run

MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient


def tracking_cfg(uri: str = "", **overrides) -> SimpleNamespace:
    fields = dict(enabled=True, uri=uri, experiment="sift-test", artifact_location="",
                  retry_seconds=0.5)
    return SimpleNamespace(**{**fields, **overrides})


def sqlite_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def steps_in_run(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_ambient_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# -- NullTracker and start_tracker's choice --------------------------------------------------------

def test_null_tracker_does_nothing(tmp_path):
    tracker = NullTracker()
    tracker.log_params({"a": 1})
    tracker.log_metrics({"train/loss": 1.0}, step=0)
    tracker.set_tags({"policy": "sift"})
    tracker.log_artifact(str(tmp_path / "missing.txt"))
    tracker.log_dict({"a": 1}, "a.json")
    tracker.close()
    assert tracker.run_id is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rank,enabled", [(1, True), (3, True), (0, False)])
def test_other_ranks_and_disabled_tracking_get_null_tracker(tmp_path, rank, enabled):
    cfg = tracking_cfg(sqlite_uri(tmp_path), enabled=enabled)
    tracker = start_tracker(cfg, str(tmp_path / "run"), rank=rank, run_name="r")
    assert isinstance(tracker, NullTracker)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()


def test_uri_defaults_to_env_then_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_uri("") == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_uri("") == "http://127.0.0.1:5000"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"


# -- the sqlite store, read back ---------------------------------------------------------------------

def test_sqlite_default_store_holds_params_metrics_tags_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    tracker = start_tracker(tracking_cfg(), str(run_dir), rank=0, run_name="tiny-vanilla")
    tracker.log_params({"select": {"policy": "sift", "exit_layer": 1}, "train.seed": 7,
                        "data.shards": "x" * 900})
    tracker.set_tags({"policy": "sift", "sift.kind": "train"})
    for step in range(1, 4):
        tracker.log_metrics({"train/loss": 10.0 / step, "train/lr": 1e-3}, step=step)
    (run_dir / "manifest.json").write_text('{"seq_len": 128}')
    tracker.log_artifact(str(run_dir / "manifest.json"))
    tracker.log_dict({"train": {"lr": 1e-3}}, "config.json")
    tracker.close()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-vanilla"
    params = run.data.params
    assert params["select.policy"] == "sift" and params["select.exit_layer"] == "1"
    assert params["train.seed"] == "7"
    assert len(params["data.shards"]) == 500 and params["data.shards"].endswith("...")
    assert run.data.tags["policy"] == "sift" and run.data.tags["sift.kind"] == "train"
    assert steps_in_run(client, tracker.run_id, "train/loss") == [1, 2, 3]
    assert run.data.metrics["train/loss"] == pytest.approx(10.0 / 3)
    names = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert names == {"manifest.json", "config.json"}
    exp = client.get_experiment_by_name("sift-test")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    local = Path(client.download_artifacts(tracker.run_id, "config.json", str(tmp_path)))
    assert json.loads(local.read_text()) == {"train": {"lr": 1e-3}}
    # the journal has every metric, and the run is findable from the run directory
    records = tracking_journal.read_records(run_dir)
    assert len(records) == 6 and set(records[0]) == {"step", "key", "value", "timestamp"}
    info = tracking_journal.read_run_info(run_dir)
    assert info["run_id"] == tracker.run_id and info["status"] == "FINISHED"
    assert info["unsent_at_close"] == 0


def test_resume_continues_the_same_run(tmp_path):
    cfg, run_dir = tracking_cfg(sqlite_uri(tmp_path)), str(tmp_path / "run")
    first = start_tracker(cfg, run_dir, rank=0, run_name="r")
    for step in range(3):
        first.log_metrics({"train/loss": 1.0}, step)
    first.close(status="KILLED")
    assert tracking_journal.saved_run_id(run_dir) == first.run_id

    second = start_tracker(cfg, run_dir, rank=0, run_name="r", resume_run_id=first.run_id)
    client = MlflowClient(cfg.uri)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in range(3, 5):
        second.log_metrics({"train/loss": 0.5}, step)
    second.close()
    assert steps_in_run(client, first.run_id, "train/loss") == [0, 1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name("sift-test").experiment_id])) == 1


def test_a_new_run_in_a_used_run_dir_starts_its_own_journal(tmp_path):
    cfg, run_dir = tracking_cfg(sqlite_uri(tmp_path)), tmp_path / "run"
    first = start_tracker(cfg, str(run_dir), rank=0, run_name="a")
    first.log_metrics({"train/loss": 1.0}, 1)
    first.close()
    second = start_tracker(cfg, str(run_dir), rank=0, run_name="b")
    second.log_metrics({"train/loss": 2.0}, 7)
    second.close()
    assert second.run_id != first.run_id
    assert [r["step"] for r in tracking_journal.read_records(run_dir)] == [7]
    assert len(list(run_dir.glob(f"metrics.{first.run_id}.*.jsonl"))) == 1
    assert sync_run(str(run_dir))["metrics"] == 0
    assert steps_in_run(MlflowClient(cfg.uri), second.run_id, "train/loss") == [7]


def test_resuming_an_unknown_run_fails_at_start(tmp_path):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match="0{32} not found"):
        start_tracker(tracking_cfg(sqlite_uri(tmp_path)), str(tmp_path / "run"), rank=0,
                      run_name="r", resume_run_id="0" * 32)


def test_a_param_mlflow_refuses_drops_only_itself(tmp_path):
    cfg = tracking_cfg(sqlite_uri(tmp_path))
    tracker = start_tracker(cfg, str(tmp_path / "run"), rank=0, run_name="r")
    tracker.log_params({"train.max_steps": 10})
    assert tracker.flush(timeout=10)
    tracker.log_params({"train.max_steps": 20, "train.lr": 0.1})  # a param may not change
    tracker.close()
    params = MlflowClient(cfg.uri).get_run(tracker.run_id).data.params
    assert params == {"train.max_steps": "10", "train.lr": "0.1"}
    assert tracking_journal.read_run_info(tmp_path / "run")["refused"] == 1


def test_journal_survives_a_torn_last_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "key": "a", "value": 1.0, "timestamp": 1}\n'
                                            '{"step": 1, "key": "a", "val')
    journal = tracking_journal.Journal(tmp_path)
    journal.append_metrics([{"step": 2, "key": "a", "value": 3.0, "timestamp": 3}])
    journal.close()
    assert [r["step"] for r in tracking_journal.read_records(tmp_path)] == [0, 2]


# -- secrets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,secret", [
    ("HF_TOKEN", True), ("github_token", True), ("db.password", True), ("PGPASSWORD", True),
    ("OPENAI_APIKEY", True), ("wandb.api_key", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("client_secret", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("oauth", True),
    ("MLFLOW_TRACKING_AUTH", True), ("passwd", True),
    ("data.tokenizer", False), ("train.tokens_per_s", False), ("TOKENIZERS_PARALLELISM", False),
    ("author", False), ("select.policy", False), ("model.preset", False),
])
def test_secret_key_pattern(key, secret):
    assert is_secret_key(key) is secret


def test_no_environment_secret_reaches_mlflow(tmp_path, monkeypatch):
    token, password = "hf_Zq8sEcReTvAlUe42", "pg-pass-7731"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("PGPASSWORD", password)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")  # a flag, not a secret
    run_dir = tmp_path / "run"
    tracker = start_tracker(tracking_cfg(sqlite_uri(tmp_path)), str(run_dir), rank=0,
                            run_name="r")
    tracker.log_params({"hub.token": "anything", "db": {"password": "x"}, "db.url":
                        f"postgresql://u:{password}@h/db", "data.tokenizer": "tok/dir",
                        "train.tokens_per_step": 4096, "note": token, "steps": 1000})
    tracker.set_tags({"auth_header": "Bearer zzz", "cmd": f"train --token {token}"})
    tracker.log_dict({"env": {"HF_TOKEN": token}, "args": [f"--pw={password}"]}, "env.json")
    leaky = run_dir / "launch.sh"
    leaky.write_text(f"export HF_TOKEN={token}\npython -m pipeline.train\n")
    tracker.log_artifact(str(leaky))
    tracker.close()

    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    params, tags = run.data.params, run.data.tags
    assert params["hub.token"] == REDACTED and params["db.password"] == REDACTED
    assert params["db.url"] == f"postgresql://u:{REDACTED}@h/db" and params["note"] == REDACTED
    assert params["data.tokenizer"] == "tok/dir" and params["train.tokens_per_step"] == "4096"
    assert params["steps"] == "1000"  # "1" of the flag variable is not treated as a secret
    assert tags["auth_header"] == REDACTED and tags["cmd"] == f"train --token {REDACTED}"
    out = tmp_path / "downloaded"
    client.download_artifacts(tracker.run_id, "", str(out))
    sent = [p.read_text() for p in out.rglob("*") if p.is_file()]
    assert len(sent) == 2 and any("python -m pipeline.train" in text for text in sent)
    local = [p.read_text() for p in run_dir.rglob("*") if p.is_file() and p != leaky]
    for text in sent + local + [json.dumps(params), json.dumps(tags)]:
        assert token not in text and password not in text


@pytest.mark.parametrize("text,redacted", [
    ("http://user:pass@host:5000", "http://user:REDACTED@host:5000"),
    ("https://tok3n@host/x", "https://REDACTED@host/x"),
    ("https://host/?token=abc123&x=1", "https://host/?token=REDACTED&x=1"),
    ("s3 https://b.s3/k?X-Amz-Signature=ab12&X-Amz-Credential=AK/1&sv=2", "s3 https://b.s3/k?X-Amz-Signature=REDACTED"
     "&X-Amz-Credential=REDACTED&sv=2"),
    ("x?api_key=1&apikey=2&access_token=3&password=4&secret=5&sig=6&key=7&monkey=8",
     "x?api_key=REDACTED&apikey=REDACTED&access_token=REDACTED&password=REDACTED&secret=REDACTED&sig=REDACTED"
     "&key=REDACTED&monkey=8"),
    ("postgresql://u:REDACTED@h/db", "postgresql://u:REDACTED@h/db"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"), ("http://127.0.0.1:5000/a?b=c", "http://127.0.0.1:5000/a?b=c"),
    ("data.tokenizer=tok/dir", "data.tokenizer=tok/dir"),
])
def test_redact_url(text, redacted):
    assert redact_url(text) == redacted


CREDENTIALS = {"tracking": {"uri": "http://alice:pw-Xq81zz@127.0.0.1:5000"},
               "mirror": "https://host.example/api/?x=1&token=tok-Lm42yy&y=2"}


def _tracking_log(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pipeline"))


def test_credentials_in_urls_never_reach_mlflow_or_the_journal(tmp_path, caplog):
    """Fails without the fix: the resolved config was logged as params with `tracking.uri` unredacted."""
    caplog.set_level(logging.DEBUG)
    run_dir = tmp_path / "run"
    tracker = start_tracker(tracking_cfg(sqlite_uri(tmp_path)), str(run_dir), rank=0, run_name="r")
    tracker.log_params(CREDENTIALS)
    tracker.set_tags({"uri": CREDENTIALS["tracking"]["uri"], "mirror": CREDENTIALS["mirror"]})
    tracker.log_dict(CREDENTIALS, "config.json")
    tracker.close()
    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.get_run(tracker.run_id)
    assert run.data.params["tracking.uri"] == f"http://alice:{REDACTED}@127.0.0.1:5000"
    assert run.data.params["mirror"] == f"https://host.example/api/?x=1&token={REDACTED}&y=2"
    client.download_artifacts(tracker.run_id, "", str(tmp_path / "sent"))
    texts = [p.read_text() for directory in (tmp_path / "sent", run_dir) for p in directory.rglob("*") if p.is_file()]
    for text in texts + [json.dumps(run.data.params), json.dumps(run.data.tags), _tracking_log(caplog)]:
        assert "pw-Xq81zz" not in text and "tok-Lm42yy" not in text, text


def test_credentials_in_the_tracking_uri_stay_out_of_the_journal_and_log_lines(tmp_path, caplog):
    """Fails without the fix: mlflow_run.json kept a token query parameter, the journal the password."""
    caplog.set_level(logging.DEBUG)
    uri, run_dir = f"http://alice:pw-Xq81zz@127.0.0.1:{free_port()}/?token=tok-Lm42yy", tmp_path / "run"
    tracker = start_tracker(tracking_cfg(uri), str(run_dir), rank=0, run_name="r")  # nothing listens there
    tracker.log_params({"tracking": {"uri": uri}})
    tracker.log_metrics({"train/loss": 1.0}, 0)
    tracker.close()
    assert tracking_journal.read_run_info(run_dir)["uri"].startswith("http://127.0.0.1:")
    for text in [p.read_text() for p in run_dir.rglob("*") if p.is_file()] + [_tracking_log(caplog)]:
        assert "pw-Xq81zz" not in text and "tok-Lm42yy" not in text, text


def test_journal_appends_are_fsynced_without_waiting_for_close(tmp_path, monkeypatch):
    """Fails without the fix: appends were flushed, never fsynced, so a power cut could lose them."""
    synced, fsync = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.fstat(fd).st_ino), fsync(fd))[1])
    journal = tracking_journal.Journal(tmp_path)
    journal.append_metrics([{"step": 0, "key": "a", "value": 1.0, "timestamp": 1}])
    journal.append_event("tags", data={"a": "b"})
    files = {(tmp_path / name).stat().st_ino for name in ("metrics.jsonl", "tracking_events.jsonl")}
    deadline = time.monotonic() + 10
    while not files <= synced and time.monotonic() < deadline:
        time.sleep(0.01)
    assert files <= synced
    journal.close()


def test_a_run_on_the_default_store_leaves_the_checkout_clean(tmp_path, monkeypatch):
    """Fails without the fix: the sqlite schema lock `mlflow.db.lock` beside ./mlflow.db was not ignored by git."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    shutil.copy(Path(__file__).resolve().parents[1] / ".gitignore", tmp_path / ".gitignore")
    monkeypatch.chdir(tmp_path)
    tracker = start_tracker(tracking_cfg(), "runs/r", rank=0, run_name="r")
    tracker.log_metrics({"train/loss": 1.0}, 0)
    tracker.close()
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()} - {".git", ".gitignore", "runs"}
    assert written <= {"mlflow.db", "mlflow.db.lock", "mlartifacts"}  # beside the database, or in the run's dir
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert status == ["?? .gitignore"]


class RefusingClient:
    """log_batch refuses metric keys starting with "bad" for good, and fails for a while on "down"."""

    def __init__(self) -> None:
        self.logged, self.down = [], True

    def log_batch(self, run_id, metrics=(), params=(), tags=()) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        if any(m.key.startswith("bad") for m in metrics):
            raise MlflowException("invalid key", error_code=INVALID_PARAMETER_VALUE)
        if self.down and any(m.key == "down" for m in metrics):
            raise ConnectionError("server down")
        self.logged += [m.key for m in metrics]


def test_send_records_drops_only_refused_items_and_keeps_the_unsent_through_an_outage():
    from mlflow.entities import Metric

    client, keys = RefusingClient(), ["a", "bad1", "b", "down", "c", "bad2"]
    items = [Metric(key, 1.0, 0, 0) for key in keys]
    with pytest.raises(ConnectionError):
        send_records(client, "run", "metrics", items, [])
    assert client.logged == ["a", "b"] and [m.key for m in items] == ["down", "c", "bad2"]
    client.down = False
    assert send_records(client, "run", "metrics", items, []) == 1
    assert client.logged == ["a", "b", "down", "c"] and items == []


def test_importing_tracking_imports_no_mlflow():
    code = "import sys, pipeline.tracking, pipeline.tracking.__main__; assert 'mlflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)


def _pipeline_imports() -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports, at any depth of the file (imports inside functions too)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / "pipeline").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [node.module or ""]
                                ).strip(".") if node.level else node.module
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {module for module in found if module in files and module != name}
    return graph


def test_the_tracking_package_is_in_no_import_cycle():
    graph = _pipeline_imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for module in graph[todo.pop()] - seen:
                seen.add(module)
                todo.append(module)
        return seen

    assert {"pipeline.tracking.sender", "pipeline.tracking.sync"} <= reachable("pipeline.tracking")
    cycles = [name for name in graph if name.startswith("pipeline.tracking") and name in reachable(name)]
    assert cycles == []
