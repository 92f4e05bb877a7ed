"""Untrusted files: shards and checkpoints from elsewhere run no code, unsafe tar names are refused,
MLflow servers bind to loopback, and no environment secret reaches MLflow.

Data prep's own tar reader has its tests in tests/test_data_prep.py
(test_tar_members_with_unsafe_names_are_refused, test_pickled_npy_member_is_refused)."""
from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import CorruptSampleError, SkipCounter, shard_stream
from pipeline.errors import ConfigError
from tests.conftest import REPO, tiny_config
from tests.fault_helpers import copy_data, npy, read_manifest, write_manifest, write_tar

SECRET = "s3cret-value-123"


class Payload:
    """Unpickling this creates `marker`: the proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def good(key: str) -> tuple[str, bytes]:
    return f"{key}.input_ids.npy", npy(np.arange(2, 34, dtype=np.uint16))


def test_a_shard_carrying_pickle_payloads_runs_none_of_them(tmp_path):
    marker = tmp_path / "payload-ran"
    evil_npy = npy(np.array([Payload(marker)], dtype=object), allow_pickle=True)
    evil_pickle = pickle.dumps(Payload(marker))
    shard = write_tar(tmp_path / "train-000000.tar", [
        good("k-000000"), good("k-000001"),
        ("k-000001.extra.pickle", evil_pickle), ("k-000001.extra.pyd", evil_pickle),  # beside a good sample
        ("evil-000000.input_ids.npy", evil_npy),  # an object array in place of the ids
        ("evil-000001.payload.pickle", evil_pickle),  # a sample made of a pickle only
        good("k-000002")])
    url = str(shard)
    handler = SkipCounter(strict=False)
    keys = [key for key, _ in shard_stream([url], 32, 120, handler, expected={url: 4})]
    assert keys == ["k-000000", "k-000001", "k-000002"] and handler.skipped == 1
    with pytest.raises(CorruptSampleError, match=r"evil-000000.*not a plain .npy array.*allow_pickle=False"):
        list(shard_stream([url], 32, 120, SkipCounter(strict=True)))
    assert not marker.exists()

    control = tmp_path / "control"  # the same payloads are live: unpickling them does run code
    np.load(__import__("io").BytesIO(npy(np.array([Payload(control)], dtype=object), allow_pickle=True)),
            allow_pickle=True)
    assert control.exists()


@pytest.mark.parametrize("name", ["../evil.input_ids.npy", "/abs/evil.input_ids.npy",
                                  "a/../../evil.input_ids.npy", "sub/evil.input_ids.npy"])
def test_the_loader_refuses_tar_members_with_dotdot_or_absolute_paths(tmp_path, name):
    shard = write_tar(tmp_path / "train-000000.tar", [good("k-000000"), (name, good("x")[1]), good("k-000001")])
    url = str(shard)
    handler = SkipCounter(strict=False)
    keys = [key for key, _ in shard_stream([url], 32, 120, handler, expected={url: 3})]
    assert keys == ["k-000000", "k-000001"] and handler.skipped == 1
    with pytest.raises(CorruptSampleError, match="unsafe"):
        list(shard_stream([url], 32, 120, SkipCounter(strict=True)))


def test_the_loader_follows_no_link_member(tmp_path):
    shard = tmp_path / "train-000000.tar"
    write_tar(shard, [good("k-000000")])
    with tarfile.open(shard, "a") as tf:
        link = tarfile.TarInfo("k-000001.input_ids.npy")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    handler = SkipCounter(strict=False)
    keys = [key for key, _ in shard_stream([str(shard)], 32, 120, handler, expected={str(shard): 2})]
    assert keys == ["k-000000"] and handler.skipped == 1


def test_checkpoints_with_a_pickle_payload_are_refused_and_exports_are_safetensors(tiny_data, tmp_path, dist_info,
                                                                                    monkeypatch):
    import deepspeed

    from pipeline.run import Run
    from pipeline.train import train

    out = tmp_path / "run"
    train(tiny_config(tiny_data, out, "train.max_steps=2"), dist_info)
    export = sorted(p.name for p in (out / "export").iterdir())
    assert "model.safetensors" in export and not [n for n in export if n.endswith((".bin", ".pt", ".pkl"))]

    tag = out / "checkpoints" / "step00000002"
    marker = tmp_path / "payload-ran"
    state = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True)
    state["progress_extra"] = Payload(marker)  # a checkpoint tampered with
    torch.save(state, tag / "mp_rank_00_model_states.pt")
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    with pytest.raises(ConfigError, match=r"refusing to load this checkpoint.*Unsupported global: GLOBAL "
                                          r"(io|builtins).open\) \(.*mp_rank_00_model_states.pt\)"):
        Run.open(tiny_config(tiny_data, out, "train.max_steps=4"), dist_info)  # resuming it
    with pytest.raises(ConfigError, match="refusing to load this checkpoint"):
        Run.open(tiny_config(tiny_data, tmp_path / "warm", f"train.init_from={out}"), dist_info)  # warm start
    assert not marker.exists()
    torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)  # control: a plain load runs it
    assert marker.exists()


def _commands(text: str, name: str) -> list[str]:
    """Each `mlflow server` / `mlflow ui` invocation in a file, up to where its command ends."""
    found = []
    for match in re.finditer(r"mlflow[\"'\s,]+(server|ui)\b", text):
        rest = text[match.start():]
        end = re.search(r"[`\]]|\)\s*$|[^\\,]\n", rest, re.MULTILINE)
        found.append(rest[:end.end() if end else len(rest)])
    return [command for command in found if "--" in command]  # prose naming the tool is not a command


def test_every_mlflow_server_command_in_the_repo_binds_to_loopback():
    suffixes = {".py", ".sh", ".md", ".sbatch", ".yaml", ".yml", ".txt", ".toml", ".cfg"}
    files = []
    for root, dirs, names in os.walk(REPO):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("mlruns", "runs", "data", "node_modules")]
        files += [Path(root) / n for n in names if Path(n).suffix in suffixes or n == "Makefile"]
    commands = [(path, command) for path in files for command in _commands(path.read_text(errors="replace"), path.name)]
    assert len(commands) >= 2  # the tracking docstring and the test server at least
    for path, command in commands:
        assert "0.0.0.0" not in command, (path, command)
        assert re.search(r"--host[\"'\s,=]+127\.0\.0\.1", command), (path, command)


def test_no_environment_secret_reaches_mlflow_from_a_training_run(tiny_data, tmp_path, dist_info, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pipeline.train import train

    monkeypatch.setenv("HF_TOKEN", SECRET)
    data = copy_data(tiny_data, tmp_path / "data")
    manifest = read_manifest(data)  # a manifest recording a command line that held the token
    manifest.setdefault("tool", {})["argv"] = ["build", "--hub-token", SECRET]
    write_manifest(data, manifest)
    (tmp_path / "monitor.json").write_text(json.dumps({"comet": {"enabled": False, "api_key": SECRET}}))
    out = tmp_path / "run"
    cfg = tiny_config(data, out, "train.max_steps=2", "train.export=false", f"tracking.run_name=mlm-{SECRET}",
                      f"train.ds_configs=[ds_configs/base.json, {tmp_path / 'monitor.json'}]")
    train(cfg, dist_info)

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run_id = json.loads((out / "mlflow_run.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["tracking.run_name"] == "mlm-REDACTED"  # the carrier reached MLflow, redacted
    assert SECRET not in run.info.run_name
    sent = [json.dumps(run.data.params), json.dumps(run.data.tags), run.info.run_name]
    download = tmp_path / "artifacts"
    client.download_artifacts(run_id, "", str(download))
    artifacts = {p.name: p.read_text() for p in download.rglob("*") if p.is_file()}
    assert {"manifest.json", "ds_config.json", "config.json"} <= set(artifacts)
    assert "REDACTED" in artifacts["manifest.json"] and "REDACTED" in artifacts["ds_config.json"]
    # what `python -m pipeline.tracking sync` would send later: the tracker's journal
    journal = [(out / name).read_text() for name in ("metrics.jsonl", "tracking_events.jsonl", "mlflow_run.json")]
    journal += [p.read_text() for p in (out / "tracking_artifacts").rglob("*") if p.is_file()]
    for text in sent + list(artifacts.values()) + journal:
        assert SECRET not in text
