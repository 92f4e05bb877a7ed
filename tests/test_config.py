"""Bad configuration values are errors that name the key, raised before any compute."""
import json
import re

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.ds_config import build_ds_config


@pytest.mark.parametrize("override,message,where", [
    ("train.lrr=1", "unknown config key train.lrr", "train.lrr"),
    ("nosection.x=1", "unknown config key nosection", "nosection"),
    ("train.lr=fast", "expected a number", "train.lr"),
    ("train.lr=-1", "must be > 0", "train.lr"),
    ("train.micro_batch=0", "must be >= 1", "train.micro_batch"),
    ("train.micro_batch=2.5", "expected an integer", "train.micro_batch"),
    ("train.resume=maybe", "expected true or false", "train.resume"),
    ("select.policy=smart", "must be one of", "select.policy"),
    ("select.exit_layer=-1", "must be in 0..4", "select.exit_layer"),
    ("select.exit_layer=5", "must be in 0..4 (the model's layers), got 5", "select.exit_layer"),
    ("model.num_heads=3", "256 is not divisible by model.num_heads 3", "model.hidden_size"),
    ("model.preset=huge", "must be one of", "model.preset"),
    ("data.mask_prob=1.5", "must be in (0, 1)", "data.mask_prob"),
    ("data.mask_share=1.2", "must be in [0, 1]", "data.mask_share"),
    ("data.random_share=0.3", "data.mask_share + data.random_share", "data.random_share"),
    ("select.active_from=1.5", "must be in [0, 1]", "select.active_from"),
    ("select.active_to=-0.1", "must be in [active_from, 1]", "select.active_to"),
    ("train", "override 'train' is not key=value", "--set"),
])
def test_bad_override_names_the_key(override, message, where):
    with pytest.raises(ConfigError, match=re.escape(message)) as caught:
        load_config(None, ["select.policy=sift", override])
    assert caught.value.where == where and caught.value.fix


def test_selection_policies_need_oversampling():
    with pytest.raises(ConfigError, match=r"policy sift selects among candidates.* \(select.oversample\)"):
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
    with pytest.raises(ConfigError, match=r"expected a mapping of keys, got \[1, 2\] \(train\)"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_ds_config_batch_arithmetic_is_derived_in_one_place():
    cfg = load_config(None, ["train.micro_batch=4", "train.grad_accum=3", "train.lr=0.01",
                             "train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json]"])
    ds = build_ds_config(cfg, world_size=2, device_type="cpu")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 3, 24)
    assert ds["zero_optimization"]["stage"] == 2 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["optimizer"]["params"]["lr"] == 0.01


def test_ds_config_may_not_set_batch_sizes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64}))
    cfg = load_config(None, [f"train.ds_configs=[ds_configs/base.json, {bad}]"])
    with pytest.raises(ConfigError, match=r"sets 'train_batch_size', which is derived from the run config \(.*bad.json\)"):
        build_ds_config(cfg, world_size=1, device_type="cpu")
    cfg = load_config(None, ["train.ds_configs=[ds_configs/nope.json]"])
    with pytest.raises(ConfigError, match="nope.json not found"):
        build_ds_config(cfg, world_size=1, device_type="cpu")


def test_adamw_is_torchs_and_never_needs_a_compiler():
    """DeepSpeed turns a bare "AdamW" into its FusedAdam, JIT-built with nvcc at deepspeed.initialize
    (no nvcc: the run dies at start). base.json asks for torch's AdamW, fused on CUDA. Checked to fail
    with torch_adam removed from ds_configs/base.json."""
    cfg = load_config(None, ["train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json, ds_configs/bf16.json]"])
    cpu = build_ds_config(cfg, world_size=1, device_type="cpu")["optimizer"]["params"]
    cuda = build_ds_config(cfg, world_size=1, device_type="cuda")["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu  # foreach on CPU: the tested numerics
    assert cuda["torch_adam"] is True and cuda["fused"] is True
    offload = load_config(None, ["train.ds_configs=[ds_configs/base.json, ds_configs/zero2.json, "
                                 "ds_configs/offload_optimizer.json]"])
    assert build_ds_config(offload, world_size=1, device_type="cuda")["optimizer"]["params"]["torch_adam"] is False


def test_no_config_key_looks_like_a_secret_to_the_mlflow_scrubber():
    """A key the scrubber takes for a secret (e.g. one with "token_" in it) is logged as REDACTED."""
    from dataclasses import asdict

    from pipeline.config import flatten
    from pipeline.tracking.scrub import is_secret_key

    keys = flatten(asdict(load_config(None, [])))
    assert "data.mask_share" in keys
    assert [key for key in keys if is_secret_key(key)] == []
