"""A wrong run never looks right (the trust issue): a resume into another run is refused naming every
differing key, a damaged newest checkpoint gives way to the one before it, no checkpoint of a
non-finite state is ever written, and every way a run ends leaves its MLflow run with a status."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from pipeline import checkpoint
from pipeline.errors import ConfigError, DataError
from tests.conftest import REPO, clean_env, tiny_config
from tests.fault_helpers import build_small_data, journal, train_cmd


def _train(cfg, dist_info):
    from pipeline.train import train

    return train(cfg, dist_info)


def _status(out) -> tuple[str, str]:
    """(the journal's mlflow_run.json status, MLflow's status) of the run in `out`."""
    from mlflow.tracking import MlflowClient

    info = json.loads((out / "mlflow_run.json").read_text())
    return info.get("status"), MlflowClient(f"sqlite:///{out}/mlflow.db").get_run(info["run_id"]).info.status


# -- item 4: resume only into the same run -----------------------------------------------------------

def test_resume_into_another_run_is_refused_naming_every_differing_key(tiny_data, tmp_path, dist_info):
    """Before: only the model was compared, and another micro_batch or policy silently continued the
    same MLflow run."""
    from pipeline.run import Run

    _train(tiny_config(tiny_data, tmp_path, "train.max_steps=2", "train.export=false"), dist_info)
    for overrides, keys in [(["train.micro_batch=4"], ["train.micro_batch"]),
                            (["select.policy=sift", "train.lr=0.002"], ["select.policy", "train.lr"]),
                            (["model.num_layers=1"], ["model.num_layers"])]:
        with pytest.raises(ConfigError) as caught:
            Run.open(tiny_config(tiny_data, tmp_path, "train.export=false", *overrides), dist_info)
        message = caught.value.what
        assert f"in {len(keys)} key(s)" in message and all(f"{key}: " in message for key in keys), message
        assert caught.value.where.endswith("step00000002/run.json")
    other = build_small_data(tmp_path / "other")  # the same corpus maker, another corpus: other data
    with pytest.raises(ConfigError, match=r"data_identity\.shards_sha256: "):
        Run.open(tiny_config(other, tmp_path, "train.export=false"), dist_info)


def test_a_resume_with_safe_changes_goes_on_and_records_them(tiny_data, tmp_path, dist_info):
    _train(tiny_config(tiny_data, tmp_path, "train.max_steps=2", "train.export=false"), dist_info)
    _train(tiny_config(tiny_data, tmp_path, "train.max_steps=4", "train.eval_every=2", "train.export=false"),
           dist_info)
    assert sorted(journal(tmp_path, "train/loss")) == [1, 2, 3, 4]
    events = [json.loads(line) for line in (tmp_path / "tracking_events.jsonl").open()]
    tags = {k: v for e in events if e["kind"] == "tags" for k, v in e["data"].items()}
    assert "train.max_steps: 2 -> 4" in tags["resume.step2.changes"]
    assert "train.eval_every: 4 -> 2" in tags["resume.step2.changes"]


def test_the_cli_refuses_a_resume_into_another_run_with_exit_2(tiny_data, tmp_path):
    subprocess.run(train_cmd(tiny_data, tmp_path, "train.max_steps=2", "train.export=false"), env=clean_env(),
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    result = subprocess.run(train_cmd(tiny_data, tmp_path, "train.micro_batch=4", "train.export=false"),
                            env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: this run differs from the checkpoint it would resume in 1 key(s): train.micro_batch: 8 -> 4 (")


# -- item 5: a damaged newest checkpoint ------------------------------------------------------------

def test_a_damaged_newest_checkpoint_gives_way_to_the_one_before(tiny_data, tmp_path, dist_info, caplog):
    """Before: a truncated *_model_states.pt ended in a traceback."""
    from pipeline.run import Run

    _train(tiny_config(tiny_data, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.export=false"),
           dist_info)
    states = tmp_path / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="pipeline.checkpoint"):
        run = Run.open(tiny_config(tiny_data, tmp_path, "train.max_steps=6", "train.ckpt_every=2",
                                   "train.export=false"), dist_info)
    run.close("FINISHED")
    assert run.progress.step == 2
    assert f"skipping a damaged checkpoint: {states} does not open" in caplog.text
    assert checkpoint.complete_tags(tmp_path / "checkpoints") == ["step00000002"]
    assert (tmp_path / "checkpoints" / "damaged-step00000004").is_dir()  # kept for a look, never resumed


def test_when_every_checkpoint_is_damaged_the_resume_is_refused(tiny_data, tmp_path, dist_info):
    from pipeline.run import Run

    _train(tiny_config(tiny_data, tmp_path, "train.max_steps=2", "train.export=false"), dist_info)
    states = tmp_path / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    states.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match=r"every complete checkpoint is damaged .*\(.*checkpoints\)"):
        Run.open(tiny_config(tiny_data, tmp_path, "train.max_steps=4", "train.export=false"), dist_info)


# -- item 3: no checkpoint of a non-finite state ---------------------------------------------------------

def test_non_finite_weights_are_never_saved_and_stop_the_run(tiny_data, tmp_path, dist_info, monkeypatch):
    """A weight turned NaN in the step before a checkpoint: the run stops (NonFiniteStop, exit 3) and
    writes no checkpoint; the one before stays the resume point. Before: the loss was the only thing
    checked, and a checkpoint of all-NaN tensors was marked COMPLETE."""
    import pipeline.step as step_module
    from pipeline.errors import NonFiniteStop

    real = step_module.train_step

    def poisoning_step(engine, *args, **kwargs):
        metrics = real(engine, *args, **kwargs)
        if args[2].step == 4:  # progress.step: after the 4th step, before its checkpoint
            with torch.no_grad():
                next(engine.module.parameters()).fill_(float("nan"))
        return metrics

    monkeypatch.setattr(step_module, "train_step", poisoning_step)
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=6", "train.ckpt_every=2", "train.export=false")
    with pytest.raises(NonFiniteStop, match=r"non-finite weights or optimizer state at step 4"):
        _train(cfg, dist_info)
    assert checkpoint.complete_tags(tmp_path / "checkpoints") == ["step00000002"]
    assert _status(tmp_path) == ("FAILED", "FAILED")


# -- item 6: every way a run ends has a status --------------------------------------------------------

@pytest.mark.parametrize("raised,status", [(RuntimeError("a bug"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                           (DataError("bad data", "x.tar", "fix it"), "FAILED")])
def test_every_way_a_run_ends_sets_its_mlflow_status(tiny_data, tmp_path, dist_info, monkeypatch, raised, status):
    """The journal's mlflow_run.json and MLflow agree on FAILED / KILLED (a crash used to leave
    the run RUNNING when it came before the loop's own handler)."""
    import pipeline.step as step_module

    real = step_module.train_step

    def failing_step(*args, **kwargs):
        metrics = real(*args, **kwargs)
        if args[3].step == 2:
            raise raised
        return metrics

    monkeypatch.setattr(step_module, "train_step", failing_step)
    with pytest.raises(type(raised)):
        _train(tiny_config(tiny_data, tmp_path, "train.max_steps=4", "train.export=false"), dist_info)
    assert _status(tmp_path) == (status, status)
    assert journal(tmp_path, "train/loss")  # the journal kept what was logged


