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

ONE_LINE = re.compile(r"error: (?P<what>.+) \((?P<where>[^()]+)\): (?P<fix>.+)")

CLI_CASES = [  # id, config file name and text (None: tiny.yaml), overrides, where (regex), what (regex)
    ("config file not YAML", ("run.yaml", "train: {lr: 1\n"), [], r".*run\.yaml", r"config file is not valid YAML"),
    ("config file not JSON", ("run.json", "{\"train\": }"), [], r".*run\.json", r"config file is not valid JSON"),
    ("config file is a list", ("run.yaml", "- train\n- model\n"), [], r".*run\.yaml",
     r"config file's top level is not a mapping"),
    ("config file not text", ("run.yaml", "\udcff\x00\x01"), [], r".*run\.yaml", r"config file is not text"),
    ("unknown key in a config file", ("run.yaml", "model: {layers: 4}\n"), [], r"model\.layers",
     r"unknown config key model.layers"),
    ("wrong type in a config file", ("run.yaml", "train: {max_steps: many}\n"), [], r"train\.max_steps",
     r"expected an integer, got 'many'"),
    ("list key given a mapping", None, ["train.ds_configs={a: 1}"], r"train\.ds_configs", r"expected a list"),
    ("number key given a list", None, ["model.dropout=[0.1]"], r"model\.dropout", r"expected a number"),
    ("string key given a mapping", None, ["data.dir={a: 1}"], r"data\.dir", r"expected a string"),
    ("exit layer beyond the model", None, ["select.policy=sift", "select.exit_layer=3"], r"select\.exit_layer",
     r"must be in 0..2 \(the model's layers\), got 3"),
    ("heads not dividing hidden", None, ["model.num_heads=3"], r"model\.hidden_size",
     r"32 is not divisible by model.num_heads 3"),
    # trust issue, item 2: a malformed --set is one line, not a traceback
    ("malformed override", None, ["train.lr=[1"], r"train\.lr", r"value '\[1' is not valid YAML"),
    ("override without =", None, ["train.lr"], r"--set", r"override 'train.lr' is not key=value"),
    # item 3: non-finite values are refused up front, in the file and in --set
    ("infinite learning rate", None, ["train.lr=.inf"], r"train\.lr", r"expected a finite number, got inf"),
    ("NaN learning rate", None, ["train.lr=nan"], r"train\.lr", r"expected a finite number, got 'nan'"),
    ("infinite LR in a config file", ("run.yaml", "train: {lr: .inf}\n"), [], r"train\.lr",
     r"expected a finite number, got inf"),
    ("NaN dropout", None, ["model.dropout=.nan"], r"model\.dropout", r"expected a finite number"),
    # found by the RELIABILITY.md walk-through (bare "unknown config key" line; "config file not found")
    ("override with no key", None, ["=5"], r"--set", r"override '=5' is not key=value"),
    ("override with an empty section", None, ["train..lr=1"], r"--set", r"override 'train..lr=1' is not key=value"),
    ("config is a directory", ("conf.d/", None), [], r".*conf\.d", r"--config is a directory"),
]


