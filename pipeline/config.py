"""Typed run configuration: dataclasses loaded from YAML/JSON plus dotted command-line overrides.

Science knobs (model, data, selection) live here; speed knobs (ZeRO stage, precision, offload) live
in the DeepSpeed JSON files under ds_configs/ (see pipeline/ds_config.py).
Every key is checked before any compute starts: unknown keys and bad values raise ConfigError
naming the key.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError, set_key

# model.preset -> (layers, hidden, heads, intermediate); model.* keys override single values
PRESETS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 32, 2, 64),  # tests
    "mini": (4, 256, 4, 1024),  # CPU studies
    "base": (12, 768, 12, 3072),  # BERT-base, as in the paper
    "large": (24, 1024, 16, 4096),
}


ARCHES = ("bert", "modernbert")


@dataclass
class ModelConfig:
    arch: str = "bert"  # bert (learned absolute positions, post-LN) | modernbert (rotary, pre-norm, GLU); pipeline/model.py
    preset: str = "mini"  # tiny | mini | base | large (sizes in PRESETS)
    num_layers: int = 0  # transformer blocks; 0 = the preset's value (likewise the next three keys)
    hidden_size: int = 0  # width of the hidden states; 0 = the preset's
    num_heads: int = 0  # attention heads; 0 = the preset's
    intermediate_size: int = 0  # the MLP's inner width; 0 = the preset's
    max_position: int = 0  # longest sequence the model takes; 0 = the data's seq_len
    dropout: float = 0.1  # dropout in embeddings, attention and MLP (0 for short CPU runs)
    pre_layernorm: bool = False  # bert only, True: pre-LN wiring (pipeline/prenorm.py); not exportable as HF BERT
    positions: str = "learned"  # bert only: learned (absolute, as BERT) | rotary (pipeline/rotary.py); not exportable

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(layers, hidden, heads, intermediate): the preset's, with the explicit keys applied."""
        layers, hidden, heads, inner = PRESETS[self.preset]
        return (self.num_layers or layers, self.hidden_size or hidden, self.num_heads or heads,
                self.intermediate_size or inner)


@dataclass
class DataConfig:
    dir: str = "data/demo"  # a data_prep output directory
    mask_prob: float = 0.15  # share of the non-special tokens chosen for prediction in training
    eval_mask_prob: float = 0.15  # ... in the fixed eval set (the same for every run, whatever it trains with)
    mask_share: float = 0.8  # of the masked tokens: [MASK] in the input (BERT: 0.8)
    random_share: float = 0.1  # ... a random token (BERT: 0.1); the rest stay as they are
    shuffle_buffer: int = 2000  # samples in the streaming shuffle buffer
    num_workers: int = 0  # DataLoader workers per rank
    eval_samples: int = 512  # fixed-mask validation samples (all ranks together)
    strict: bool = False  # True: a corrupt or changed shard stops training; False: skip it, count it
    verify: bool = True  # check each shard's sha256 against the manifest when it is first opened