def test_a_truncated_validation_shard_is_exit_2_before_any_mlflow_run(tiny_data, tmp_path):
    """Before: a traceback, and an MLflow run left RUNNING for ever."""
    from tests.fault_helpers import copy_data

    data = copy_data(tiny_data, tmp_path / "data")
    val = sorted(data.glob("val-*.tar"))[0]
    val.write_bytes(val.read_bytes()[:3000])
    result = subprocess.run(train_cmd(data, tmp_path / "run", "train.max_steps=2"), env=clean_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert str(val) in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "mlflow_run.json").exists()


# -- item 8: no secret in anything a run writes ------------------------------------------------------

def test_credentials_in_the_tracking_uri_reach_no_file_and_no_log(tiny_data, tmp_path, dist_info, caplog):
    """Before: tracking.uri was logged in plaintext as an MLflow param, in the journal and in
    config.json. The server is down here (a closed port): the run trains on and journals."""
    secret = "s3cretPass9"
    cfg = tiny_config(tiny_data, tmp_path, "train.max_steps=2", "train.export=false", "tracking.retry_seconds=0.2",
                      f"tracking.uri=http://alice:{secret}@127.0.0.1:9/?token=tok{secret}")
    with caplog.at_level("INFO"):
        _train(cfg, dist_info)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".txt")]
    assert any(p.name == "config.json" for p in written) and any(p.name == "run.json" for p in written)
    for path in written:
        assert secret not in path.read_text(errors="ignore"), path
    assert secret not in caplog.text
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tracking"]["uri"].startswith("http://alice:REDACTED@127.0.0.1:9/")
