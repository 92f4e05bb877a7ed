"""Bad inputs, each with its clear error, raised before any heavy work.

Config errors surface in `pipeline.train.main` before the process group is set up (exit code 2, one
line); data, model, output and DeepSpeed-JSON errors surface in `Run.open` before
`deepspeed.initialize` (patched here to fail the test if reached). Value checks already covered by
tests/test_config.py are not repeated; docs/RELIABILITY.md lists both tables.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.distributed import DistInfo
from pipeline.manifest import DataError
from tests.conftest import REPO, clean_env, tiny_config
from tests.fault_helpers import copy_data, npy, read_manifest, refresh_shard_entry, write_manifest, write_tar

# -- config files and overrides, through the CLI --------------------------------------------------

CLI_CASES = [  # id, config file name and text (None: tiny.yaml), overrides, message
    ("config file not YAML", ("run.yaml", "train: {lr: 1\n"), [], r"config file .*run.yaml: not valid YAML"),
    ("config file not JSON", ("run.json", "{\"train\": }"), [], r"config file .*run.json: not valid JSON"),
    ("config file is a list", ("run.yaml", "- train\n- model\n"), [], r"the top level must be a mapping"),
    ("unknown key in a config file", ("run.yaml", "model: {layers: 4}\n"), [], r"unknown config key model.layers"),
    ("wrong type in a config file", ("run.yaml", "train: {max_steps: many}\n"), [],
     r"train.max_steps: expected an integer, got 'many'"),
    ("list key given a mapping", None, ["train.ds_configs={a: 1}"], r"train.ds_configs: expected a list"),
    ("number key given a list", None, ["model.dropout=[0.1]"], r"model.dropout: expected a number"),
    ("string key given a mapping", None, ["data.dir={a: 1}"], r"data.dir: expected a string"),
    ("exit layer beyond the model", None, ["select.policy=sift", "select.exit_layer=3"],
     r"select.exit_layer: must be in 0..2 \(the model's layers\), got 3"),
    ("heads not dividing hidden", None, ["model.num_heads=3"], r"model.hidden_size: 32 is not divisible by model.num_heads 3"),
]


@pytest.mark.parametrize("name,config,overrides,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_config_fails_with_one_message_before_any_setup(tmp_path, monkeypatch, capsys, name, config, overrides,
                                                       message):
    import pipeline.train as train_module

    monkeypatch.setattr("pipeline.distributed.init_distributed", lambda: pytest.fail("init_distributed was reached"))
    path = str(REPO / "configs" / "tiny.yaml")
    if config is not None:
        path = str(tmp_path / config[0])
        Path(path).write_text(config[1])
    argv = ["--config", path] + [arg for item in overrides for arg in ("--set", item)]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and re.search(message, err), err


def test_cli_exit_code_and_message_for_a_missing_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(tmp_path / "missing.yaml")],
                            env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: config file {tmp_path / 'missing.yaml'}: not found"


def test_cli_exit_code_and_message_for_a_missing_data_dir(tmp_path, dist_info, monkeypatch, caplog):
    import deepspeed

    import pipeline.train as train_module

    monkeypatch.setattr("pipeline.distributed.init_distributed", lambda: dist_info)  # the session's process group
    monkeypatch.setattr("pipeline.cli.setup_logging", lambda rank: None)
    monkeypatch.setattr("pipeline.distributed.shutdown", lambda **kw: None)  # ... stays up for the other tests
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    argv = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.dir={tmp_path}/none",
            "--set", f"train.out_dir={tmp_path}/out"]
    assert train_module.main(argv) == 2
    assert f"data.dir {tmp_path}/none: no such directory" in caplog.text and "Traceback" not in caplog.text


# -- data, model, output dir, DeepSpeed JSON, checkpoints: Run.open before deepspeed.initialize --

def edit_manifest(change):
    def mutate(data: Path, out: Path, tmp: Path) -> list[str]:
        manifest = read_manifest(data)
        change(manifest)
        write_manifest(data, manifest)
        return []
    return mutate


def overrides(*items: str):
    return lambda data, out, tmp: list(items)


def ds_json(text: str):
    def mutate(data: Path, out: Path, tmp: Path) -> list[str]:
        (tmp / "bad.json").write_text(text)
        return [f"train.ds_configs=[ds_configs/base.json, {tmp / 'bad.json'}]"]
    return mutate


def empty_dir(data, out, tmp):
    (tmp / "empty").mkdir()
    return [f"data.dir={tmp / 'empty'}"]


def swap_two_tokens(data, out, tmp):  # same size, other ids: a tokenizer from another build
    path = data / "tokenizer" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = [t for t in vocab if not t.startswith("[")][:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(tok))
    (data / "tokenizer" / "vocab.txt").write_text("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    return []


def ids_beyond_vocab(data, out, tmp):  # shards tokenized with a bigger vocab than the manifest's
    first = read_manifest(data)["shards"][0]["name"]
    write_tar(data / first, [(f"k-{i:06d}.input_ids.npy", npy(np.full(32, 500, dtype=np.uint16))) for i in range(16)])
    refresh_shard_entry(data, first)
    return []


def one_train_shard(data, out, tmp):
    manifest = read_manifest(data)
    train = [s for s in manifest["shards"] if s["split"] == "train"]
    manifest["shards"] = train[:1] + [s for s in manifest["shards"] if s["split"] == "val"]
    write_manifest(data, manifest)
    return []


def out_under_a_file(data, out, tmp):
    (tmp / "a_file").write_text("")
    return [f"train.out_dir={tmp / 'a_file' / 'run'}"]


def checkpoint_of(world: int, model: dict | None = None):
    def mutate(data: Path, out: Path, tmp: Path) -> list[str]:
        tag = out / "checkpoints" / "step00000004"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(json.dumps({"step": 4, "world_size": world}))
        if model is not None:
            (out / "config.json").write_text(json.dumps({"model": model}))
        return []
    return mutate


def _del(mapping: dict, *path: str) -> None:
    for key in path[:-1]:
        mapping = mapping[key]
    del mapping[path[-1]]


def _set(manifest: dict, **items) -> None:
    manifest.update(items)


DATA_CASES = [  # id, mutate(data, out, tmp) -> overrides, world size, error, message
    ("data dir missing", lambda d, o, t: [f"data.dir={t / 'nope'}"], 1, DataError, r"data.dir .*nope: no such directory"),
    ("empty shard dir", empty_dir, 1, DataError, r"manifest.json: not found; is .* a data_prep output directory"),
    ("manifest not JSON", lambda d, o, t: [(d / "manifest.json").write_text("{"), []][1], 1, DataError,
     r"manifest.json: not valid JSON"),
    ("manifest without seq_len", edit_manifest(lambda m: _del(m, "seq_len")), 1, DataError, r"missing key 'seq_len'"),
    ("manifest seq_len a string", edit_manifest(lambda m: _set(m, seq_len="32")), 1, DataError,
     r"seq_len must be a positive integer, got '32'"),
    ("manifest without a mask id", edit_manifest(lambda m: _del(m, "tokenizer", "special_ids", "mask")), 1, DataError,
     r"tokenizer.special_ids lacks \['mask'\]"),
    ("shard entry without a count", edit_manifest(lambda m: _del(m, "shards", 2, "samples")), 1, DataError,
     r"shards\[2\] needs a name, split 'train' or 'val' and an integer samples count"),
    ("no train shards", edit_manifest(lambda m: _set(m, shards=[s for s in m["shards"] if s["split"] == "val"])), 1,
     DataError, r"lists no train shards"),
    ("no validation shards", edit_manifest(lambda m: _set(m, shards=[s for s in m["shards"] if s["split"] == "train"])),
     1, DataError, r"lists no validation shards"),
    ("a listed shard missing", lambda d, o, t: [(d / "train-000002.tar").unlink(), []][1], 1, DataError,
     r"shards listed in manifest.json are missing: train-000002.tar"),
    ("unsafe shard name", edit_manifest(lambda m: m["shards"][0].update(name="../evil.tar")), 1, DataError,
     r"unsafe shard name '../evil.tar'"),
    ("tokenizer dir missing", lambda d, o, t: [shutil.rmtree(d / "tokenizer"), []][1], 1, DataError,
     r"tokenizer: tokenizer directory not found"),
    ("vocab size unlike the tokenizer's", edit_manifest(lambda m: _set(m, vocab_size=m["vocab_size"] + 7)), 1,
     DataError, r"tokenizer has \d+ tokens but .* says vocab_size \d+: shards and tokenizer do not match"),
    ("tokenizer from another build", swap_two_tokens, 1, DataError,
     r"its vocab differs from the one the shards were built with"),
    ("special id unlike the tokenizer's", edit_manifest(lambda m: m["tokenizer"]["special_ids"].update(mask=7)), 1,
     DataError, r"\[MASK\] is id \d+ but .* says 7"),
    ("shard ids beyond the vocab", ids_beyond_vocab, 1, DataError,
     r"shards do not match .*token id 500 >= vocab size"),
    ("shard seq_len unlike the manifest's", edit_manifest(lambda m: _set(m, seq_len=64)), 1, DataError,
     r"shards do not match .*expected 64 integer ids, got uint16\(32,\)"),
    ("seq_len beyond max_position", overrides("model.max_position=16"), 1, ConfigError,
     r"model.max_position: 16 is smaller than the data's seq_len 32"),
    ("more ranks than train shards", one_train_shard, 2, DataError, r"1 train shard\(s\) cannot be dealt to 2 ranks"),
    ("micro-batch beyond a rank's share", overrides("train.micro_batch=400", "select.policy=random"), 1, DataError,
     r"too few train samples per rank for one micro-batch of 800 candidates"),
    ("fewer eval samples than ranks", overrides("data.eval_samples=1"), 2, DataError,
     r"cannot give each of 2 ranks one"),
    ("output dir not writable", out_under_a_file, 1, ConfigError, r"train.out_dir .*a_file/run: not writable"),
    ("DeepSpeed JSON not JSON", ds_json("{"), 1, ConfigError, r"bad.json: not valid JSON"),
    ("DeepSpeed JSON a list", ds_json("[1, 2]"), 1, ConfigError, r"bad.json: the top level must be an object"),
    ("DeepSpeed JSON sets accumulation", ds_json('{"gradient_accumulation_steps": 4}'), 1, ConfigError,
     r"bad.json sets 'gradient_accumulation_steps'; it is derived from the run config"),
    ("DeepSpeed JSON sets micro-batch", ds_json('{"train_micro_batch_size_per_gpu": 4}'), 1, ConfigError,
     r"bad.json sets 'train_micro_batch_size_per_gpu'"),
    ("DeepSpeed JSON ZeRO stage 4", ds_json('{"zero_optimization": {"stage": 4}}'), 1, ConfigError,
     r"zero_optimization.stage must be 0-3, got 4"),
    ("resume with another world size", checkpoint_of(world=2), 1, ConfigError,
     r"step00000004 was saved with 2 ranks, resuming with 1"),
    ("resume another model", checkpoint_of(world=1, model={"preset": "mini"}), 1, ConfigError,
     r"holds checkpoints of another model"),
    ("warm start from nothing", lambda d, o, t: [f"train.init_from={t / 'nothing'}"], 1, ConfigError,
     r"train.init_from .*nothing: no complete checkpoint there"),
]


@pytest.mark.parametrize("name,mutate,world,error,message", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_input_fails_before_deepspeed_initialize(tiny_data, tmp_path, monkeypatch, name, mutate, world, error,
                                                     message):
    import deepspeed

    from pipeline.run import Run

    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    data, out = copy_data(tiny_data, tmp_path / "data"), tmp_path / "out"
    cfg = tiny_config(data, out, *mutate(data, out, tmp_path))
    with pytest.raises(error, match=message):
        Run.open(cfg, DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu")))
