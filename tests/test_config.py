"""Bad configuration values are errors that name the key, raised before any compute."""
import json
import re

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.ds_config import build_ds_config


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown config key train.lrr"),
    ("nosection.x=1", "unknown config key nosection"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("train.lr=-1", "train.lr: must be > 0"),
    ("train.micro_batch=0", "train.micro_batch: must be >= 1"),
    ("train.micro_batch=2.5", "train.micro_batch: expected an integer"),
    ("train.resume=maybe", "train.resume: expected true or false"),
    ("select.policy=smart", "select.policy: must be one of"),
    ("select.exit_layer=-1", "select.exit_layer: must be >= 0"),
    ("model.preset=huge", "model.preset: must be one of"),
    ("data.mask_prob=1.5", "data.mask_prob: must be in (0, 1)"),
    ("data.mask_share=1.2", "data.mask_share: must be in [0, 1]"),
    ("data.random_share=0.3", "data.random_share: data.mask_share + data.random_share"),
    ("select.active_from=1.5", "select.active_from: must be in [0, 1]"),
    ("select.active_to=-0.1", "select.active_to: must be in [active_from, 1]"),
    ("train", "expected key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, ["select.policy=sift", override])


def test_selection_policies_need_oversampling():
    with pytest.raises(ConfigError, match="select.oversample: policy sift selects among candidates"):
        load_config(None, ["select.policy=sift", "select.oversample=1"])


def test_config_file_and_overrides_layer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 0.002, max_steps: 7}\nselect: {policy: sift}\n")
    cfg = load_config(str(path), ["train.max_steps=9", "train.ds_configs=[ds_configs/base.json]"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.select.policy) == (0.002, 9, "sift")
    assert cfg.train.ds_configs == ["ds_configs/base.json"]


def test_bad_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="train: expected a mapping"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_ds_config_batch_arithmetic_is_derived_in_one_place():
    cfg = load_config(None, ["train.micro_batch=4", "train.grad_accum=3", "train.lr=0.01",
                             "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json, ds_configs/cpu.json]"])
    ds = build_ds_config(cfg, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == 0.01


def test_ds_config_may_not_set_batch_sizes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64}))
    cfg = load_config(None, [f"train.ds_configs=[ds_configs/base.json, {bad}]"])
    with pytest.raises(ConfigError, match="bad.json sets 'train_batch_size'"):
        build_ds_config(cfg, world_size=1)
    cfg = load_config(None, ["train.ds_configs=[ds_configs/nope.json]"])
    with pytest.raises(ConfigError, match="nope.json not found"):
        build_ds_config(cfg, world_size=1)


def test_cpu_runs_use_torch_adam_even_without_cpu_json(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    cfg = load_config(None, ["train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json]"])
    assert build_ds_config(cfg, world_size=1)["optimizer"]["params"]["torch_adam"] is True
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert "torch_adam" not in build_ds_config(cfg, world_size=1)["optimizer"]["params"]


def test_no_config_key_looks_like_a_secret_to_the_mlflow_scrubber():
    """A key the scrubber takes for a secret (e.g. one with "token_" in it) is logged as REDACTED."""
    from dataclasses import asdict

    from pipeline.config import flatten
    from pipeline.tracking.scrub import is_secret_key

    keys = flatten(asdict(load_config(None, [])))
    assert "data.mask_share" in keys
    assert [key for key in keys if is_secret_key(key)] == []