@dataclass
class TrainConfig:
    out_dir: str = ""  # the run directory; "" = a new runs/<run name>-<time>; an existing one is resumed
    ds_configs: list[str] = field(default_factory=lambda: ["ds_configs/base.json"])  # DeepSpeed JSONs, merged in order
    micro_batch: int = 16  # m: samples backpropagated per rank per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step
    lr: float = 5e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # the LR decays to lr * min_lr_ratio at the end of the budget
    schedule: str = "auto"  # steps | time | auto (time when max_seconds is set): pipeline/schedule.py
    lr_decay: str = "cosine"  # cosine | linear
    warmup_steps: int = 100  # the steps schedule's warmup
    warmup_fraction: float = 0.05  # the time schedule's warmup: this fraction of max_seconds
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient clipping by global norm
    max_steps: int = 1000  # optimizer steps; the run stops at the first of max_steps, max_seconds, a target
    max_seconds: float = 0.0  # budget of training time in seconds (eval and checkpoints not counted); 0 = none
    target_accuracy: float = 0.0  # stop when eval/accuracy reaches it; 0 = never
    target_mask_accuracy: float = 0.0  # stop when eval/mask_accuracy (at [MASK] positions) reaches it; 0 = never
    eval_every: int = 200  # evaluate every n optimizer steps
    eval_every_s: float = 0.0  # also evaluate each time this much training time has passed; 0 = off
    log_every: int = 10  # log a window of step metrics every n steps
    ckpt_every: int = 200  # 0 = only at the end
    keep_checkpoints: int = 2  # complete checkpoints kept (older ones are deleted)
    max_nonfinite_in_a_row: int = 5  # non-finite losses in a row that stop the run (exit 3)
    seed: int = 0  # weights, data order, masking and selection all follow it
    threads: int = 0  # torch intra-op threads per rank; 0 = leave torch's default
    device: str = "auto"  # auto | cpu | cuda; auto: cuda when usable, and an error when GPUs were asked for but none works
    compile: bool = False  # torch.compile the model's forward (engine.compile); off: not yet measured on a GPU (docs/GPU.md)
    static_shapes: str = "auto"  # auto | true | false: the MLM head at a fixed number of positions (no host sync; auto: on CUDA)
    resume: bool = True  # resume from the newest complete checkpoint in out_dir
    export: bool = True  # write a Hugging Face model directory at the end
    record_keys: bool = False  # write each step's candidate and kept sample keys to out_dir/keys/
    init_from: str = ""  # warm start: module weights only from this checkpoint (a run dir or its step dir)
    peak_tflops: float = 0.0  # the GPU's dense peak TFLOP/s for throughput/mfu; 0 = from pipeline/flops.py's table (unknown on CPU: no MFU)


@dataclass
class SelectConfig:
    policy: str = "vanilla"  # vanilla | random | sift | exact | selective_backprop | sift_resid | sift_mask (pipeline/sift/policies.py)
    oversample: int = 2  # candidates per micro-step = micro_batch * oversample
    exit_layer: int = 1  # blocks run for scoring (sift); exact uses num_layers
    sb_beta: float = 1.0  # selective_backprop: keep prob = percentile ** beta
    sb_history: int = 1024  # selective_backprop: losses remembered for the percentile
    active_from: float = 0.0  # fraction of the budget (max_seconds on the time schedule, else max_steps) at which selection starts
    active_to: float = 1.0  # ... and stops; outside it the first m candidates train
    start_at_mask_accuracy: float = 0.0  # > 0: selection starts when eval/mask_accuracy first reaches this; 0 = off
    every: int = 1  # select on every n-th step only
    probe_every: int = 100  # compare exit-layer vs exact ranking every n steps; 0 = never