@pytest.mark.parametrize("name,config,overrides,where,what", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_config_fails_with_one_line_before_any_setup(tmp_path, monkeypatch, capsys, name, config, overrides,
                                                         where, what):
    """Exit 2, one `error: <what> (<where>): <what to do>` line naming the key or file, no traceback,
    before the process group or any library is set up. Items 2 and 3 of the trust issue failed here
    before their fix (a traceback with exit 1; .inf accepted)."""
    import pipeline.train as train_module

    monkeypatch.setattr("pipeline.distributed.init_distributed", lambda *a: pytest.fail("init_distributed was reached"))
    path = str(REPO / "configs" / "tiny.yaml")
    if config is not None:
        path = str(tmp_path / config[0])
        if config[1] is None:
            Path(path).mkdir()
        else:
            Path(path).write_bytes(config[1].encode("utf-8", "surrogateescape"))
    argv = ["--config", path] + [arg for item in overrides for arg in ("--set", item)]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    line = ONE_LINE.fullmatch(err.strip())
    assert line and re.fullmatch(where, line["where"]) and re.match(what, line["what"]), err


@pytest.mark.parametrize("value,expected", [("5e-4", 5e-4), ("1e-3", 1e-3), ("1.0e-3", 1e-3), ("3", 3.0),
                                            ("2E-4", 2e-4), ("0.001", 1e-3)])
def test_every_number_form_reads_as_a_number_in_set_and_in_the_file(tmp_path, value, expected):
    """Item 1: YAML 1.1 reads 5e-4 as a string; it failed with "expected a number" before the fix,
    in --set and in the config file alike."""
    from pipeline.config import load_config

    assert load_config(None, [f"train.lr={value}"]).train.lr == pytest.approx(expected)
    path = tmp_path / "run.yaml"
    path.write_text(f"train: {{lr: {value}, max_steps: {value if value == '3' else '1e3'}}}\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == pytest.approx(expected) and cfg.train.max_steps in (3, 1000)


def test_cli_exit_code_and_message_for_a_missing_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline.train", "--config", str(tmp_path / "missing.yaml")],
                            env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: config file not found ({tmp_path / 'missing.yaml'}): pass an existing file to --config (see configs/)"]


def test_cli_exit_code_and_message_for_a_missing_data_dir(tmp_path, dist_info, monkeypatch, capsys):
    import deepspeed

    import pipeline.train as train_module

    monkeypatch.setattr("pipeline.distributed.init_distributed", lambda *a: dist_info)  # the session's process group
    monkeypatch.setattr("pipeline.cli.setup_logging", lambda rank: None)
    monkeypatch.setattr("pipeline.distributed.shutdown", lambda **kw: None)  # ... stays up for the other tests
    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    argv = ["--config", str(REPO / "configs/tiny.yaml"), "--set", f"data.dir={tmp_path}/none",
            "--set", f"train.out_dir={tmp_path}/out"]
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: no such directory: {tmp_path}/none (data.dir): ") and "Traceback" not in err


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


def ds_json(text: str | bytes):
    def mutate(data: Path, out: Path, tmp: Path) -> list[str]:
        (tmp / "bad.json").write_bytes(text if isinstance(text, bytes) else text.encode())
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


DATA_CASES = [  # id, mutate(data, out, tmp) -> overrides, world size, error, where (regex), what (regex)
    ("data dir missing", lambda d, o, t: [f"data.dir={t / 'nope'}"], 1, DataError, r"data\.dir",
     r"no such directory: .*nope"),
    ("empty shard dir", empty_dir, 1, DataError, r"data\.dir", r"has no manifest.json: not a data_prep output directory"),
    ("manifest not JSON", lambda d, o, t: [(d / "manifest.json").write_text("{"), []][1], 1, DataError,
     r".*manifest\.json", r"manifest is not valid JSON"),
    ("manifest not UTF-8", lambda d, o, t: [(d / "manifest.json").write_bytes(b"\xff\xfe not json"), []][1], 1,
     DataError, r".*manifest\.json", r"manifest is not valid JSON"),
    ("manifest a JSON null", lambda d, o, t: [(d / "manifest.json").write_text("null"), []][1], 1, DataError,
     r".*manifest\.json", r"the manifest is NoneType, not a JSON object"),
    ("manifest special id not an id", edit_manifest(lambda m: m["tokenizer"]["special_ids"].update(mask="x")), 1,
     DataError, r".*manifest\.json", r"tokenizer.special_ids has a value that is not a token id"),
    ("manifest URL unreachable", lambda d, o, t: ["data.dir=http://127.0.0.1:9/shards"], 1, DataError,
     r"http://127\.0\.0\.1:9/shards/manifest\.json", r"cannot read the manifest \(URLError"),
    ("manifest without seq_len", edit_manifest(lambda m: _del(m, "seq_len")), 1, DataError, r".*manifest\.json",
     r"manifest lacks the key 'seq_len'"),
    ("manifest seq_len a string", edit_manifest(lambda m: _set(m, seq_len="32")), 1, DataError, r".*manifest\.json",
     r"seq_len is not a positive integer: '32'"),
    ("manifest without a mask id", edit_manifest(lambda m: _del(m, "tokenizer", "special_ids", "mask")), 1, DataError,
     r".*manifest\.json", r"tokenizer.special_ids lacks \['mask'\]"),
    ("shard entry without a count", edit_manifest(lambda m: _del(m, "shards", 2, "samples")), 1, DataError,
     r".*manifest\.json", r"shards\[2\] lacks a name, a split 'train' or 'val' or an integer samples count"),
    ("no train shards", edit_manifest(lambda m: _set(m, shards=[s for s in m["shards"] if s["split"] == "val"])), 1,
     DataError, r".*manifest\.json", r"the manifest lists no train shards"),
    ("no validation shards", edit_manifest(lambda m: _set(m, shards=[s for s in m["shards"] if s["split"] == "train"])),
     1, DataError, r".*manifest\.json", r"the manifest lists no validation shards"),
    ("a listed shard missing", lambda d, o, t: [(d / "train-000002.tar").unlink(), []][1], 1, DataError,
     r".*manifest\.json", r"shards listed in the manifest are missing: train-000002.tar"),
    ("unsafe shard name", edit_manifest(lambda m: m["shards"][0].update(name="../evil.tar")), 1, DataError,
     r".*manifest\.json", r"unsafe shard name '../evil.tar'"),
    ("tokenizer dir missing", lambda d, o, t: [shutil.rmtree(d / "tokenizer"), []][1], 1, DataError, r".*/tokenizer",
     r"the tokenizer directory .* names is missing"),
    ("vocab size unlike the tokenizer's", edit_manifest(lambda m: _set(m, vocab_size=m["vocab_size"] + 7)), 1,
     DataError, r".*/tokenizer", r"the tokenizer has \d+ tokens but .* says vocab_size \d+: shards and tokenizer do not match"),
    ("tokenizer from another build", swap_two_tokens, 1, DataError, r".*/tokenizer",
     r"its vocab differs from the one the shards were built with"),
    ("special id unlike the tokenizer's", edit_manifest(lambda m: m["tokenizer"]["special_ids"].update(mask=7)), 1,
     DataError, r".*/tokenizer", r"\[MASK\] is id \d+ but .* says 7"),
    ("shard ids beyond the vocab", ids_beyond_vocab, 1, DataError, r".*manifest\.json",
     r"the shards do not match their manifest .*token id 500 >= vocab size"),
    ("shard seq_len unlike the manifest's", edit_manifest(lambda m: _set(m, seq_len=64)), 1, DataError,
     r".*manifest\.json", r"the shards do not match their manifest .*expected 64 integer ids, got uint16\(32,\)"),
    ("seq_len beyond max_position", overrides("model.max_position=16"), 1, ConfigError, r"model\.max_position",
     r"16 is smaller than the data's seq_len 32"),
    ("more ranks than train shards", one_train_shard, 2, DataError, r".*manifest\.json",
     r"1 train shard\(s\) cannot be dealt to 2 ranks"),
    ("micro-batch beyond a rank's share", overrides("train.micro_batch=400", "select.policy=random"), 1, DataError,
     r".*manifest\.json", r"too few train samples per rank for one micro-batch of 800 candidates"),
    ("fewer eval samples than ranks", overrides("data.eval_samples=1"), 2, DataError, r".*manifest\.json",
     r"cannot give each of 2 ranks one"),
    ("output dir not writable", out_under_a_file, 1, ConfigError, r"train\.out_dir", r".*a_file/run is not writable"),
    ("DeepSpeed JSON not JSON", ds_json("{"), 1, ConfigError, r".*bad\.json", r"not valid JSON"),
    ("DeepSpeed JSON a list", ds_json("[1, 2]"), 1, ConfigError, r".*bad\.json", r"the top level is not a JSON object"),
    ("DeepSpeed JSON sets accumulation", ds_json('{"gradient_accumulation_steps": 4}'), 1, ConfigError, r".*bad\.json",
     r"sets 'gradient_accumulation_steps', which is derived from the run config"),
    ("DeepSpeed JSON sets micro-batch", ds_json('{"train_micro_batch_size_per_gpu": 4}'), 1, ConfigError,
     r".*bad\.json", r"sets 'train_micro_batch_size_per_gpu'"),
    ("DeepSpeed JSON not UTF-8", ds_json(b"\xff\xfe{}"), 1, ConfigError, r".*bad\.json", r"not valid JSON"),
    ("DeepSpeed JSON section a number", ds_json('{"zero_optimization": 2}'), 1, ConfigError, r".*bad\.json",
     r"'zero_optimization' is 2, not a JSON object"),
    ("DeepSpeed JSON section a bool", ds_json('{"bf16": true}'), 1, ConfigError, r".*bad\.json",
     r"'bf16' is true, not a JSON object"),
    ("DeepSpeed JSON ZeRO stage 4", ds_json('{"zero_optimization": {"stage": 4}}'), 1, ConfigError,
     r"train\.ds_configs", r"zero_optimization.stage must be 0-3, got 4"),
    ("resume with another world size", checkpoint_of(world=2), 1, ConfigError, r"train\.out_dir",
     r"step00000004 was saved with 2 ranks, this run has 1"),
    ("resume another model", checkpoint_of(world=1, model={"preset": "mini"}), 1, ConfigError, r".*config\.json",
     r"this run differs from the checkpoint it would resume in \d+ key\(s\): .*model.preset: 'mini' -> 'tiny'"),
    ("warm start from nothing", lambda d, o, t: [f"train.init_from={t / 'nothing'}"], 1, ConfigError,
     r"train\.init_from", r"no complete checkpoint in .*nothing"),
]


@pytest.mark.parametrize("name,mutate,world,error,where,what", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_input_fails_before_deepspeed_initialize(tiny_data, tmp_path, monkeypatch, name, mutate, world, error,
                                                     where, what):
    """Each error names what is wrong, where (the key or file) and what to do."""
    import deepspeed

    from pipeline.run import Run

    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("deepspeed.initialize was reached"))
    data, out = copy_data(tiny_data, tmp_path / "data"), tmp_path / "out"
    cfg = tiny_config(data, out, *mutate(data, out, tmp_path))
    with pytest.raises(error) as caught:
        Run.open(cfg, DistInfo(rank=0, world_size=world, local_rank=0, device=torch.device("cpu")))
    err = caught.value
    assert re.fullmatch(where, err.where), err.where
    assert re.search(what, err.what), err.what
    assert err.fix and str(err) == f"{err.what} ({err.where}): {err.fix}"


@pytest.mark.parametrize("argv", [["--bogus"], ["--set"], ["--config"]], ids=["unknown flag", "--set without a value",
                                                                             "--config without a value"])
def test_a_command_line_error_is_one_line_too(argv):
    """argparse printed its usage and a second error line (two lines, no `(where): fix`) before the fix."""
    result = subprocess.run([sys.executable, "-m", "pipeline.train", *argv], env=clean_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    line = ONE_LINE.fullmatch(result.stderr.strip())
    assert line and line["where"] == "command line" and "--help" in line["fix"], result.stderr


def test_tracking_sync_of_a_directory_that_is_no_run_is_one_line(tmp_path, capsys):
    """It raised FileNotFoundError with a traceback (exit 1) before the fix."""
    from pipeline.tracking.__main__ import main

    assert main(["sync", str(tmp_path)]) == 2
    line = ONE_LINE.fullmatch(capsys.readouterr().err.strip())
    assert line and line["where"] == str(tmp_path) and "not a tracked run directory" in line["what"]