@dataclass
class TrackingConfig:
    enabled: bool = True  # log to MLflow (rank 0); the journal in out_dir is written either way
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    experiment: str = "sift-pretrain"  # the MLflow experiment: name one per study, compare by it
    artifact_location: str = ""  # where a new experiment keeps artifacts; "" = beside a sqlite store, else the server's
    run_name: str = ""  # "" = derived from policy, exit layer, preset, seed
    retry_seconds: float = 5.0  # how often a down MLflow server is tried again


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- config file <- `key=value` overrides, then validated."""
    raw: dict[str, Any] = {}
    if path:
        raw = _read_file(path)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "" in key.strip().split("."):
            raise ConfigError(f"override {item!r} is not key=value", "--set", "write it as --set train.lr=5e-4")
        try:
            parsed = yaml.safe_load(value)  # parsed as the YAML file's values are
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"value {value!r} is not valid YAML ({problem})", key.strip(),
                              f"quote it or fix the brackets: --set {key.strip()}=...") from None
        _set_dotted(raw, key.strip(), parsed)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def _read_file(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError("--config is a directory", path, "pass a YAML or JSON run config file (see configs/)")
    if not os.path.isfile(path):
        raise ConfigError("config file not found", path, "pass an existing file to --config (see configs/)")
    try:
        text = Path(path).read_text()
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise ConfigError("config file is not text", path, "pass a YAML or JSON run config (see configs/)") from None
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        kind = "JSON" if path.endswith(".json") else "YAML"
        problem = " ".join(str(err).split())
        raise ConfigError(f"config file is not valid {kind}: {problem}", path, "fix the syntax at the place named") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config file's top level is not a mapping of sections", path,
                          "write it as sections: model:, data:, train:, select:, tracking:")
    return data


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part} is not a section", key, "override one key at a time, e.g. --set train.lr=5e-4")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a mapping of keys, got {raw!r}", where, f"write {where} as key: value lines")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}", f"{prefix}{key}",
                              f"use one of {', '.join(sorted(names))} (python -m pipeline.train --print-config lists all)")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", key, set_key(key, "[a, b]"))
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected true or false, got {value!r}", key, set_key(key, "true"))
    if hint in (int, float):
        return _number(value, hint, key)
    if hint is str:
        if isinstance(value, bool):  # YAML reads true/false as booleans; keys like static_shapes take them
            return str(value).lower()
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(f"expected a string, got {value!r}", key, set_key(key))
    raise ConfigError(f"unsupported type {hint}", key, "this is a bug in pipeline/config.py: report it")


def _number(value: Any, hint: type, key: str) -> int | float:
    """An int or float key's value: a number, or a string that reads as one. YAML 1.1 reads 5e-4
    (no dot) as a string, so a file and --set both get 5e-4 = 1e-3 / 2 right. Never NaN or inf."""
    kind = "an integer" if hint is int else "a number"
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip().replace("_", ""))
        except ValueError:
            number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"expected {kind}, got {value!r}", key, set_key(key, "3" if hint is int else "0.1"))
    if not math.isfinite(number):
        raise ConfigError(f"expected a finite number, got {value!r}", key, set_key(key))
    if hint is int:
        if float(number).is_integer():
            return int(number)
        raise ConfigError(f"expected an integer, got {value!r}", key, set_key(key, str(int(number))))
    return float(number)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(message, key, set_key(key))


def validate(cfg: Config) -> None:
    """Checks that need no data or model; pipeline.train checks the rest against the manifest."""
    m, d, t, s = cfg.model, cfg.data, cfg.train, cfg.select
    _check(m.arch in ARCHES, "model.arch", f"must be one of {', '.join(ARCHES)}, got {m.arch!r}")
    _check(not (m.pre_layernorm and m.arch != "bert"), "model.pre_layernorm",
           f"rewires BERT only; model.arch {m.arch} has its own norm placement")
    _check(m.positions in ("learned", "rotary"), "model.positions", f"must be learned or rotary, got {m.positions!r}")
    _check(m.positions == "learned" or m.arch == "bert", "model.positions",
           f"rewires BERT only; model.arch {m.arch} has its own (rotary) positions")
    _check(m.preset in PRESETS, "model.preset", f"must be one of {', '.join(PRESETS)}, got {m.preset!r}")
    for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "max_position"):
        _check(getattr(m, name) >= 0, f"model.{name}", "must be >= 0 (0 = preset value)")
    layers, hidden, heads, _ = m.shape
    _check(hidden % heads == 0, "model.hidden_size", f"{hidden} is not divisible by model.num_heads {heads}")
    _check(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _check(0.0 < d.mask_prob < 1.0, "data.mask_prob", f"must be in (0, 1), got {d.mask_prob}")
    _check(0.0 < d.eval_mask_prob < 1.0, "data.eval_mask_prob", f"must be in (0, 1), got {d.eval_mask_prob}")
    for name in ("mask_share", "random_share"):
        _check(0.0 <= getattr(d, name) <= 1.0, f"data.{name}", f"must be in [0, 1], got {getattr(d, name)}")
    _check(d.mask_share + d.random_share <= 1.0, "data.random_share",
           f"data.mask_share + data.random_share must be <= 1, got "
           f"{d.mask_share} + {d.random_share}")
    _check(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _check(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _check(d.eval_samples >= 1, "data.eval_samples", "must be >= 1")
    _check(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
    _check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    _check(t.schedule in ("auto", "steps", "time"), "train.schedule", f"must be auto, steps or time, got {t.schedule!r}")
    _check(t.schedule != "time" or t.max_seconds > 0, "train.schedule",
           "time spreads the schedule over train.max_seconds: set it (> 0)")
    _check(t.lr_decay in ("cosine", "linear"), "train.lr_decay", f"must be cosine or linear, got {t.lr_decay!r}")
    _check(0.0 <= t.warmup_fraction < 1.0, "train.warmup_fraction", f"must be in [0, 1), got {t.warmup_fraction}")
    _check(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    _check(t.max_seconds >= 0, "train.max_seconds", "must be >= 0 (0 = no budget)")
    _check(0.0 <= t.target_accuracy <= 1.0, "train.target_accuracy", "must be in [0, 1] (0 = none)")
    _check(0.0 <= t.target_mask_accuracy <= 1.0, "train.target_mask_accuracy", "must be in [0, 1] (0 = none)")
    for name in ("eval_every", "log_every"):
        _check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1")
    _check(t.eval_every_s >= 0, "train.eval_every_s", "must be >= 0 (0 = by steps only)")
    _check(t.ckpt_every >= 0, "train.ckpt_every", "must be >= 0 (0 = only at the end)")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
    _check(t.max_nonfinite_in_a_row >= 1, "train.max_nonfinite_in_a_row", "must be >= 1")
    _check(t.threads >= 0, "train.threads", "must be >= 0")
    _check(t.peak_tflops >= 0, "train.peak_tflops", "must be >= 0 (0 = from the GPU's name)")
    _check(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {t.device!r}")
    _check(t.static_shapes in ("auto", "true", "false"), "train.static_shapes",
           f"must be auto, true or false, got {t.static_shapes!r}")
    _check(not ((m.pre_layernorm or m.positions == "rotary") and t.export), "train.export",
           "a model.pre_layernorm=true or model.positions=rotary BERT is not a standard Hugging Face BERT: set "
           "train.export=false (model.arch=modernbert exports)")
    _check(bool(t.ds_configs), "train.ds_configs", "needs at least one DeepSpeed JSON")
    from pipeline.sift.policies import POLICIES

    _check(s.policy in POLICIES, "select.policy", f"must be one of {', '.join(POLICIES)}, got {s.policy!r}")
    _check(s.oversample >= 1, "select.oversample", f"must be >= 1, got {s.oversample}")
    _check(not POLICIES[s.policy].oversamples or s.oversample >= 2, "select.oversample",
           f"policy {s.policy} selects among candidates: needs oversample >= 2")
    _check(0 <= s.exit_layer <= layers, "select.exit_layer",
           f"must be in 0..{layers} (the model's layers), got {s.exit_layer}")
    _check(s.sb_beta > 0, "select.sb_beta", "must be > 0")
    _check(s.sb_history >= 1, "select.sb_history", "must be >= 1")
    _check(0.0 <= s.active_from <= 1.0, "select.active_from", f"must be in [0, 1], got {s.active_from}")
    _check(s.active_from <= s.active_to <= 1.0, "select.active_to",
           f"must be in [active_from, 1] = [{s.active_from}, 1], got {s.active_to}")
    _check(s.every >= 1, "select.every", "must be >= 1")
    _check(0.0 <= s.start_at_mask_accuracy < 1.0, "select.start_at_mask_accuracy",
           f"must be in [0, 1) (0 = off), got {s.start_at_mask_accuracy}")
    _check(s.probe_every >= 0, "select.probe_every", "must be >= 0")


def exit_layer_run(cfg: Config) -> int | None:
    """The exit layer selection scores at, as it runs: select.exit_layer for the exit-scored policies,
    the last layer for exact / selective_backprop, None for policies that score nothing."""
    from pipeline.sift.policies import POLICIES

    scored_at = POLICIES[cfg.select.policy].scored_at
    return {"exit": cfg.select.exit_layer, "last": cfg.model.shape[0]}.get(scored_at)


def candidates_per_micro_step(cfg: Config) -> int:
    from pipeline.sift.policies import POLICIES

    oversample = cfg.select.oversample if POLICIES[cfg.select.policy].oversamples else 1
    return cfg.train.micro_batch * oversample


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists become comma-joined strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            flat[f"{prefix}{key}"] = ",".join(map(str, value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
